"""`gapkit node check`: can this node run MicroK8s, before anything is installed?

Each check is a small function that returns `Check` values (PASS / WARN / FAIL, what was found,
and the fix). State of the node (routes, addresses, listening sockets, names, disk, snapd,
MicroK8s) is read through a `Runner`, so the same checks run on a remote node once an SSH runner
exists; `LocalRunner(root=...)` feeds them fake `/proc` files in tests. What needs sockets (the
peer port matrix, the proxy CONNECT, the mirror requests) runs on the machine gapkit runs on, see
`gapkit.node.probes`: run `gapkit node check` on the node whose view of the network counts.

The facts behind the checks (data/microk8s/README.md §5, §6, §8):

- kube-apiserver, kubelet and kube-proxy pick the node's address from the default route's
  interface and fail without one ("no default routes found in /proc/net/route"); MicroK8s' own
  join line names the first IPv4 address of that interface. Air-gapped networks often have no
  gateway, so the fix is a link-scope default route, made persistent.
- Nodes reach each other on 16443, 25000, 19001 (control plane), 10250 and 4789/udp.
- MicroK8s <= 1.27 refuses a join whose host name does not resolve to the joiner's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from gapkit.errors import UsageError
from gapkit.node.plan import LocalRunner, Runner
from gapkit.node.ports import NodePort, node_ports
from gapkit.node.probes import (
    ImageOnMirror,
    MirrorAnswer,
    MirrorProbe,
    MirrorURL,
    PortProbe,
    ProxyProbe,
    ProxyURL,
    RegistryTarget,
    probe_proxy,
    probe_tcp,
    probe_udp,
)
from gapkit.oci.auth import parse_user_password
from gapkit.oci.reference import Reference
from gapkit.units import human_bytes

Status = Literal["PASS", "WARN", "FAIL"]
STATUSES: tuple[Status, ...] = ("PASS", "WARN", "FAIL")

#: Upstreams a MicroK8s node pulls from when no bundle says otherwise.
DEFAULT_UPSTREAMS = ("docker.io", "registry.k8s.io", "quay.io")
#: Programs of the MicroK8s snap that hold its ports (`comm`, at most 15 characters).
MICROK8S_PROCESSES = frozenset({
    "kubelite", "kube-apiserver", "kubelet", "kube-proxy", "cluster-agent", "k8s-dqlite",
    "etcd", "apiserver-proxy", "apiserver-kicker", "traefik", "calico-node", "flanneld",
    "containerd"})
#: Interfaces of CNIs and containers: never where a node's default route should go.
VIRTUAL_INTERFACES = re.compile(r"^(lo|docker\d*|cni\d*|flannel\.\d+|vxlan\.calico|cali.*|veth.*"
                                r"|virbr\d*|br-.*|tunl\d*|ovn\d*|lxdbr\d*)$")
RTF_UP = 0x0001
RTF_REJECT = 0x0200
PROC_ROUTE = PurePosixPath("/proc/net/route")
PROC_IPV6_ROUTE = PurePosixPath("/proc/net/ipv6_route")
SNAP_PATHS = (PurePosixPath("/var/snap"), PurePosixPath("/var/lib/snapd"))
#: Free space wanted when no bundle tells the real sizes: the microk8s, base and snapd snaps
#: (~400 MB) and the core images unpacked (~1.5 GB), with room to spare.
MIN_FREE_WITHOUT_BUNDLE = 4 * 1000**3
#: Images take their compressed size in containerd's content store plus the unpacked layers
#: (about twice as much again): three times the blob bytes, plus MicroK8s' own state.
IMAGE_SPACE_FACTOR = 3
MICROK8S_STATE_BYTES = 1000**3


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, what was found, how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    #: Which kind of check: route, address, ports, names, proxy, mirror, disk, snapd, microk8s.
    area: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "area": self.area, "status": self.status,
                "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class Route:
    family: Literal[4, 6]
    interface: str
    gateway: str | None
    metric: int

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else " (no gateway: link scope)"
        return f"dev {self.interface}{via}"


@dataclass(frozen=True)
class Interface:
    name: str
    up: bool
    #: (family 4 or 6, address, prefix length, scope)
    addresses: tuple[tuple[int, str, int, str], ...] = ()

    def first_ipv4(self) -> str | None:
        for family, address, _, scope in self.addresses:
            if family == 4 and scope != "host":
                return address
        return None


@dataclass(frozen=True)
class Listener:
    protocol: Literal["tcp", "udp"]
    address: str
    port: int
    process: str = ""
    pid: int | None = None


@dataclass(frozen=True)
class LocalPort:
    """Who holds one of MicroK8s' ports on this node."""

    port: NodePort
    state: Literal["free", "microk8s", "gapkit-listen", "other"]
    holder: str = ""

    @property
    def label(self) -> str:
        return {"free": "free", "microk8s": f"MicroK8s ({self.holder})",
                "gapkit-listen": "gapkit node listen", "other": f"in use: {self.holder}"}[self.state]


