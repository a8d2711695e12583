"""`gapkit cluster up`: every node installed from the bundle and configured, then one cluster.

Per node, in parallel (at most `jobs` at once), each step read from the node first and skipped
when done (`gapkit.node.install`):

1. **upload** the snaps and assertions the node lacks to `/var/lib/gapkit/snaps/` (and, for
   side-loading on >= 1.27, a lean images tar of the node's platform to MicroK8s' pre-install
   side-load folder, so the images are there when containerd first starts). Over SSH each
   bundle member is copied once into a local temp file, which SFTP sends to every node (the
   runner skips a file already there with the same sha256); the images tar is exported once
   per platform;
2. **install**: `snap ack` + `snap install` snapd, the base, then `microk8s --classic`;
3. **configure** containerd for the mirror (hosts.toml for every upstream of the bundle's
   images) and/or the proxy, through `gapkit.node.configure.plan_configure`, the same plans
   as `gapkit node configure`;
4. **/etc/hosts** (releases up to 1.27 only, whose joins check that the joiner's host name
   resolves to its address): a line `ADDRESS NAME` for every node not listed yet;
5. **wait-ready**: `microk8s status --wait-ready --timeout N`;
6. **images** (side-load mode): wait for the side-load plugin's `*.tar.loaded` (>= 1.27), or
   `microk8s images import` (< 1.27), checked by name and digest.

Why configure after install, with hosts.toml, and not a launch config (`/etc/microk8s.yaml`
with `containerdRegistryConfigs`) before it: a launch config exists only from 1.27, a user
launch config replaces the snap's default one (which enables dns), it would overwrite a file
the site may own, and the certs.d files it writes are the very ones `plan_configure` writes.
containerd reads hosts.toml on every pull, so the pulls that fail before the files land (the
few seconds between install and configure) are retried through the mirror by the kubelet;
the proxy's `containerd-env` is followed by a restart, as in `node configure`.

`--plan` reads every node (`snap list`, files, `kubectl get nodes` when MicroK8s runs) and
prints what would be uploaded, written and run per node, then the join sequence; it changes
nothing and does not export the side-load tar (it names it). The token is never printed.

Then, one node at a time (`gapkit.cluster.join`): `add-node` with a fresh 32-hex token on the
first control-plane node, `join` on the others not yet in the cluster (`--worker` for
workers), and a wait until every node is Ready.

Errors stop the run at a consistent point: a failing node finishes no further step, the other
nodes finish the step they are in (never cut off in the middle of a `snap install`), and the
join does not start. The error names each node and step with the command's output; a rerun
continues where it stopped.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gapkit.bundle.reader import OpenBundle, open_bundle
from gapkit.cluster.join import (
    ClusterNode,
    JoinReport,
    first_control_plane,
    form_cluster,
    node_step,
    plan_join,
)
from gapkit.errors import ClusterError, GapkitError, NodeStepError, UsageError
from gapkit.node.configure import ConfigureOptions, configure_options, plan_configure
from gapkit.node.images import import_images, listed_images, node_platform
from gapkit.node.install import (
    HOSTS_NEEDED_BEFORE,
    SIDELOAD_LIVE,
    SIDELOAD_NAME,
    SIDELOAD_SINCE,
    InstallPlan,
    Upload,
    carry_out_uploads,
    check,
    plan_hosts,
    plan_install,
    release_of,
    size_text,
)
from gapkit.node.plan import Plan, Runner, apply
from gapkit.oci.fsutil import file_digest
from gapkit.oci.model import Platform

DEFAULT_JOBS = 4
#: `microk8s status --wait-ready --timeout` per node, seconds.
DEFAULT_WAIT_READY = 600

Progress = Callable[[str, str, str], None]
#: What `microk8s status` says on a worker node (it has no control plane to report on).
WORKER_STATUS = "acting as a node in a cluster"


@dataclass(frozen=True)
class UpOptions:
    #: "mirror", "sideload" or None (images come some other way).
    images_mode: str | None = None
    mirror: str | None = None
    ca: Path | None = None
    proxy: str | None = None
    jobs: int = DEFAULT_JOBS
    #: None: 900 s, or 300 s per joining node when longer (a TTL token serves every join).
    token_ttl: int | None = None
    wait_ready: int = DEFAULT_WAIT_READY
    #: For every node to be Ready after the joins, and for side-loaded images to be imported.
    ready_timeout: float = 600
    sideload_timeout: float = 300
    poll: float = 2.0


@dataclass
class NodeUp:
    node: str
    install: InstallPlan | None = None
    configure: Plan | None = None
    #: /etc/hosts entries for the other nodes (releases up to 1.27).
    hosts: Plan | None = None
    #: Step -> "done" (ran now) or "skipped" (already so) or a detail.
    steps: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        out = []
        if self.install is not None:
            out.append(self.install.render().rstrip("\n"))
        if self.configure is not None:
            out.append(self.configure.render().rstrip("\n").replace(
                f"# node {self.node}", f"# node {self.node}: configure", 1))
        if self.hosts is not None:
            out.append(self.hosts.render().rstrip("\n").replace(
                f"# node {self.node}", f"# node {self.node}: /etc/hosts", 1))
        out += [f"# {self.node}: {step}: {state}" for step, state in self.steps.items()]
        return "\n".join(out) + "\n"

    def to_json(self) -> dict[str, object]:
        return {"node": self.node,
                "install": self.install.to_json() if self.install else None,
                "configure": self.configure.to_json() if self.configure else None,
                "hosts": self.hosts.to_json() if self.hosts else None,
                "steps": dict(self.steps)}


@dataclass
class UpReport:
    planned: bool
    nodes: list[NodeUp] = field(default_factory=list)
    join: JoinReport | None = None

    def render(self) -> str:
        parts = [n.render() for n in self.nodes]
        if self.join is not None:
            parts.append(self.join.render())
        return "\n".join(parts)

    def to_json(self) -> dict[str, object]:
        return {"planned": self.planned, "nodes": [n.to_json() for n in self.nodes],
                "join": self.join.to_json() if self.join else None}


def configure_for(options: UpOptions, nodes: Sequence[ClusterNode],
                  bundle: Path) -> ConfigureOptions | None:
    """The `node configure` options every node gets: mirror (upstreams from the bundle), proxy."""
    mirror = options.mirror if options.images_mode == "mirror" else None
    if mirror is None and options.proxy is None:
        return None
    peers = [n.address for n in nodes]
    return configure_options(mirror, options.proxy, ca=options.ca if mirror else None,
                             bundle=bundle if mirror else None,
                             peers=peers if options.proxy else ())


class _Shared:
    """What all nodes share: the open bundle, one extracted copy of each member, one images
    tar per platform (made once, when the first node needs it)."""

    def __init__(self, bundle: OpenBundle, temp: Path, jobs: int,
                 nodes: Sequence[ClusterNode] = ()) -> None:
        self.bundle = bundle
        #: (name, address) of every node, for /etc/hosts up to 1.27 (empty: not needed).
        self.hosts = _hosts_entries(bundle, nodes)
        self.temp = temp
        self.jobs = jobs
        self._locks: dict[str, asyncio.Lock] = {}
        self._files: dict[str, Path] = {}
        self._sha: dict[str, str] = {}

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def member_file(self, up: Upload) -> Path:
        assert up.member is not None
        async with self._lock(up.member):
            if up.member not in self._files:
                path = self.temp / "members" / PurePosixPath(up.member).name
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    async for chunk in self.bundle.store.open_member(up.member):
                        await asyncio.to_thread(f.write, chunk)
                self._files[up.member] = path
            return self._files[up.member]

    async def member_bytes(self, up: Upload) -> bytes:
        assert up.member is not None
        return b"".join([c async for c in self.bundle.store.open_member(up.member)])

    async def images_tar(self, platform: Platform) -> tuple[Path, str]:
        from gapkit.bundle.export import export_images

        key = f"images:{platform}"
        async with self._lock(key):
            if key not in self._files:
                path = self.temp / f"images-{str(platform).replace('/', '-')}.tar"
                await export_images(self.bundle.path, path, [platform], jobs=self.jobs)
                self._files[key] = path
                self._sha[key] = await asyncio.to_thread(file_digest, path)
            return self._files[key], self._sha[key]


def _sideload_before_install(options: UpOptions, bundle: OpenBundle) -> bool:
    release = release_of(bundle)
    return options.images_mode == "sideload" and release is not None and release >= SIDELOAD_SINCE


async def _plan_node(runner: Runner, shared: _Shared, options: UpOptions,
                     configure: ConfigureOptions | None, export: bool = True) -> NodeUp:
    up = NodeUp(runner.name)
    sideload = None
    sideload_sha = None
    later = None
    if _sideload_before_install(options, shared.bundle):
        loaded = await node_step(runner.name, "images", runner.list_dir(SIDELOAD_LIVE)) or []
        if f"{SIDELOAD_NAME}.loaded" not in loaded:
            platform = await node_step(runner.name, "platform", node_platform(runner))
            held = [Platform.parse(p) for p in shared.bundle.manifest.platforms]
            if held and platform not in held:
                raise NodeStepError(runner.name, "images",
                                    f"the node is {platform}, the bundle holds images for "
                                    f"{', '.join(map(str, held))}",
                                    f"build the bundle with --platform {platform} too")
            if export:
                sideload, sideload_sha = await shared.images_tar(platform)
            else:
                later = str(platform)
    up.install = await node_step(runner.name, "plan install", plan_install(
        runner, shared.bundle, sideload=sideload, sideload_sha256=sideload_sha,
        sideload_later=later))
    if options.images_mode == "sideload" and not _sideload_before_install(options, shared.bundle):
        up.install.import_after = True
    elif _sideload_before_install(options, shared.bundle) and sideload is None and later is None:
        up.install.notes.append(f"images: {SIDELOAD_LIVE / SIDELOAD_NAME}.loaded says the "
                                "side-loaded images were imported")
    if configure is not None:
        up.configure = await node_step(runner.name, "plan configure",
                                        plan_configure(runner, configure))
        if any(not step.done for step in up.install.snaps):
            up.configure.notes.append("planned against the node as it is now: after `snap "
                                      "install` MicroK8s' own files are read and planned again")
    if shared.hosts:
        up.hosts = await node_step(runner.name, "plan /etc/hosts",
                                    plan_hosts(runner, shared.hosts))
    return up


def _hosts_entries(bundle: OpenBundle, nodes: Sequence[ClusterNode]) -> list[tuple[str, str]]:
    """Up to 1.27 a join is refused unless the joiner's name resolves to its address."""
    release = release_of(bundle)
    if release is None or release >= HOSTS_NEEDED_BEFORE or len(nodes) < 2:
        return []
    return [(n.name, n.address) for n in nodes]


