"""`gapkit node configure`: MicroK8s' containerd set up for a mirror (Option B) or a proxy (Option A).

The mistakes this prevents (data/microk8s/README.md §8, pain points 2, 10 and 11):

- a mirror for docker.io only, while pause comes from registry.k8s.io (or k8s.gcr.io on
  1.25 and older): `--mirror` writes `certs.d/<upstream>/hosts.toml` for **every** upstream the
  bundle's images come from, or the `--registries` given, or, with neither, every upstream
  MicroK8s 1.22-1.36 and its addons pull from plus ghcr.io (`DEFAULT_UPSTREAMS`);
- an HTTP mirror written without `http://`, a path prefix without `override_path`, a CA file in
  the wrong place: the shared generator (`registry.push.hosts_files`, the same text
  `gapkit registry push` prints for the same layout) writes them, and the CA is copied beside
  each hosts.toml as `ca.crt` and named relatively (containerd reads a relative `ca` from the
  hosts.toml's folder), so the folder works on the node, under `--root`, and with
  `ctr --hosts-dir`;
- editing the regenerated `containerd.toml`, or legacy `registry.mirrors` next to
  `config_path` (containerd then refuses to start): only certs.d is written, and the template
  is checked for both;
- a proxy without NO_PROXY for the cluster (10.1.0.0/16) and service (10.152.183.0/24) ranges,
  the nodes and the mirror: `--proxy` sets HTTP_PROXY, HTTPS_PROXY and NO_PROXY in
  `containerd-env` (ranges read from `args/kube-proxy` and `args/kube-apiserver` when there),
  keeping every other line;
- forgetting the restart: containerd reads `containerd-env` only when it starts, so
  `snap restart microk8s` runs when (and only when) that file changed. hosts.toml files are
  read on every pull and need no restart.

Everything is a `Plan` (see `plan.py`): shown as a diff, applied atomically with backups, and a
second run changes nothing. An existing hosts.toml that is not valid TOML is reported and left
alone; the rest is still done and the command exits 1.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import shlex
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import tomlkit
import tomlkit.exceptions

from gapkit.errors import NodeError, UsageError
from gapkit.node.hosts_toml import directory_name
from gapkit.node.plan import ApplyReport, Command, FileWrite, Plan, Runner, apply, resume_pending
from gapkit.oci.auth import parse_user_password
from gapkit.oci.reference import is_registry_host, normalise_registry
from gapkit.registry.push import PushTarget, hosts_files

ARGS = PurePosixPath("/var/snap/microk8s/current/args")
CERTS_D = ARGS / "certs.d"
CONTAINERD_ENV = ARGS / "containerd-env"
CONTAINERD_TEMPLATE = ARGS / "containerd-template.toml"
KUBE_PROXY_ARGS = ARGS / "kube-proxy"
KUBE_APISERVER_ARGS = ARGS / "kube-apiserver"

#: With neither --bundle nor --registries: every upstream MicroK8s 1.22-1.36 and its core
#: addons pull from (calico, coredns, hostpath: docker.io; pause, metrics-server, ingress:
#: registry.k8s.io, k8s.gcr.io up to 1.25; metallb, cert-manager: quay.io; eksd flavours:
#: public.ecr.aws), plus ghcr.io, where many workloads live.
DEFAULT_UPSTREAMS = ("docker.io", "registry.k8s.io", "k8s.gcr.io", "quay.io", "ghcr.io",
                     "public.ecr.aws")
#: MicroK8s' cluster CIDR (`kube-proxy --cluster-cidr`) and service CIDR
#: (`kube-apiserver --service-cluster-ip-range`), when the args files do not say otherwise.
DEFAULT_CLUSTER_CIDR = "10.1.0.0/16"
DEFAULT_SERVICE_CIDR = "10.152.183.0/24"
LOCAL_NO_PROXY = ("localhost", "127.0.0.1")
RESTART = ("snap", "restart", "microk8s")
#: What `--proxy` sets, and the lower-case twins that are brought in line when already there.
PROXY_KEYS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
_PROXY_SCHEMES = ("http", "https", "socks5")
_ENV_HEADER = (
    "# Proxy for containerd, set by `gapkit node configure --proxy` (pulls go through it;\n"
    "# NO_PROXY keeps the cluster and service ranges, the nodes and the mirror direct).\n"
    "# containerd reads this file only when it starts: `snap restart microk8s` after edits.\n"
)


# ---- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorOptions:
    """`--mirror URL` and its companions, validated."""

    url: str
    target: PushTarget
    scheme: str
    ca_file: Path | None = None
    credentials: tuple[str, str] | None = None
    skip_verify: bool = False
    upstream_prefix: bool = False
    fallback: bool = True
    #: The upstreams to configure (`--registries`); None: from `bundle`, else the defaults.
    registries: tuple[str, ...] | None = None
    bundle: Path | None = None

    @property
    def hostname(self) -> str:
        """The mirror's host without port or brackets (what NO_PROXY needs)."""
        return urllib.parse.urlsplit(f"//{self.target.host}").hostname or self.target.host