@dataclass
class PortMatrix:
    """Nodes x ports: this node's own ports (free or held), then every peer as seen from here."""

    ports: list[NodePort]
    local: dict[str, LocalPort] = field(default_factory=dict)
    peers: dict[str, dict[str, PortProbe]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        nodes: dict[str, dict[str, str]] = {}
        if self.local:
            nodes["local"] = {label: lp.label for label, lp in self.local.items()}
        for peer, probes in self.peers.items():
            nodes[peer] = {label: p.state for label, p in probes.items()}
        return {"ports": [p.label for p in self.ports], "nodes": nodes}


@dataclass(frozen=True)
class Advertise:
    interface: str | None
    address: str | None

    def to_json(self) -> dict[str, str | None]:
        return {"interface": self.interface, "address": self.address}


@dataclass
class CheckReport:
    node: str
    checks: list[Check] = field(default_factory=list)
    matrix: PortMatrix | None = None
    advertise: Advertise | None = None

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def counts(self) -> dict[str, int]:
        found = Counter(c.status for c in self.checks)
        return {s: found.get(s, 0) for s in STATUSES}

    def find(self, area: str) -> list[Check]:
        return [c for c in self.checks if c.area == area]

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "ok": self.ok, "counts": self.counts(),
                "checks": [c.to_json() for c in self.checks],
                "advertise": self.advertise.to_json() if self.advertise else None,
                "ports": self.matrix.to_json() if self.matrix else None}


@dataclass(frozen=True)
class CheckOptions:
    peers: tuple[str, ...] = ()
    proxy: str | None = None
    #: Upstreams to reach through the proxy; default: the bundle's, else DEFAULT_UPSTREAMS.
    registries: tuple[str, ...] = ()
    #: Extra CA for upstream registries seen through the proxy (a TLS-inspecting proxy's CA).
    upstream_ca: Path | None = None
    mirror: str | None = None
    ca: Path | None = None
    plain_http: bool = False
    creds: tuple[str, str] | None = None
    bundle: Path | None = None
    etcd: bool = False
    #: Seconds to wait for a TCP connect, a UDP answer, a proxy or a mirror.
    timeout: float = 3.0


@dataclass
class BundleFacts:
    """What a check needs to know of a bundle (or an image tar or layout)."""

    path: Path
    images: list[tuple[Reference, str]]
    microk8s: str | None = None
    snap_bytes: int = 0
    image_bytes: int = 0

    @property
    def registries(self) -> list[str]:
        return sorted({ref.registry for ref, _ in self.images})


# --- reading the node's state ------------------------------------------------------------------


def _hex_ipv4(text: str) -> str:
    return socket.inet_ntoa(bytes.fromhex(text)[::-1])


def parse_ipv4_default_routes(text: str) -> list[Route]:
    """Default routes from `/proc/net/route`, lowest metric first."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, gateway, flags, metric, mask = (fields[0], fields[1], fields[2],
                                                     int(fields[3], 16), fields[6], fields[7])
        if dest != "00000000" or mask != "00000000" or not flags & RTF_UP or flags & RTF_REJECT:
            continue
        gw = None if gateway == "00000000" else _hex_ipv4(gateway)
        routes.append(Route(4, iface, gw, int(metric)))
    return sorted(routes, key=lambda r: r.metric)


def parse_ipv6_default_routes(text: str) -> list[Route]:
    """Default routes from `/proc/net/ipv6_route` (the kernel's `lo` reject entries left out)."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        dest, plen, nexthop, metric, flags, iface = (fields[0], fields[1], fields[4], fields[5],
                                                     int(fields[8], 16), fields[9])
        if int(dest, 16) != 0 or int(plen, 16) != 0 or not flags & RTF_UP or flags & RTF_REJECT:
            continue
        gw = None if int(nexthop, 16) == 0 else str(ipaddress.IPv6Address(bytes.fromhex(nexthop)))
        routes.append(Route(6, iface, gw, int(metric, 16)))
    return sorted(routes, key=lambda r: r.metric)


def parse_ip_addr_json(text: str) -> list[Interface]:
    """`ip -j addr show` -> interfaces with their addresses."""
    try:
        doc = json.loads(text or "[]")
    except ValueError:
        return []
    out = []
    for item in doc if isinstance(doc, list) else []:
        if not isinstance(item, dict) or "ifname" not in item:
            continue
        addresses = []
        for info in item.get("addr_info") or []:
            family = {"inet": 4, "inet6": 6}.get(info.get("family", ""))
            if family and info.get("local"):
                addresses.append((family, str(info["local"]), int(info.get("prefixlen", 0)),
                                  str(info.get("scope", ""))))
        flags = item.get("flags") or []
        out.append(Interface(str(item["ifname"]), "UP" in flags, tuple(addresses)))
    return out


_USERS_RE = re.compile(r'\("([^"]*)",pid=(\d+)')


def _split_address(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]").split("%", 1)[0]
    return host, int(port)


def parse_ss(text: str) -> list[Listener]:
    """`ss -Hlntup`: listening TCP and bound UDP sockets, with the owning process if shown."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in ("tcp", "udp"):
            continue
        split = _split_address(fields[4])
        if split is None:
            continue
        users = _USERS_RE.search(line)
        process, pid = (users.group(1), int(users.group(2))) if users else ("", None)
        protocol: Literal["tcp", "udp"] = "tcp" if fields[0] == "tcp" else "udp"
        out.append(Listener(protocol, split[0], split[1], process, pid))
    return out


def parse_proc_net(text: str, protocol: Literal["tcp", "udp"]) -> list[Listener]:
    """`/proc/net/{tcp,udp}{,6}` when `ss` is missing: sockets, without their process."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        address, port = fields[1].split(":")
        state = fields[3]
        if protocol == "tcp" and state != "0A":  # LISTEN
            continue
        if protocol == "udp" and state != "07":  # unconnected
            continue
        host = (_hex_ipv4(address) if len(address) == 8 else
                str(ipaddress.IPv6Address(b"".join(bytes.fromhex(address[i:i + 8])[::-1]
                                                   for i in range(0, 32, 8)))))
        out.append(Listener(protocol, host, int(port, 16)))
    return out