async def _install_node(runner: Runner, shared: _Shared, options: UpOptions,
                        configure: ConfigureOptions | None, say: Progress) -> NodeUp:
    name = runner.name
    up = await _plan_node(runner, shared, options, configure)
    plan = up.install
    assert plan is not None
    sent = await node_step(name, "upload", carry_out_uploads(
        runner, plan.all_uploads, shared.member_file, shared.member_bytes,
        lambda f: say(name, "upload", f"{f.path} ({size_text(f.size)})")))
    up.steps["upload"] = f"{len(sent)} file(s) uploaded" if sent else "skipped (all there)"
    for step in plan.snaps:
        key = f"install {step.name}"
        if step.done:
            up.steps[key] = f"skipped (revision {step.installed} installed)"
            continue
        say(name, key, f"revision {step.revision}")
        for argv in step.argv:
            check(runner, await runner.run(argv), key)
        up.steps[key] = f"revision {step.revision} installed"
    if configure is not None:
        # planned again: MicroK8s' own files (containerd-env...) exist only after install
        up.configure = await node_step(name, "configure", plan_configure(runner, configure))
        if up.configure.changed:
            say(name, "configure", "containerd")
            await node_step(name, "configure", apply(up.configure, runner))
            up.steps["configure"] = "done"
        else:
            up.steps["configure"] = "skipped (already as wanted)"
        if up.configure.problems:
            raise NodeStepError(name, "configure", "; ".join(up.configure.problems))
    if up.hosts is not None:
        if up.hosts.changed:
            say(name, "/etc/hosts", "the nodes' names")
            await node_step(name, "/etc/hosts", apply(up.hosts, runner))
            up.steps["/etc/hosts"] = "done"
        else:
            up.steps["/etc/hosts"] = "skipped (every node's name is there)"
        if up.hosts.problems:
            raise NodeStepError(name, "/etc/hosts", "; ".join(up.hosts.problems),
                                "correct /etc/hosts on that node, then run again")
    say(name, "wait-ready", f"up to {options.wait_ready} s")
    status = await runner.run(["microk8s", "status", "--wait-ready", "--timeout",
                               str(options.wait_ready)])
    if WORKER_STATUS in status.stdout + status.stderr:
        # a worker joined by an earlier run: it has no status of its own; Ready is asked later
        up.steps["wait-ready"] = "skipped (a worker of the cluster)"
    else:
        check(runner, status, "wait-ready")
        up.steps["wait-ready"] = "MicroK8s is running"
    if plan.sideload is not None or (_sideload_before_install(options, shared.bundle)):
        say(name, "images", "waiting for the side-load plugin")
        up.steps["images"] = await _wait_sideloaded(runner, options)
    elif plan.import_after:
        up.steps["images"] = await _import(runner, shared, options)
    return up