@dataclass(frozen=True)
class ProxyOptions:
    """`--proxy URL`, `--no-proxy`, and the addresses that must stay direct."""

    url: str
    no_proxy: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    #: The node's own addresses; None: asked from the node (`hostname -I`).
    node_addresses: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ConfigureOptions:
    mirror: MirrorOptions | None = None
    proxy: ProxyOptions | None = None
    restart: bool = True


def _split_list(values: Iterable[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_mirror(url: str, *, ca: Path | None = None, creds: str | None = None,
                 registries: Sequence[str] = (), bundle: Path | None = None,
                 upstream_prefix: bool = False, no_fallback: bool = False,
                 insecure: bool = False) -> MirrorOptions:
    hint = "write --mirror http://HOST:PORT or --mirror https://HOST[:PORT][/PREFIX]"
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"--mirror {url!r}: say http:// or https:// (containerd speaks HTTPS "
                         "to a mirror written without a scheme)", hint=hint)
    if parts.username is not None or parts.query or parts.fragment or not parts.netloc:
        raise UsageError(f"--mirror {url!r}: give only scheme, host, port and path prefix "
                         "(credentials go in --creds)", hint=hint)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise UsageError(f"--mirror {url!r}: the port is not a number from 1 to 65535",
                         hint=hint) from None
    target = PushTarget.parse(parts.netloc + parts.path, "--mirror", hint, shown=url)
    prefix = target.prefix
    if prefix.startswith("v2/") or prefix == "v2":
        raise UsageError(f"--mirror {url!r}: give the prefix without /v2 (gapkit adds it)",
                         hint=hint)
    if ca is not None:
        if parts.scheme != "https":
            raise UsageError("--ca needs an https:// mirror")
        if not ca.is_file():
            raise UsageError(f"--ca {ca}: not a readable file")
    credentials = parse_user_password(creds) if creds is not None else None
    if registries and bundle is not None:
        raise UsageError("give --registries or --bundle, not both")
    chosen = None
    if registries:
        names = [normalise_registry(r) for r in _split_list(registries)]
        bad = [r for r in names if not is_registry_host(r)]
        if bad:
            raise UsageError(f"--registries: {', '.join(bad)} not registry host(s)",
                             hint="for example --registries docker.io,registry.k8s.io,quay.io")
        chosen = tuple(dict.fromkeys(names))
    if bundle is not None and not bundle.exists():
        raise UsageError(f"--bundle {bundle}: does not exist")
    return MirrorOptions(url.strip(), target, parts.scheme, ca,
                         credentials, insecure, upstream_prefix, not no_fallback, chosen, bundle)


def parse_proxy(url: str, *, no_proxy: Sequence[str] = (), peers: Sequence[str] = (),
                node_addresses: Sequence[str] | None = None) -> ProxyOptions:
    hint = "write --proxy http://[USER:PASSWORD@]HOST:PORT"
    text = url.strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in _PROXY_SCHEMES:
        raise UsageError(f"--proxy {url!r}: the scheme must be one of "
                         f"{', '.join(s + '://' for s in _PROXY_SCHEMES)}", hint=hint)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--proxy {url!r}: the port is not a number from 1 to 65535",
                         hint=hint) from None
    if (not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment
            or any(c.isspace() for c in text) or port == 0):
        raise UsageError(f"--proxy {url!r} is not a proxy URL", hint=hint)
    entries = _split_list(no_proxy)
    addresses = _split_list(peers) + _split_list(node_addresses or [])
    for entry in entries + addresses:
        if any(c.isspace() or c in "\"'\\$`;" for c in entry):
            raise UsageError(f"{entry!r} cannot be a NO_PROXY entry",
                             hint="give host names, addresses or CIDR ranges, comma-separated")
    return ProxyOptions(text, tuple(entries), tuple(_split_list(peers)),
                        None if node_addresses is None else tuple(_split_list(node_addresses)))