def parse_df(text: str) -> list[tuple[int, str]]:
    """`df -Pk` -> (available bytes, mount point) per line."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[3].isdigit():
            continue
        out.append((int(fields[3]) * 1024, " ".join(fields[5:])))
    return out


def parse_snap_version(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            values[key] = value.strip()
    return values


def parse_snap_list(text: str, name: str = "microk8s") -> dict[str, str] | None:
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    header = [h.lower() for h in lines[0]]
    for row in lines[1:]:
        if row and row[0] == name:
            return dict(zip(header, row, strict=False))
    return None


def release_of(version: str | None) -> tuple[int, int] | None:
    """`1.27`, `1.27-strict`, `v1.27.4`, `1.27/stable` -> (1, 27)."""
    if not version:
        return None
    match = re.search(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- default route and address -------------------------------------------------------------------


NETPLAN_SNIPPET = """\
# /etc/netplan/70-airgap.yaml (as MicroK8s' own airgap CI writes it), then `netplan apply`
network:
  version: 2
  ethernets:
    {iface}:
      dhcp4-overrides: {{ use-routes: false }}
      routes: [{{ to: 0.0.0.0/0, scope: link }}]
"""
NETWORKD_SNIPPET = """\
# /etc/systemd/network/<the .network file of {iface}>.d/70-airgap-route.conf,
# then `networkctl reload`
[Route]
Destination=0.0.0.0/0
Scope=link
"""
IFUPDOWN_SNIPPET = """\
# /etc/network/interfaces, in the `iface {iface} inet ...` stanza
    post-up ip route replace default dev {iface}