async def _wait_sideloaded(runner: Runner, options: UpOptions) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.sideload_timeout
    while True:
        names = await node_step(runner.name, "images", runner.list_dir(SIDELOAD_LIVE)) or []
        if f"{SIDELOAD_NAME}.loaded" in names:
            return f"imported by the side-load plugin ({SIDELOAD_LIVE / SIDELOAD_NAME}.loaded)"
        if loop.time() >= deadline:
            state = ("still waiting" if SIDELOAD_NAME in names
                     else "the tar is not there (was it copied by the install hook?)")
            raise NodeStepError(runner.name, "images",
                               f"{SIDELOAD_LIVE / SIDELOAD_NAME} was not imported within "
                               f"{options.sideload_timeout:.0f} s: {state}",
                               hint="a tar that fails to import keeps its name: look at "
                               "`journalctl -u snap.microk8s.daemon-containerd` on the node "
                               "(platform, disk space), then run again")
        await asyncio.sleep(options.poll)


async def _import(runner: Runner, shared: _Shared, options: UpOptions) -> str:
    wanted = {str(ref.with_digest(None)) for ref in await shared.bundle.store.images()}
    have = await node_step(runner.name, "images", listed_images(runner))
    if wanted <= set(have):
        return "skipped (every image is there)"
    report = await node_step(runner.name, "images",
                              import_images(runner, shared.bundle.path, temp_dir=shared.temp))
    return f"{len(report.images)} image(s) imported and checked"