def configure_options(mirror: str | None = None, proxy: str | None = None, *,
                      ca: Path | None = None, creds: str | None = None,
                      registries: Sequence[str] = (), bundle: Path | None = None,
                      upstream_prefix: bool = False, no_fallback: bool = False,
                      insecure: bool = False, no_proxy: Sequence[str] = (),
                      peers: Sequence[str] = (), node_addresses: Sequence[str] = (),
                      restart: bool = True) -> ConfigureOptions:
    """The options of `gapkit node configure` from its flags; a bad one is a `UsageError`."""
    if mirror is None and proxy is None:
        raise UsageError("nothing to configure: give --mirror URL, --proxy URL or both")
    if mirror is None:
        given = [flag for flag, value in (("--ca", ca), ("--creds", creds), ("--bundle", bundle),
                                          ("--registries", registries or None))
                 if value is not None]
        given += [flag for flag, on in (("--upstream-prefix", upstream_prefix),
                                        ("--no-fallback", no_fallback), ("--insecure", insecure))
                  if on]
        if given:
            raise UsageError(f"{', '.join(given)} need(s) --mirror")
    if proxy is None and (no_proxy or peers or node_addresses):
        raise UsageError("--no-proxy, --peers and --node-address need --proxy")
    return ConfigureOptions(
        parse_mirror(mirror, ca=ca, creds=creds, registries=registries, bundle=bundle,
                     upstream_prefix=upstream_prefix, no_fallback=no_fallback,
                     insecure=insecure) if mirror is not None else None,
        parse_proxy(proxy, no_proxy=no_proxy, peers=peers,
                    node_addresses=node_addresses or None) if proxy is not None else None,
        restart)


# ---- planning --------------------------------------------------------------------------------


async def plan_configure(runner: Runner, options: ConfigureOptions) -> Plan:
    """Read the node through `runner` and return what configuring it takes; nothing changes."""
    plan = Plan(runner.name)
    if options.mirror is not None:
        await _plan_mirror(runner, options.mirror, plan)
    if options.proxy is not None:
        await _plan_proxy(runner, options.proxy, options.mirror, plan)
        env_changed = any(w.changed for w in plan.writes if w.path == CONTAINERD_ENV)
        if options.restart:
            plan.commands.append(Command(
                RESTART, "containerd reads containerd-env only when it starts",
                when_changed=(CONTAINERD_ENV,)))
            await resume_pending(plan, runner)
        elif env_changed:
            plan.notes.append("not restarting (--no-restart): the proxy settings take effect "
                              "after `snap restart microk8s`")
    hosts_changed = any(w.changed for w in plan.writes if w.path.is_relative_to(CERTS_D))
    if hosts_changed:
        plan.notes.append("containerd reads hosts.toml on every pull: no restart is needed "
                          "for the mirror")
    return plan