"""


def persistent_route_snippets(iface: str) -> dict[str, str]:
    """Ways to keep a link-scope default route on `iface` after a reboot, per network stack."""
    return {"netplan": NETPLAN_SNIPPET.format(iface=iface),
            "systemd-networkd": NETWORKD_SNIPPET.format(iface=iface),
            "ifupdown": IFUPDOWN_SNIPPET.format(iface=iface)}


def route_fix(iface: str) -> str:
    snippets = persistent_route_snippets(iface)
    return (f"ip route add default dev {iface}\n"
            "then keep it after a reboot, with what the node uses:\n"
            + "\n".join(snippets.values()))


def pick_interface(interfaces: Sequence[Interface], towards_peers: Sequence[str]) -> str | None:
    """The interface a default route should use: the one peers are reached through, else the
    first real interface that is up and has an IPv4 address."""
    for name in towards_peers:
        if name and not VIRTUAL_INTERFACES.match(name):
            return name
    for iface in interfaces:
        if iface.up and not VIRTUAL_INTERFACES.match(iface.name) and iface.first_ipv4():
            return iface.name
    for iface in interfaces:
        if iface.up and not VIRTUAL_INTERFACES.match(iface.name):
            return iface.name
    return None


def route_checks(v4: Sequence[Route], v6: Sequence[Route], interfaces: Sequence[Interface],
                 towards_peers: Sequence[str] = ()) -> Check:
    v6_text = f"IPv6 default {v6[0]}" if v6 else "no IPv6 default route"
    if v4:
        return Check("default route", "PASS", f"IPv4 default {v4[0]}; {v6_text}", area="route")
    iface = pick_interface(interfaces, towards_peers) or "<interface>"
    if v6:
        return Check(
            "default route", "WARN",
            f"no IPv4 default route ({v6_text}): MicroK8s joins and Calico use IPv4, and the "
            "join line would read `none:25000/...`", route_fix(iface), area="route")
    return Check(
        "default route", "FAIL",
        "no default route (IPv4 or IPv6): kube-apiserver, kubelet and kube-proxy cannot pick the "
        "node's address (\"no default routes found in /proc/net/route\") and containerd waits "
        f"at every start; a gateway is not needed, a link-scope route on {iface} is enough",
        route_fix(iface), area="route")


def advertise_check(advertise: Advertise, towards: dict[str, tuple[str, str]]) -> Check:
    """Which address MicroK8s will advertise, and whether peers are reached on that network.

    `towards` maps each peer to (interface, source address) of the route to it.
    """
    if advertise.address is None:
        return Check("advertise address", "FAIL",
                     "MicroK8s would advertise no address: `microk8s add-node` would print "
                     "`microk8s join none:25000/...`",
                     "add a default route (see \"default route\") on the interface the nodes "
                     "share", area="address")
    detail = (f"MicroK8s will advertise {advertise.address} "
              f"(the first IPv4 address of {advertise.interface}, the default route's interface)")
    elsewhere = {peer: via for peer, via in towards.items()
                 if via[0] and via[0] != advertise.interface}
    if elsewhere:
        shown = ", ".join(f"{peer} through {iface} ({src})" for peer, (iface, src) in elsewhere.items())
        return Check("advertise address", "WARN", f"{detail}, but peers are reached otherwise: {shown}",
                     "put the default route on the interface the nodes share, or join with the "
                     "address on that interface (`microk8s add-node` lists every address); a node's "
                     "dqlite address cannot be changed after it joins", area="address")
    return Check("advertise address", "PASS", detail, area="address")


async def _read_text(runner: Runner, path: PurePosixPath) -> str:
    data = await runner.read_file(path)
    return data.decode("utf-8", "replace") if data else ""


async def read_interfaces(runner: Runner) -> list[Interface]:
    result = await runner.run(["ip", "-j", "addr", "show"])
    return parse_ip_addr_json(result.stdout) if result.returncode == 0 else []


async def route_to(runner: Runner, destination: str) -> tuple[str, str]:
    """(interface, source address) of the route to `destination`, or ("", "")."""
    result = await runner.run(["ip", "-j", "route", "get", destination])
    if result.returncode != 0:
        return "", ""
    try:
        doc = json.loads(result.stdout)
        return str(doc[0].get("dev", "")), str(doc[0].get("prefsrc", ""))
    except (ValueError, IndexError, AttributeError):
        return "", ""


async def find_advertise(runner: Runner, v4: Sequence[Route],
                         interfaces: Sequence[Interface]) -> Advertise:
    """As MicroK8s' `get_default_ip`: the first IPv4 address of the default route's interface,
    else the source address of `ip route get 255.255.255.255`, else none."""
    if v4:
        for iface in interfaces:
            if iface.name == v4[0].interface and iface.first_ipv4():
                return Advertise(iface.name, iface.first_ipv4())
    dev, src = await route_to(runner, "255.255.255.255")
    return Advertise(dev or None, src or None)


# --- ports -------------------------------------------------------------------------------------


async def read_listeners(runner: Runner) -> tuple[list[Listener], bool]:
    """Listening sockets, and whether their processes are known (`ss`) or not (`/proc/net`)."""
    result = await runner.run(["ss", "-Hlntup"])
    if result.returncode == 0:
        return parse_ss(result.stdout), True
    out: list[Listener] = []
    for name, protocol in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        text = await _read_text(runner, PurePosixPath("/proc/net") / name)
        out += parse_proc_net(text, "tcp" if protocol == "tcp" else "udp")
    return out, False


async def _cmdline(runner: Runner, pid: int) -> str:
    data = await runner.read_file(PurePosixPath(f"/proc/{pid}/cmdline"))
    return (data or b"").replace(b"\0", b" ").decode("utf-8", "replace")


async def local_ports(runner: Runner, ports: Sequence[NodePort], listeners: Sequence[Listener],
                      interfaces: Sequence[Interface]) -> dict[str, LocalPort]:
    names = {i.name for i in interfaces}
    out: dict[str, LocalPort] = {}
    for port in ports:
        holders = [s for s in listeners if s.port == port.port and s.protocol == port.protocol]
        if not holders:
            out[port.label] = LocalPort(port, "free")
            continue
        holder = holders[0]
        cmdline = await _cmdline(runner, holder.pid) if holder.pid else ""
        who = f"{holder.process} (pid {holder.pid})" if holder.pid else ""
        if "gapkit" in cmdline and "listen" in cmdline:
            out[port.label] = LocalPort(port, "gapkit-listen", who)
        elif holder.process in MICROK8S_PROCESSES or "/snap/microk8s/" in cmdline:
            out[port.label] = LocalPort(port, "microk8s", holder.process)
        elif not holder.process and port.protocol == "udp" and names & {"vxlan.calico", "flannel.1"}:
            vxlan = sorted(names & {"vxlan.calico", "flannel.1"})[0]
            out[port.label] = LocalPort(port, "microk8s", f"kernel VXLAN {vxlan}")
        else:
            out[port.label] = LocalPort(port, "other", who or (
                "the kernel (a VXLAN device?)" if port.protocol == "udp" else "unknown process"))
    return out


def local_ports_check(ports: dict[str, LocalPort], processes_known: bool) -> Check:
    others = [p for p in ports.values() if p.state == "other"]
    listening = [p for p in ports.values() if p.state == "gapkit-listen"]
    detail = ", ".join(f"{label} {p.label}" for label, p in ports.items())
    if not processes_known:
        detail += " (owners unknown: `ss` is not installed)"
    if others:
        fix = "; ".join(f"stop {p.holder} or move it off {p.port.label}: MicroK8s' "
                        f"{p.port.service or 'service'} needs that port" for p in others)
        return Check("local ports", "FAIL", detail, fix, area="ports")
    if listening:
        return Check("local ports", "WARN", detail,
                     "stop `gapkit node listen` before installing MicroK8s", area="ports")
    return Check("local ports", "PASS", detail, area="ports")


async def probe_peer(peer: str, ports: Sequence[NodePort], timeout: float) -> dict[str, PortProbe]:
    probes = await asyncio.gather(*(
        probe_tcp(peer, p.port, timeout) if p.protocol == "tcp" else probe_udp(peer, p.port, timeout)
        for p in ports))
    return {p.label: probe for p, probe in zip(ports, probes, strict=True)}


def peer_check(peer: str, ports: Sequence[NodePort], probes: dict[str, PortProbe],
               this_address: str | None = None) -> Check:
    """One peer's ports as seen from here: FAIL unless every TCP port connects."""
    listener = next((p.listener for p in probes.values() if p.listener), None)
    detail = ", ".join(f"{label} {probe.state}" for label, probe in probes.items())
    if listener:
        detail += f" (`gapkit node listen` on {listener} answers)"
    by_state: dict[str, list[NodePort]] = {}
    for port in ports:
        probe = probes[port.label]
        if probe.state != "connected":
            by_state.setdefault(probe.state, []).append(port)

    def names(state: str) -> str:
        return ", ".join(p.label for p in by_state[state])

    fixes = []
    status: Status = "PASS"
    if "refused" in by_state:
        status = "FAIL"
        fixes.append(f"{names('refused')}: nothing listens on {peer}: before MicroK8s is installed "
                     f"there, run `gapkit node listen` on {peer} and check again; if MicroK8s runs "
                     "there, that service is down, or a firewall rejects the port")
    if "timed out" in by_state:
        status = "FAIL"
        source = f" from {this_address}" if this_address else ""
        fixes.append(f"{names('timed out')}: filtered (packets dropped): open them on {peer}"
                     f"{source}, e.g. `iptables -I INPUT -p tcp --dport PORT -j ACCEPT` or "
                     "`ufw allow proto tcp to any port PORT`, and in any firewall between")
    if "unreachable" in by_state:
        status = "FAIL"
        fixes.append(f"{peer} is unreachable from this node (no route): check its address, the "
                     "subnet mask and the routes")
    if "error" in by_state:
        status = "FAIL"
        errors = {probes[p.label].error for p in by_state["error"]}
        fixes.append(f"{names('error')}: {'; '.join(sorted(errors))}")
    if "no answer" in by_state:
        if listener:
            status = "FAIL"
            fixes.append(f"{names('no answer')}: `gapkit node listen` runs on {peer} but no UDP "
                         "answer came back: the port is filtered, open it (VXLAN carries pod "
                         "traffic between nodes)")
        else:
            status = "WARN" if status == "PASS" else status
            fixes.append(f"{names('no answer')}: no answer (UDP cannot tell open from filtered); "
                         f"run `gapkit node listen` on {peer} to know")
    return Check(f"peer {peer}", status, detail, "\n".join(fixes), area="ports")