async def cluster_up(nodes: Sequence[ClusterNode], runners: Mapping[str, Runner], bundle: Path,
                     options: UpOptions, *, plan_only: bool = False,
                     progress: Progress | None = None) -> UpReport:
    """Install, configure and join every node; with `plan_only`, only read and plan."""
    from gapkit.cluster.runners import fan_out

    say: Progress = progress or (lambda node, step, text: None)
    first_control_plane(nodes)
    missing = [n.name for n in nodes if n.name not in runners]
    if missing:
        raise UsageError(f"no runner for {', '.join(missing)}")
    if options.images_mode == "sideload" and options.mirror:
        raise UsageError("images: mode sideload takes no mirror")
    configure = configure_for(options, nodes, bundle)
    opened = await open_bundle(bundle)
    report = UpReport(plan_only)
    try:
        if not any(s.name == "microk8s" for s in opened.manifest.snaps):
            raise UsageError(f"{bundle} holds no microk8s snap: it cannot install nodes",
                             hint="build the bundle with its snaps (without --no-snaps)")
        with tempfile.TemporaryDirectory(prefix="gapkit-up-") as temp:
            shared = _Shared(opened, Path(temp), options.jobs, nodes)

            async def one(node: ClusterNode) -> NodeUp:
                runner = runners[node.name]
                if plan_only:
                    return await _plan_node(runner, shared, options, configure, export=False)
                return await _install_node(runner, shared, options, configure, say)

            done = await fan_out(nodes, one, options.jobs, name=lambda n: n.name)
            values = done.values()
            report.nodes = [values[n.name] for n in nodes if n.name in values]
            if not done.ok:
                _raise_failed(done.errors, [n.node for n in report.nodes], plan_only)
    finally:
        await opened.close()
    if plan_only:
        report.join = await plan_join(nodes, runners, options.token_ttl)
        return report
    report.join = await form_cluster(nodes, runners, token_ttl=options.token_ttl,
                                     ready_timeout=options.ready_timeout, poll=options.poll,
                                     progress=say)
    return report