async def mirror_upstreams(mirror: MirrorOptions) -> list[str]:
    """The upstreams to configure: given, from the bundle's images, or the defaults."""
    if mirror.registries is not None:
        return list(mirror.registries)
    if mirror.bundle is None:
        return list(DEFAULT_UPSTREAMS)
    from gapkit.bundle.sources import open_image_source

    opened = await open_image_source(mirror.bundle)
    try:
        images = await opened.store.images()
    finally:
        await opened.store.close()
    if not images:
        raise UsageError(f"--bundle {mirror.bundle}: holds no named image")
    return sorted({ref.registry for ref in images})


async def _plan_mirror(runner: Runner, mirror: MirrorOptions, plan: Plan) -> None:
    upstreams = await mirror_upstreams(mirror)
    if mirror.upstream_prefix:
        ported = [u for u in upstreams if ":" in u]
        if ported:
            raise UsageError(
                f"--upstream-prefix: {', '.join(ported)} has a port, which cannot be a path "
                "component of the mirror", hint="push and configure without --upstream-prefix")
    files = hosts_files(upstreams, mirror.target, mirror.scheme, mirror.upstream_prefix,
                        mirror.ca_file is not None, mirror.credentials, mirror.skip_verify,
                        fallback=mirror.fallback)
    ca = mirror.ca_file.read_bytes() if mirror.ca_file is not None else None
    # hosts.toml with an Authorization header holds a password: root only, and not in diffs.
    mode = 0o600 if mirror.credentials else 0o644
    secrets: tuple[str, ...] = ()
    if mirror.credentials:
        secrets = (base64.b64encode(":".join(mirror.credentials).encode()).decode(),)
    for upstream, text in files.items():
        folder = CERTS_D / directory_name(upstream)
        path = folder / "hosts.toml"
        old = await runner.read_file(path)
        if old is not None:
            problem = _toml_problem(old)
            if problem is not None:
                plan.problems.append(f"{path} is not valid TOML ({problem}); left as it is, so "
                                     f"{upstream} is not mirrored: fix or remove it, then run "
                                     "again")
                continue
        if ca is not None:
            ca_path = folder / "ca.crt"
            plan.writes.append(FileWrite(ca_path, ca, await runner.read_file(ca_path), 0o644,
                                         why=f"the mirror's CA for {upstream}"))
        plan.writes.append(FileWrite(path, text.encode(), old, mode,
                                     why=f"pull {upstream} images through {mirror.url}",
                                     redact=secrets))
    ours = {directory_name(u) for u in files}
    for name in await runner.list_dir(CERTS_D) or []:
        if name not in ours and not name.startswith("."):
            plan.notes.append(f"{CERTS_D / name}: left as it is (not one of the upstreams "
                              "configured here)")
    await _check_template(runner, plan)