# --- names ---------------------------------------------------------------------------------------


async def resolve(runner: Runner, name: str, timeout: float = 3.0) -> list[str]:
    """Addresses of `name` as the node's resolver gives them (`getent ahosts`), waiting at most
    `timeout` seconds: an air-gapped node's DNS server is often unreachable."""
    result = await runner.run(["timeout", f"{timeout:g}", "getent", "ahosts", name])
    if result.returncode == 127:
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(name, None),
                                           timeout)
        except (OSError, asyncio.TimeoutError):
            return []
        return sorted({str(info[4][0]) for info in infos})
    if result.returncode != 0:
        return []
    return sorted({line.split()[0] for line in result.stdout.splitlines() if line.strip()})


def names_check(entries: Sequence[tuple[str, str | None, list[str]]],
                release: tuple[int, int] | None) -> Check:
    """`entries`: (name, the address it should resolve to or None, what it resolves to)."""
    problems = []
    shown = []
    for name, expected, found in entries:
        if not found:
            shown.append(f"{name}: does not resolve")
            problems.append((name, expected))
        elif expected is not None and expected not in found:
            shown.append(f"{name} -> {', '.join(found)}, not {expected}")
            problems.append((name, expected))
        else:
            shown.append(f"{name} -> {', '.join(found)}")
    detail = "; ".join(shown)
    needed = release is None or release <= (1, 27)
    if not problems:
        return Check("host names", "PASS", detail, area="names")
    fix = "add to /etc/hosts on every node: " + "; ".join(
        f"`{expected or '<its address>'} {name}`" for name, expected in problems)
    if not needed:
        return Check("host names", "PASS",
                     f"{detail} (MicroK8s {release[0]}.{release[1]} joins by address; names are "
                     "not needed)" if release else detail, area="names")
    why = ("MicroK8s <= 1.27 refuses a join whose host name does not resolve to the joining "
           "node's address" + ("" if release else " (release unknown: give --bundle)"))
    return Check("host names", "WARN", f"{detail}: {why}", fix, area="names")


# --- proxy and mirror ------------------------------------------------------------------------------


def proxy_check(proxy: ProxyURL, probe: ProxyProbe) -> Check:
    target = probe.registry
    name = f"proxy -> {target.name}"
    if probe.ok:
        realm = f"; token service {probe.token_realm} reachable too" if probe.token_realm else ""
        return Check(name, "PASS",
                     f"CONNECT {target.authority} through {proxy}: {probe.connect_status}; "
                     f"GET /v2/ -> {probe.v2_status}{realm}", area="proxy")
    fixes = {
        "proxy": f"check the proxy URL and that {proxy} runs and lets this node in",
        "connect": (f"allow CONNECT to {target.authority} in the proxy (tinyproxy: `ConnectPort "
                    f"{target.port}`, squid: `http_access` for that host and port); a 407 wants "
                    "credentials in the URL: --proxy http://USER:PASS@HOST:PORT"),
        "tls": ("the proxy seems to inspect TLS: give its CA with --upstream-ca to check, and "
                "add it to the node's trust store (/usr/local/share/ca-certificates, then "
                "`update-ca-certificates`) so containerd trusts it"),
        "v2": f"the proxy reached {target.host} but the answer is not a registry's",
        "realm": (f"allow the token service {probe.token_realm} in the proxy as well: pulls from "
                  f"{target.name} fetch a token there first"),
    }
    detail = "; ".join(p for p in (probe.problem, probe.realm_problem) if p)
    return Check(name, "FAIL", detail, fixes.get(probe.stage, ""), area="proxy")