def _raise_failed(errors: Sequence[Any], finished: list[str], plan_only: bool) -> None:
    """One node failed: its NodeStepError, said to stop before the join; several: a list."""
    done = (f"; {', '.join(finished)} finished {'planning' if plan_only else 'installing'}"
            if finished else "")
    tail = done + ("" if plan_only else "; the cluster was not formed (no join ran)")
    failed: list[tuple[str, GapkitError]] = [(r.node, r.error) for r in errors
                                             if r.error is not None]
    node, first = failed[0]
    hint = first.hint or "fix the cause and run again: finished steps are skipped"
    if len(failed) == 1:
        if isinstance(first, NodeStepError):
            raise NodeStepError(first.node, first.step, first.detail + tail, hint, first.output)
        raise NodeStepError(node, "install", first.message + tail, hint)
    lines = "\n".join(f"  {error.message}" for _, error in failed)
    raise ClusterError(f"{len(failed)} nodes failed ({', '.join(n for n, _ in failed)}):\n"
                       + lines + "\n" + tail.lstrip("; "), hint=hint)


def options_from_inventory(inventory: Any, **overrides: Any) -> UpOptions:
    """UpOptions from an `Inventory` (`images:` and `proxy:`), then `overrides` (jobs...)."""
    images = inventory.images
    return UpOptions(images_mode=images.mode if images else None,
                     mirror=images.mirror if images else None,
                     ca=images.ca if images else None, proxy=inventory.proxy, **overrides)


def nodes_from_inventory(inventory: Any) -> list[ClusterNode]:
    return [ClusterNode(n.name, n.address, n.role) for n in inventory.nodes]


async def up_from_inventory(inventory: Any, bundle: Path, *, plan_only: bool = False,
                            jobs: int = DEFAULT_JOBS, progress: Progress | None = None,
                            **overrides: Any) -> UpReport:
    """`gapkit cluster up -i INV BUNDLE`: connect to every node over SSH, then `cluster_up`.

    Every node must answer first (a cluster cannot be formed without one): the unreachable
    ones are named together, before anything is changed.
    """
    from gapkit.cluster.runners import connected

    options = options_from_inventory(inventory, jobs=jobs, **overrides)
    nodes = nodes_from_inventory(inventory)
    targets = [inventory.target(n) for n in inventory.nodes]
    async with connected(targets, max(jobs, len(targets))) as (runners, errors):
        if errors:
            lines = "\n".join(f"  {e.message}" for e in errors.values())
            raise ClusterError(f"{len(errors)} node(s) cannot be reached ({', '.join(errors)}); "
                               f"nothing was changed:\n{lines}",
                               hint=next(iter(errors.values())).hint or "check the inventory's "
                               "addresses and SSH settings, then run again")
        return await cluster_up(nodes, runners, bundle, options, plan_only=plan_only,
                                progress=progress)
