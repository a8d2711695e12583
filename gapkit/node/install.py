"""Installing MicroK8s on one node from a bundle, as a plan: upload, side-load, `snap install`.

The order is the one upstream's air-gap CI uses (data/microk8s/README.md §2): the snapd snap
(core20/core22 can need a newer snapd than the distribution ships), then the base, then
`microk8s --classic`; each after `snap ack` of its assertions (`--dangerous` only for a snap
that came without one).

What is already done is read from the node first and skipped, so a second run after a failure
continues where the first stopped:

- a snap installed at the bundle's revision (`snap list`) is neither uploaded nor installed
  again; for snapd and the base a newer revision is kept as well;
- a file already on the node with the bundle's sha256 is not uploaded again;
- images staged for side-loading: with MicroK8s >= 1.27 and `images.mode: sideload`, a lean
  tar of the node's platform (`gapkit.bundle.export.export_images`) goes to
  `/var/snap/microk8s/common/sideload/` **before** `snap install`: the install hook copies it
  into `common/etc/sideload/`, whose containerd plugin imports it at first start and renames it
  to `*.tar.loaded` (README §3). When MicroK8s is already installed, the tar goes straight into
  `common/etc/sideload/`; either way, `.tar.loaded` is the proof, waited for after
  `status --wait-ready`. Releases before 1.27 have no side-load plugin: `gapkit images import`
  (`import_images`) runs after the node is ready instead.

Uploads go through the runner's `upload` when it has one (the SSH runner: SFTP to a temp name,
sha256 checked, renamed), else through `write_file` (atomic, in memory: the local runner).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gapkit.bundle.reader import OpenBundle
from gapkit.errors import NodeError, NodeStepError
from gapkit.node.plan import CommandResult, FileWrite, Plan, Runner
from gapkit.oci.fsutil import file_digest

#: Where the snaps and their assertions are put on a node.
SNAP_DIR = PurePosixPath("/var/lib/gapkit/snaps")
#: Pre-staged before `snap install` (>= 1.27): the install hook copies `*.tar` from here.
SIDELOAD_STAGE = PurePosixPath("/var/snap/microk8s/common/sideload")
#: Watched by MicroK8s' containerd side-load plugin (>= 1.27) once it runs.
SIDELOAD_LIVE = PurePosixPath("/var/snap/microk8s/common/etc/sideload")
SIDELOAD_NAME = "gapkit-images.tar"
#: The first MicroK8s release with the side-load plugin and the pre-install folder.
SIDELOAD_SINCE = (1, 27)
#: Snaps in the order they are installed; the base sits between snapd and microk8s.
ORDER = ("snapd", "core", "core18", "core20", "core22", "core24", "microk8s")

Step = str


@dataclass(frozen=True)
class Upload:
    """A member of the bundle (a snap, an assertion) or a local file, to a path on the node."""

    path: PurePosixPath
    source: Path
    #: Member of the bundle at `source`; None: `source` is the file itself.
    member: str | None
    size: int
    sha256: str
    why: str = ""
    #: Already on the node with this sha256 (found while planning).
    present: bool = False


@dataclass(frozen=True)
class SnapStep:
    name: str
    revision: str
    installed: str | None
    argv: tuple[tuple[str, ...], ...]

    @property
    def done(self) -> bool:
        return not self.argv


@dataclass
class InstallPlan:
    node: str
    uploads: list[Upload] = field(default_factory=list)
    snaps: list[SnapStep] = field(default_factory=list)
    #: Where the images tar goes (stage folder before install, live folder after); None: none.
    sideload: Upload | None = None
    #: `microk8s images import` after ready (side-load mode, < 1.27).
    import_after: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def commands(self) -> list[tuple[str, ...]]:
        return [argv for step in self.snaps for argv in step.argv]

    @property
    def changed(self) -> bool:
        return bool(self.commands) or any(not u.present for u in self.all_uploads)

    @property
    def all_uploads(self) -> list[Upload]:
        return self.uploads + ([self.sideload] if self.sideload else [])

    def render(self) -> str:
        out = [f"# node {self.node}: install"]
        for up in self.all_uploads:
            if not up.sha256:
                out.append(f"# {up.path}: upload {up.why}")
                continue
            what = up.member or str(up.source)
            state = "already there" if up.present else f"upload {size_text(up.size)}"
            out.append(f"# {up.path}: {state} (from {what}, sha256 {up.sha256[:12]}…)"
                       + (f"  # {up.why}" if up.why and not up.present else ""))
        for step in self.snaps:
            if step.done:
                out.append(f"# snap {step.name}: revision {step.installed} installed, kept")
            for argv in step.argv:
                out.append("$ " + shlex.join(argv))
        if self.import_after:
            out.append("$ microk8s images import < (the bundle's images for this node's "
                       "platform)    # after the node is ready")
        out += [f"# note: {note}" for note in self.notes]
        if not self.changed and not self.import_after:
            out.append("# nothing to change")
        return "\n".join(out) + "\n"

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "changed": self.changed,
                "uploads": [{"path": str(u.path), "from": u.member or str(u.source),
                             "size": u.size, "sha256": u.sha256, "present": u.present}
                            for u in self.all_uploads],
                "snaps": [{"name": s.name, "revision": s.revision, "installed": s.installed,
                           "commands": [list(a) for a in s.argv]} for s in self.snaps],
                "import_after": self.import_after, "notes": list(self.notes)}


def size_text(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def check(runner: Runner, result: CommandResult, step: str) -> CommandResult:
    """A failed command as a NodeStepError naming the node and the step, with its output."""
    if result.returncode != 0:
        said = (result.stderr.strip() + "\n" + result.stdout.strip()).strip()
        raise NodeStepError(runner.name, step,
                            f"`{shlex.join(result.argv)}` failed with exit code "
                            f"{result.returncode}: {said[-1500:] or '(no output)'}",
                            "fix the cause on that node and run `gapkit cluster up` again: "
                            "what is done is skipped", said)
    return result


_SNAP_LIST_ROW = re.compile(r"^(?P<name>\S+)\s+(?P<version>\S+)\s+(?P<rev>x?\d+)\s")


async def installed_snaps(runner: Runner) -> dict[str, str]:
    """`snap list`: name -> revision; a node without snapd is an error naming the node."""
    result = await runner.run(["snap", "list"])
    if result.returncode == 127:
        raise NodeError(f"{runner.name}: no `snap` command: snapd is not installed",
                        hint="install snapd from the distribution's packages first")
    said = result.stdout + result.stderr
    if result.returncode != 0 and "No snaps are installed" not in said:
        check(runner, result, "snap list")
    out = {}
    for line in result.stdout.splitlines()[1:]:
        match = _SNAP_LIST_ROW.match(line)
        if match:
            out[match["name"]] = match["rev"]
    return out


def snap_order(name: str) -> int:
    return ORDER.index(name) if name in ORDER else ORDER.index("microk8s") - 1


def _newer_or_same(installed: str | None, wanted: str) -> bool:
    if installed is None:
        return False
    if installed == wanted:
        return True
    if installed.isdigit() and wanted.isdigit():
        return int(installed) >= int(wanted)
    return False


async def remote_sha256(runner: Runner, path: PurePosixPath) -> str | None:
    """The sha256 of a file on the node (the runner's own `sha256` when it has one)."""
    own = getattr(runner, "sha256", None)
    if callable(own):
        digest: str | None = await own(path)
        return digest
    data = await runner.read_file(path)
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _has_upload(runner: Runner) -> bool:
    return callable(getattr(runner, "upload", None))


def release_of(bundle: OpenBundle) -> tuple[int, int] | None:
    text = bundle.manifest.microk8s or ""
    match = re.match(r"v?(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


async def plan_install(runner: Runner, bundle: OpenBundle, *, sideload: Path | None = None,
                       sideload_sha256: str | None = None,
                       sideload_later: str | None = None) -> InstallPlan:
    """What installing the bundle's snaps on the node takes; reads the node, changes nothing.

    `sideload_later` (a platform) stands for a tar not exported yet (`--plan` does not export).

    `sideload`: a local images tar (this node's platform) to stage for >= 1.27.
    """
    plan = InstallPlan(runner.name)
    snaps = sorted(bundle.manifest.snaps, key=lambda s: snap_order(s.name))
    if not any(s.name == "microk8s" for s in snaps):
        raise NodeError(f"{bundle.path} holds no microk8s snap",
                        hint="build the bundle with its snaps (without --no-snaps)")
    have = await installed_snaps(runner)
    members = set(bundle.store.member_names())
    for snap in snaps:
        installed = have.get(snap.name)
        keep = (installed == snap.revision if snap.name == "microk8s"
                else _newer_or_same(installed, snap.revision))
        if snap.name == "microk8s" and installed is not None and not keep:
            raise NodeError(
                f"{runner.name}: microk8s revision {installed} is installed, the bundle has "
                f"revision {snap.revision}", hint="cluster up installs, it does not refresh: "
                "use a bundle of the installed release, or remove microk8s from that node")
        if keep:
            plan.snaps.append(SnapStep(snap.name, snap.revision, installed, ()))
            continue
        stem = f"{snap.name}_{snap.revision}" if snap.revision else PurePosixPath(snap.file).stem
        target = SNAP_DIR / f"{stem}.snap"
        plan.uploads.append(await _upload(runner, bundle, snap.file, target, snap.sha256,
                                          snap.size, f"the {snap.name} snap"))
        argv: list[tuple[str, ...]] = []
        has_assert = bool(snap.assertion) and snap.assertion in members
        if has_assert:
            assert_target = SNAP_DIR / f"{stem}.assert"
            location = bundle.store.member_location(snap.assertion)
            data = b"".join([c async for c in bundle.store.open_member(snap.assertion)])
            plan.uploads.append(await _upload(
                runner, bundle, snap.assertion, assert_target, hashlib.sha256(data).hexdigest(),
                location[2] if location else len(data), f"the {snap.name} assertions"))
            argv.append(("snap", "ack", str(assert_target)))
        install = ["snap", "install", str(target)]
        if snap.name == "microk8s":
            install.append("--classic")
        if not has_assert:
            install.append("--dangerous")
            plan.notes.append(f"{snap.name}: no assertion in the bundle, installed --dangerous "
                              "(no updates from the store, not verified by snapd)")
        argv.append(tuple(install))
        plan.snaps.append(SnapStep(snap.name, snap.revision, installed, tuple(argv)))
    microk8s_installed = "microk8s" in have
    if sideload is None and sideload_later is not None:
        folder = SIDELOAD_LIVE if microk8s_installed else SIDELOAD_STAGE
        plan.sideload = Upload(folder / SIDELOAD_NAME, bundle.path, None, 0, "",
                               f"the bundle's {sideload_later} images, exported when applied")
    if sideload is not None:
        folder = SIDELOAD_LIVE if microk8s_installed else SIDELOAD_STAGE
        loaded = await runner.list_dir(SIDELOAD_LIVE) or []
        if f"{SIDELOAD_NAME}.loaded" not in loaded:
            digest = sideload_sha256
            if digest is None:
                digest = await asyncio.to_thread(file_digest, sideload)
            plan.sideload = await _upload_file(
                runner, sideload, folder / SIDELOAD_NAME, digest,
                "images for MicroK8s' side-load plugin, " + (
                    "imported at first start" if folder == SIDELOAD_STAGE
                    else "imported within 5 s"))
    return plan




async def _upload(runner: Runner, bundle: OpenBundle, member: str, target: PurePosixPath,
                  sha256: str, size: int, why: str) -> Upload:
    present = await remote_sha256(runner, target) == sha256
    return Upload(target, bundle.path, member, size, sha256, why, present)


async def _upload_file(runner: Runner, source: Path, target: PurePosixPath, sha256: str,
                       why: str) -> Upload:
    present = await remote_sha256(runner, target) == sha256
    return Upload(target, source, None, source.stat().st_size, sha256, why, present)


# ---- applying --------------------------------------------------------------------------------

Materialise = Callable[[Upload], Awaitable[Path]]


async def carry_out_uploads(runner: Runner, uploads: list[Upload], materialise: Materialise,
                            read_member: Callable[[Upload], Awaitable[bytes]],
                            on_file: Callable[[Upload], None] | None = None) -> list[Upload]:
    """Upload what is not there yet; returns what was uploaded."""
    done = []
    for up in uploads:
        if up.present:
            continue
        if on_file is not None:
            on_file(up)
        if _has_upload(runner):
            local = up.source if up.member is None else await materialise(up)
            await _call_upload(runner, local, up)
        else:
            data = (await asyncio.to_thread(up.source.read_bytes) if up.member is None
                    else await read_member(up))
            if hashlib.sha256(data).hexdigest() != up.sha256:
                raise NodeError(f"{up.member or up.source} does not hash to {up.sha256}",
                                hint="run `gapkit bundle verify` on the bundle")
            await runner.write_file(up.path, data, 0o644)
        done.append(up)
    return done


async def _call_upload(runner: Runner, local: Path, up: Upload) -> None:
    """The runner's own `upload` (SSH: SFTP to a temp name, sha256 checked, renamed)."""
    upload: Any = runner.upload  # type: ignore[attr-defined]
    await upload(local, up.path, mode=0o644)


# ---- /etc/hosts for joins up to 1.27 -----------------------------------------------------------

ETC_HOSTS = PurePosixPath("/etc/hosts")
#: From 1.28 the API server prefers InternalIP and the join no longer checks host names.
HOSTS_NEEDED_BEFORE = (1, 28)
_HOSTS_HEADER = ("# Added by gapkit cluster up: the cluster's nodes (MicroK8s up to 1.27 refuses "
                 "a join\n# whose host name does not resolve to the joining node's address).\n")


async def plan_hosts(runner: Runner, nodes: list[tuple[str, str]]) -> Plan:
    """/etc/hosts with a line `ADDRESS NAME` for each node whose name it does not resolve yet.

    Every other line stays; a name already there with another address is left alone and
    reported (the join would fail: the operator decides which address is right).
    """
    plan = Plan(runner.name)
    old = await runner.read_file(ETC_HOSTS)
    text = (old or b"").decode("utf-8", "replace")
    known: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        for name in words[1:]:
            known.setdefault(name, words[0])
    missing = []
    for name, address in nodes:
        if name not in known:
            missing.append(f"{address} {name}\n")
        elif known[name] != address and not known[name].startswith("127."):
            plan.problems.append(f"{ETC_HOSTS} says {name} is {known[name]}, the inventory says "
                                 f"{address}: left alone (a join up to 1.27 checks it)")
    if missing:
        new = text + ("" if not text or text.endswith("\n") else "\n")
        if _HOSTS_HEADER not in new:
            new += _HOSTS_HEADER
        new += "".join(missing)
        plan.writes.append(FileWrite(ETC_HOSTS, new.encode(), old, 0o644,
                                     "the nodes' names, for joins up to MicroK8s 1.27"))
    return plan