def mirror_ping_check(mirror: MirrorURL, answer: MirrorAnswer, ca: Path | None,
                      creds: bool) -> Check:
    name = "mirror /v2/"
    where = f"{mirror.base}/v2/"
    if answer.status == 200:
        trusted = f" (TLS verified with {ca})" if ca else (
            " (TLS verified with the system's CAs)" if mirror.scheme == "https" else " (plain HTTP)")
        return Check(name, "PASS", f"{where} -> 200{trusted}", area="mirror")
    if answer.status == 401:
        if creds:
            return Check(name, "FAIL", f"{where} -> 401 with the credentials given",
                         "check the user and password (htpasswd entries must be bcrypt)",
                         area="mirror")
        return Check(name, "WARN", f"{where} -> 401: the mirror wants credentials",
                     "pass --creds USER:PASS here, and to `gapkit node configure --mirror` "
                     "(it writes them into hosts.toml)", area="mirror")
    if answer.tls:
        fix = ("give the mirror's CA with --ca FILE (`gapkit node configure` copies it next "
               "to hosts.toml as ca.crt)" if "certificate" in answer.error else
               "if the mirror speaks plain HTTP, write http:// (or --plain-http)")
        return Check(name, "FAIL", f"{where}: {answer.error}", fix, area="mirror")
    if answer.status is None:
        hint = "check the address and port, and that the registry runs"
        if "Connection reset" in answer.error or "bad answer" in answer.error:
            hint = "a mirror over HTTPS needs https:// (and --ca); over HTTP, http://"
        return Check(name, "FAIL", f"{where}: {answer.error}", hint, area="mirror")
    extra = (": plain HTTP to an HTTPS server? write https://" if answer.status == 400
             and mirror.scheme == "http" else "")
    return Check(name, "FAIL", f"{where} -> {answer.status}, not 200 or 401{extra}",
                 "point --mirror at the registry's root URL", area="mirror")


def _why_missing(found: ImageOnMirror) -> str:
    """Nothing for a plain 404; otherwise what the mirror answered instead."""
    answer = found.ns
    if answer.status == 404:
        return ""
    return f" ({answer.error or answer.status})"


def mirror_images_check(mirror: MirrorURL, found: Sequence[ImageOnMirror]) -> Check:
    name = "mirror images"
    missing = [f.reference + _why_missing(f) for f in found if f.layout is None]
    flat_only = [f.reference for f in found if f.layout == "flat-only"]
    layouts = Counter(f.layout for f in found if f.layout)
    different = [f.reference for f in found
                 if f.layout and f.expected and f.digest and f.digest != f.expected]
    serves = []
    if layouts["flat"]:
        serves.append(f"{layouts['flat']} by flat name (`?ns=` ignored or matched)")
    if layouts["ns"]:
        serves.append(f"{layouts['ns']} only with `?ns=` (an ns-aware server, as `gapkit registry "
                      "serve`)")
    if layouts["upstream-prefix"]:
        serves.append(f"{layouts['upstream-prefix']} under upstream prefixes "
                      f"({mirror.authority}/docker.io/...: hosts.toml needs override_path, as "
                      "`node configure --upstream-prefix` writes)")
    if flat_only:
        serves.append(f"{len(flat_only)} by flat name but not with `?ns=`")
    detail = f"{len(found) - len(missing)} of {len(found)} image(s) resolvable: " + (
        "; ".join(serves) or "none")
    fixes = []
    status: Status = "PASS"
    if missing:
        status = "FAIL"
        detail += "; missing: " + ", ".join(missing)
        fixes.append(f"push them: `gapkit registry push BUNDLE --to {mirror.authority}"
                     f"{'/' + mirror.prefix if mirror.prefix else ''}`"
                     " (or serve the bundle with `gapkit registry serve`)")
    if flat_only:
        status = "FAIL"
        detail += "; answer without ?ns= only: " + ", ".join(flat_only)
        fixes.append("containerd adds ?ns=<upstream> to every request to a mirror: this mirror "
                     "must accept it")
    if different:
        status = "FAIL" if status == "FAIL" else "WARN"
        detail += "; a different digest than the bundle's: " + ", ".join(different)
        fixes.append("the mirror holds other images under these tags: push the bundle again")
    if layouts["ns"] and layouts["flat"] == 0 and status == "PASS":
        detail += " (clients other than containerd, which send no ns, will not find them)"
    return Check(name, status, detail, "\n".join(fixes), area="mirror")


# --- disk, snapd, MicroK8s --------------------------------------------------------------------------


_EXISTING_DF = ('for p in "$@"; do d="$p"; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; '
                'df -Pk "$d" | tail -n 1; done')