def _toml_problem(data: bytes) -> str | None:
    try:
        tomlkit.parse(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except tomlkit.exceptions.ParseError as exc:
        return str(exc)
    return None


async def _check_template(runner: Runner, plan: Plan) -> None:
    """containerd must read certs.d: `config_path` set, and no legacy `registry.mirrors`."""
    data = await runner.read_file(CONTAINERD_TEMPLATE)
    if data is None:
        plan.notes.append(f"{CONTAINERD_TEMPLATE} is not there (MicroK8s not installed yet?): "
                          "the hosts.toml files take effect once it is (1.23 or newer)")
        return
    if _toml_problem(data) is not None:
        plan.notes.append(f"{CONTAINERD_TEMPLATE} could not be read as TOML; check that it "
                          "sets config_path = \"${SNAP_DATA}/args/certs.d\"")
        return
    doc = tomlkit.parse(data.decode())
    registry = doc.get("plugins", {}).get("io.containerd.grpc.v1.cri", {}).get("registry", {})
    config_path = str(registry.get("config_path", "") or "")
    if not config_path:
        plan.problems.append(
            f"{CONTAINERD_TEMPLATE} sets no config_path under "
            '[plugins."io.containerd.grpc.v1.cri".registry], so containerd ignores certs.d '
            "(MicroK8s 1.22 and older, or an edited template): add "
            'config_path = "${SNAP_DATA}/args/certs.d" there')
    elif "${SNAP_DATA}/args/certs.d" not in config_path.split(":") and str(CERTS_D) not in \
            config_path.split(":"):
        plan.notes.append(f"{CONTAINERD_TEMPLATE} sets config_path = {config_path!r}, not "
                          "${SNAP_DATA}/args/certs.d: containerd will not read what is written "
                          "here")
    if "mirrors" in registry or "configs" in registry:
        plan.problems.append(
            f"{CONTAINERD_TEMPLATE} has legacy registry.mirrors/configs next to config_path; "
            "containerd refuses to start with both (microk8s#2897): remove them")


async def _plan_proxy(runner: Runner, proxy: ProxyOptions, mirror: MirrorOptions | None,
                      plan: Plan) -> None:
    ranges = await _cluster_ranges(runner)
    if proxy.node_addresses is None:
        addresses = await _node_addresses(runner, plan)
    else:
        addresses = list(proxy.node_addresses)
    networks = []
    for text in ranges:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            continue
    covered = [a for a in addresses if _in_networks(a, networks)]
    entries = [*ranges, *LOCAL_NO_PROXY, *(a for a in addresses if a not in covered),
               *proxy.peers, *([mirror.hostname] if mirror is not None else []),
               *proxy.no_proxy]
    no_proxy = ",".join(dict.fromkeys(entries))
    wanted = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": no_proxy}
    old = await runner.read_file(CONTAINERD_ENV)
    if old is None:
        plan.notes.append(f"{CONTAINERD_ENV} is not there (MicroK8s not installed yet?): it is "
                          "created with the proxy settings only")
    try:
        text = (old or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise NodeError(f"{runner.name}: {CONTAINERD_ENV} is not UTF-8 text; left as it is",
                        hint="look at the file; it should be a shell file") from None
    content = set_env_vars(text, wanted, _ENV_HEADER)
    password = urllib.parse.urlsplit(proxy.url).password
    # A proxy password makes the file root-only, and stays out of diffs.
    plan.writes.append(FileWrite(CONTAINERD_ENV, content.encode(), old,
                                 0o600 if password else 0o644,
                                 why=f"containerd pulls through the proxy {_redacted(proxy.url)}",
                                 redact=(password,) if password else ()))


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _in_networks(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


async def _cluster_ranges(runner: Runner) -> list[str]:
    """The cluster and service CIDRs from the args files (MicroK8s' defaults otherwise)."""
    cluster = _flag_value(await runner.read_file(KUBE_PROXY_ARGS), "--cluster-cidr")
    service = _flag_value(await runner.read_file(KUBE_APISERVER_ARGS),
                          "--service-cluster-ip-range")
    return [*_split_list([cluster or DEFAULT_CLUSTER_CIDR]),
            *_split_list([service or DEFAULT_SERVICE_CIDR])]


def _flag_value(data: bytes | None, flag: str) -> str | None:
    if data is None:
        return None
    value = None
    for line in data.decode("utf-8", "replace").splitlines():
        words = line.strip().split(maxsplit=1)
        if not words:
            continue
        if words[0].startswith(flag + "="):
            value = words[0][len(flag) + 1:]
        elif words[0] == flag and len(words) == 2:
            value = words[1].strip()
    return value.strip("\"'") if value else None


async def _node_addresses(runner: Runner, plan: Plan) -> list[str]:
    result = await runner.run(["hostname", "-I"])
    if result.returncode != 0:
        plan.notes.append("could not list this node's addresses (`hostname -I` failed); "
                          "give them with --node-address so they stay off the proxy")
        return []
    out = []
    for word in result.stdout.split():
        try:
            ip = ipaddress.ip_address(word)
        except ValueError:
            continue
        if not (ip.is_link_local or ip.is_loopback):
            out.append(str(ip))
    return out


# ---- containerd-env, a shell file --------------------------------------------------------------

_ASSIGNMENT = re.compile(
    r"^(?P<lead>\s*)(?P<export>export\s+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$", re.DOTALL)


def set_env_vars(text: str, wanted: dict[str, str], header: str = "") -> str:
    """`text` (a shell file sourced with `set -a`) with each `wanted` variable set once.

    Every other line and comment stays. The first assignment of a wanted variable is replaced
    in place (kept byte for byte when it already holds the value), later ones are dropped, and
    variables not there are appended after `header`. A lower-case twin already in the file
    (`https_proxy` for `HTTPS_PROXY`) gets the same value, so no stale one is left behind.
    """
    twins = {name.lower(): value for name, value in wanted.items() if name.lower() not in wanted}
    targets = {**wanted, **twins}
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(lines):
        match = _ASSIGNMENT.match(lines[i])
        if match is None or match["name"] not in targets:
            out.append(lines[i])
            i += 1
            continue
        chunk, j = lines[i], i + 1
        while not _complete(chunk) and j < len(lines):
            chunk, j = chunk + lines[j], j + 1
        i = j
        name = match["name"]
        if name in seen:
            continue
        seen.add(name)
        value = targets[name]
        current = _literal_value(chunk[match.end("name") + 1:])
        if current == value:
            out.append(chunk if chunk.endswith("\n") else chunk + "\n")
        else:
            out.append(f"{match['lead']}{match['export'] or ''}{name}={shlex.quote(value)}\n")
    missing = [name for name in wanted if name not in seen]
    if missing:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        if out and out[-1].strip():
            out.append("\n")
        out.append(header)
        out += [f"{name}={shlex.quote(wanted[name])}\n" for name in missing]
    return "".join(out)


def _complete(chunk: str) -> bool:
    """Whether a shell assignment ends here (no open quote, no trailing backslash)."""
    body = chunk.rstrip("\n")
    if body.endswith("\\") and not body.endswith("\\\\"):
        return False
    try:
        shlex.split(body, comments=True)
    except ValueError:
        return False
    return True


def _literal_value(rhs: str) -> str | None:
    """The value a plain literal right-hand side assigns; None when the shell would compute it."""
    if "$" in rhs or "`" in rhs:
        return None
    try:
        words = shlex.split(rhs, comments=True)
    except ValueError:
        return None
    if rhs[:1].isspace():
        return "" if not words else None
    if len(words) > 1:
        return None
    return words[0] if words else ""


# ---- applying --------------------------------------------------------------------------------


@dataclass
class ConfigureResult:
    plan: Plan
    #: None for --dry-run.
    applied: ApplyReport | None = None

    def to_json(self) -> dict[str, object]:
        return {"plan": self.plan.to_json(),
                "applied": self.applied.to_json() if self.applied is not None else None}

    def raise_for_problems(self) -> None:
        """Exit 1 at the end when planning left something undone (after doing the rest)."""
        if self.plan.problems:
            raise NodeError(f"{self.plan.node}: {len(self.plan.problems)} thing(s) left undone: "
                            + "; ".join(self.plan.problems),
                            hint="everything else was " + ("planned" if self.applied is None
                                                           else "done") + "; see the plan above")


async def configure_node(runner: Runner, options: ConfigureOptions,
                         dry_run: bool = False) -> ConfigureResult:
    """Plan, and unless `dry_run`, apply: `gapkit node configure`."""
    plan = await plan_configure(runner, options)
    if dry_run:
        return ConfigureResult(plan)
    return ConfigureResult(plan, await apply(plan, runner))