def disk_checks(paths: Sequence[PurePosixPath], found: Sequence[tuple[int, str]],
                bundle: BundleFacts | None) -> list[Check]:
    """Free space where snapd keeps snaps (/var/lib/snapd) and MicroK8s its data (/var/snap)."""
    need = {PurePosixPath("/var/lib/snapd"): 0, PurePosixPath("/var/snap"): 0}
    if bundle is not None:
        need[PurePosixPath("/var/lib/snapd")] = int(bundle.snap_bytes * 1.1)
        need[PurePosixPath("/var/snap")] = (bundle.image_bytes * IMAGE_SPACE_FACTOR
                                            + MICROK8S_STATE_BYTES)
    # Paths on the same file system share its free space: add their needs up.
    by_mount: dict[str, tuple[int, list[PurePosixPath]]] = {}
    for path, (available, mount) in zip(paths, found, strict=True):
        _, members = by_mount.get(mount, (available, []))
        by_mount[mount] = (available, [*members, path])
    checks = []
    if len(found) != len(paths):
        return [Check("disk", "WARN", "cannot tell the free space under "
                      + " and ".join(map(str, paths)) + " (`df` gave no answer)",
                      "check with `df -h /var/snap /var/lib/snapd`", area="disk")]
    for mount, (available, members) in by_mount.items():
        wanted = sum(need.get(p, 0) for p in members)
        shown = " and ".join(str(p) for p in members)
        detail = f"{shown}: {human_bytes(available)} free on {mount}"
        name = f"disk {shown}"
        if bundle is None:
            if available < MIN_FREE_WITHOUT_BUNDLE:
                checks.append(Check(name, "WARN", f"{detail}; MicroK8s and its core images want "
                                    f"about {human_bytes(MIN_FREE_WITHOUT_BUNDLE)}",
                                    f"free space on {mount} (give --bundle for the real need)",
                                    area="disk"))
            else:
                checks.append(Check(name, "PASS", detail, area="disk"))
            continue
        detail += (f"; the bundle needs about {human_bytes(wanted)} here (snaps "
                   f"{human_bytes(bundle.snap_bytes)}; images {human_bytes(bundle.image_bytes)} x "
                   f"{IMAGE_SPACE_FACTOR} unpacked, + {human_bytes(MICROK8S_STATE_BYTES)} for MicroK8s)")
        if available < wanted:
            checks.append(Check(name, "FAIL", detail, f"free {human_bytes(wanted - available)} on {mount}",
                                area="disk"))
        else:
            checks.append(Check(name, "PASS", detail, area="disk"))
    return checks


def snapd_check(returncode: int, stdout: str, stderr: str) -> Check:
    if returncode == 127:
        return Check("snapd", "FAIL", "`snap` is not installed: MicroK8s is a snap",
                     "install snapd from the distribution's packages (offline: its .deb and "
                     "dependencies); the bundle carries the snapd snap to update it after",
                     area="snapd")
    values = parse_snap_version(stdout)
    version = values.get("snapd", "")
    if not version or version == "unavailable" or returncode != 0:
        return Check("snapd", "FAIL",
                     f"snapd does not answer ({(stderr or stdout).strip()[:200] or 'no version'})",
                     "start it: `systemctl enable --now snapd.socket snapd.service`", area="snapd")
    found = release_of(version)
    if found is not None and found < (2, 52):
        return Check("snapd", "WARN",
                     f"snapd {version}: MicroK8s snaps since 1.25 assume snapd 2.52 or newer",
                     "install the bundle's snapd snap first (`gapkit node install` does)",
                     area="snapd")
    return Check("snapd", "PASS", f"snapd {version} (series {values.get('series', '?')})",
                 area="snapd")


def microk8s_check(installed: dict[str, str] | None, version_text: str,
                   bundle_release: str | None) -> Check:
    if installed is None and not version_text:
        return Check("microk8s", "PASS", "not installed: a fresh install", area="microk8s")
    if installed is not None:
        version = installed.get("version", "?")
        detail = (f"installed: {version} (revision {installed.get('rev', '?')}, tracking "
                  f"{installed.get('tracking', '-')})")
    else:
        version = version_text
        detail = f"installed: {version_text}"
    have, want = release_of(version), release_of(bundle_release)
    if have and want and have != want:
        return Check("microk8s", "WARN",
                     f"{detail}; the bundle carries {bundle_release}",
                     f"installing the bundle changes MicroK8s {have[0]}.{have[1]} to "
                     f"{want[0]}.{want[1]} (one minor release at a time is the supported path)",
                     area="microk8s")
    return Check("microk8s", "PASS", detail, area="microk8s")


# --- the bundle --------------------------------------------------------------------------------------


async def read_bundle_facts(path: Path) -> BundleFacts:
    """Images (with digests), release and sizes of a bundle, image tar or OCI layout."""
    from gapkit.bundle.sources import open_image_source

    source = await open_image_source(path)
    try:
        if source.bundle is not None:
            manifest = source.bundle
            images = [(Reference.parse(i.reference), i.digest) for i in manifest.images]
            return BundleFacts(path, images, manifest.microk8s,
                               sum(s.size for s in manifest.snaps), manifest.blob_bytes)
        refs = await source.store.images()
        images = []
        for ref in refs:
            descriptor = await source.store.head_manifest(ref)
            # Layouts name images with tag and digest; the tag is what a mirror is asked for.
            shown = ref.with_digest(None) if ref.tag else ref
            images.append((shown, str(descriptor.digest) if descriptor else ""))
        size = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                if path.is_dir() else path.stat().st_size)
        return BundleFacts(path, images, None, 0, size)
    finally:
        await source.store.close()


# --- all together ------------------------------------------------------------------------------------


def parse_peers(texts: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            if item.startswith("[") and item.endswith("]"):
                item = item[1:-1]
            if item and item not in out:
                out.append(item)
    return tuple(out)


def parse_registries(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.strip() for t in texts for i in t.split(",") if i.strip()))


async def check_node(options: CheckOptions, runner: Runner | None = None) -> CheckReport:
    """Run every check that applies and return the report (nothing on the node is changed)."""
    runner = runner if runner is not None else LocalRunner()
    proxy = ProxyURL.parse(options.proxy) if options.proxy else None
    mirror = MirrorURL.parse(options.mirror, options.plain_http) if options.mirror else None
    if options.ca is not None and mirror is None:
        raise UsageError("--ca is the mirror's CA: give --mirror too")
    if options.ca is not None and not options.ca.is_file():
        raise UsageError(f"--ca {options.ca}: no such file")
    if options.upstream_ca is not None and not options.upstream_ca.is_file():
        raise UsageError(f"--upstream-ca {options.upstream_ca}: no such file")
    targets = [RegistryTarget.parse(r) for r in options.registries]
    bundle = await read_bundle_facts(options.bundle) if options.bundle else None
    ports = list(node_ports(options.etcd))

    v4_text, v6_text, interfaces, (listeners, known) = await asyncio.gather(
        _read_text(runner, PROC_ROUTE), _read_text(runner, PROC_IPV6_ROUTE),
        read_interfaces(runner), read_listeners(runner))
    hostname, snap_version, snap_list, microk8s_version, df = await asyncio.gather(
        runner.run(["hostname"]), runner.run(["snap", "version"]),
        runner.run(["snap", "list", "microk8s"]), runner.run(["microk8s", "version"]),
        runner.run(["sh", "-c", _EXISTING_DF, "sh", *map(str, SNAP_PATHS)]))
    v4, v6 = parse_ipv4_default_routes(v4_text), parse_ipv6_default_routes(v6_text)
    towards = {peer: await route_to(runner, peer) for peer in options.peers}
    report = CheckReport(hostname.stdout.strip() or runner.name)

    report.checks.append(route_checks(v4, v6, interfaces, [dev for dev, _ in towards.values()]))
    report.advertise = await find_advertise(runner, v4, interfaces)
    report.checks.append(advertise_check(report.advertise, towards))

    matrix = PortMatrix(ports)
    matrix.local = await local_ports(runner, ports, listeners, interfaces)
    report.checks.append(local_ports_check(matrix.local, known))

    async def mirror_work() -> list[Check]:
        if mirror is None:
            return []
        async with MirrorProbe(mirror, str(options.ca) if options.ca else None, options.creds,
                               options.timeout) as client:
            answer = await client.ping()
            checks = [mirror_ping_check(mirror, answer, options.ca, options.creds is not None)]
            if bundle is not None and answer.status == 200:
                found = await asyncio.gather(*(client.find_image(ref, digest)
                                               for ref, digest in bundle.images))
                checks.append(mirror_images_check(mirror, found))
            elif bundle is not None:
                checks.append(Check("mirror images", "WARN",
                                    f"not checked: {mirror.base}/v2/ did not answer 200",
                                    "fix the mirror /v2/ check first", area="mirror"))
            return checks

    async def proxy_work() -> list[Check]:
        if proxy is None:
            return []
        chosen = targets or [RegistryTarget.parse(r) for r in
                             (bundle.registries if bundle and bundle.registries else DEFAULT_UPSTREAMS)]
        ca = str(options.upstream_ca) if options.upstream_ca else None
        probes = await asyncio.gather(*(probe_proxy(proxy, t, options.timeout, ca) for t in chosen))
        return [proxy_check(proxy, p) for p in probes]

    peer_probes, proxy_checks, mirror_checks = await asyncio.gather(
        asyncio.gather(*(probe_peer(peer, ports, options.timeout) for peer in options.peers)),
        proxy_work(), mirror_work())
    for peer, probes in zip(options.peers, peer_probes, strict=True):
        matrix.peers[peer] = probes
        report.checks.append(peer_check(peer, ports, probes, report.advertise.address))
    report.matrix = matrix

    release = release_of(bundle.microk8s if bundle else None)
    installed = parse_snap_list(snap_list.stdout) if snap_list.returncode == 0 else None
    if release is None and installed is not None:
        release = release_of(installed.get("version"))
    name_entries: list[tuple[str, str | None, list[str]]] = []
    for peer, probes in matrix.peers.items():
        listener = next((p.listener for p in probes.values() if p.listener), None)
        if not _is_ip(peer):
            name_entries.append((peer, None, await resolve(runner, peer, options.timeout)))
        elif listener and listener != report.node:
            name_entries.append((listener, peer, await resolve(runner, listener, options.timeout)))
    if name_entries:
        report.checks.append(names_check(name_entries, release))
    elif options.peers:
        report.checks.append(Check(
            "host names", "PASS" if release and release >= (1, 28) else "WARN",
            "the peers' host names are unknown here (given as addresses, and no `gapkit node "
            "listen` told them)",
            "" if release and release >= (1, 28) else
            "MicroK8s <= 1.27 joins need each node's name to resolve to its address on the "
            "others: run `gapkit node listen` on the peers, or list their names in --peers",
            area="names"))

    report.checks += proxy_checks
    report.checks += mirror_checks
    report.checks += disk_checks(SNAP_PATHS, parse_df(df.stdout), bundle)
    report.checks.append(snapd_check(snap_version.returncode, snap_version.stdout,
                                     snap_version.stderr))
    version_text = microk8s_version.stdout.strip() if microk8s_version.returncode == 0 else ""
    report.checks.append(microk8s_check(installed, version_text,
                                        bundle.microk8s if bundle else None))
    return report


def parse_creds(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    return parse_user_password(text)
