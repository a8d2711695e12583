"""`gapkit node check` and `gapkit node listen`, against real network namespaces and real peers.

Nodes are network namespaces (tests/support/netns.py) with addresses from 198.51.100.0/24,
linked by veth pairs or a bridge; gapkit runs inside them with `ip netns exec`. Peers are real:
`gapkit node listen` in another namespace, `iptables` dropping a port, `tinyproxy` as the proxy,
`docker-registry` as upstream and mirror. Needs root (CI runs as root).

Stand-in: `snap` is the one program faked (snapd cannot run here, TESTBED.md): a script on
`PATH` that answers `snap version` as snapd 2.58 does and `snap list microk8s` as when MicroK8s
is not installed, so a healthy node exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from gapkit.node.check import (
    BundleFacts,
    CheckOptions,
    check_node,
    disk_checks,
    parse_ipv4_default_routes,
    parse_ipv6_default_routes,
    parse_ss,
    persistent_route_snippets,
)
from gapkit.node.plan import CommandResult, LocalRunner
from tests.support import peers
from tests.support.cli import gapkit
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.netns import Network, Node, Tinyproxy, start_registry, wait_for_line
from tests.support.peers import Registry

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2")

UPSTREAM_NETPLAN = Path("/work/shared/data/microk8s/defaults/"
                        "airgap-dummy-default-route-netplan-from-upstream-test.yaml")

FAKE_SNAP = """#!/bin/sh
# Stand-in for snapd's `snap` (snapd cannot run in this test machine): answers as snapd 2.58.
case "$1" in
  version) printf 'snap    2.58.3+deb12u1\\nsnapd   2.58.3+deb12u1\\nseries  16\\ndebian  12\\n';;
  list) echo "error: no matching snaps installed" >&2; exit 1;;
  *) echo "snap stand-in: $*" >&2; exit 1;;
esac
"""


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for gapkit in a namespace: the `snap` stand-in first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "snap").write_text(FAKE_SNAP)
    (bin_dir / "snap").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def check(node: Node, env: dict[str, str], *args: str) -> tuple[int, dict[str, object]]:
    result = node.gapkit("node", "check", "--json", "--timeout", "1", *args, env=env)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def rows(report: dict[str, object], area: str) -> list[dict[str, str]]:
    checks = report["checks"]
    assert isinstance(checks, list)
    return [c for c in checks if c["area"] == area]


def row(report: dict[str, object], name: str) -> dict[str, str]:
    checks = report["checks"]
    assert isinstance(checks, list)
    found = [c for c in checks if c["name"] == name]
    assert found, f"no check {name!r} in {[c['name'] for c in checks]}"
    return found[0]


def listen(node: Node, *args: str) -> subprocess.Popen[bytes]:
    """`gapkit node listen` in `node`, with a host name of its own; returns once it listens."""
    process = node.popen(sys.executable, "-m", "gapkit", "node", "listen", "--duration", "120",
                         *args, hostname=f"{node.network.prefix}-{node.short}", stdout_pipe=True)
    wait_for_line(process, "listening on")
    return process


# --- default route -------------------------------------------------------------------------------


def test_node_without_default_route_fails_with_the_fix_then_passes_once_it_is_added(
        network: Network, env: dict[str, str]) -> None:
    n1, n2 = network.node("n1"), network.node("n2")
    network.link(n1, "198.51.100.1/24", n2, "198.51.100.2/24")
    listen(n2)

    code, report = check(n1, env, "--peers", "198.51.100.2")
    assert code == 1
    route = row(report, "default route")
    assert route["status"] == "FAIL"
    assert "no default route" in route["detail"]
    fix = route["fix"]
    assert fix.splitlines()[0] == "ip route add default dev eth0"
    # the persistent forms: upstream's netplan file (for eth0), systemd-networkd, ifupdown
    assert "routes: [{ to: 0.0.0.0/0, scope: link }]" in fix
    assert "dhcp4-overrides: { use-routes: false }" in fix
    assert "[Route]\nDestination=0.0.0.0/0\nScope=link" in fix
    assert "post-up ip route replace default dev eth0" in fix
    assert row(report, "advertise address")["status"] == "FAIL"
    assert "none:25000" in row(report, "advertise address")["detail"]
    # the table says the same, with the fix
    table = n1.gapkit("node", "check", "--timeout", "1", env=env).stdout
    assert "ip route add default dev eth0" in table and "FAIL" in table

    n1.add_default_route("eth0")
    code, report = check(n1, env, "--peers", "198.51.100.2")
    assert row(report, "default route")["status"] == "PASS"
    assert "dev eth0 (no gateway: link scope)" in row(report, "default route")["detail"]
    assert report["advertise"] == {"interface": "eth0", "address": "198.51.100.1"}
    assert row(report, "advertise address")["status"] == "PASS"
    assert row(report, "peer 198.51.100.2")["status"] == "PASS"
    assert code == 0, [c for c in report["checks"] if c["status"] == "FAIL"]  # type: ignore[union-attr]


def test_netplan_snippet_is_upstreams_airgap_file() -> None:
    if not UPSTREAM_NETPLAN.exists():
        pytest.skip("the shared data folder is not here")
    upstream = [line.strip() for line in UPSTREAM_NETPLAN.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    ours = [line.strip() for line in persistent_route_snippets("eth0")["netplan"].splitlines()
            if line.strip() and not line.startswith("#")]
    assert ours == upstream


# --- ports ---------------------------------------------------------------------------------------


def test_port_matrix_shows_a_closed_peer_refused_and_a_listening_peer_passing(
        network: Network, env: dict[str, str]) -> None:
    n1, closed, open_ = network.node("n1"), network.node("n2"), network.node("n3")
    network.attach(n1, "198.51.100.1/24")
    network.attach(closed, "198.51.100.2/24")
    network.attach(open_, "198.51.100.3/24")
    n1.add_default_route()
    listen(open_)

    code, report = check(n1, env, "--peers", "198.51.100.2,198.51.100.3")
    assert code == 1
    matrix = report["ports"]
    assert isinstance(matrix, dict)
    assert matrix["ports"] == ["16443", "25000", "19001", "10250", "4789/udp"]
    nodes = matrix["nodes"]
    assert nodes["local"] == {p: "free" for p in matrix["ports"]}
    assert nodes["198.51.100.2"] == {p: "refused" for p in matrix["ports"]}
    assert nodes["198.51.100.3"] == {p: "connected" for p in matrix["ports"]}
    refused = row(report, "peer 198.51.100.2")
    assert refused["status"] == "FAIL"
    assert "gapkit node listen" in refused["fix"]
    listening = row(report, "peer 198.51.100.3")
    assert listening["status"] == "PASS"
    assert f"`gapkit node listen` on {network.prefix}-n3 answers" in listening["detail"]
    # the listener told its host name, which does not resolve here: MicroK8s <= 1.27 needs it
    names = row(report, "host names")
    assert names["status"] == "WARN"
    assert f"198.51.100.3 {network.prefix}-n3" in names["fix"]

    n1.hosts({"198.51.100.3": f"{network.prefix}-n3"})
    _, report = check(n1, env, "--peers", "198.51.100.3")
    assert row(report, "host names")["status"] == "PASS"
    assert report["ok"] is True

    # the table: one row per node, one column per port
    table = n1.gapkit("node", "check", "--timeout", "1", "--peers", "198.51.100.2,198.51.100.3",
                      env=env).stdout
    grid = table[table.index("NODE"):]
    assert "16443" in grid and "4789/udp" in grid
    assert [line.split()[0] for line in grid.splitlines()[2:5]] == [
        "this", "198.51.100.2", "198.51.100.3"]


def test_a_filtered_port_times_out_in_the_matrix(network: Network, env: dict[str, str]) -> None:
    n1, n2 = network.node("n1"), network.node("n2")
    network.link(n1, "198.51.100.1/24", n2, "198.51.100.2/24")
    n1.add_default_route()
    if not n2.iptables_drop(10250) or not n2.iptables_drop(4789, "udp"):
        pytest.skip("iptables does not work inside a network namespace here")
    listen(n2)

    code, report = check(n1, env, "--peers", "198.51.100.2")
    assert code == 1
    peer = report["ports"]["nodes"]["198.51.100.2"]  # type: ignore[index]
    assert peer == {"16443": "connected", "25000": "connected", "19001": "connected",
                    "10250": "timed out", "4789/udp": "no answer"}
    failed = row(report, "peer 198.51.100.2")
    assert failed["status"] == "FAIL"
    assert "10250: filtered" in failed["fix"]
    # gapkit node listen runs there, so UDP silence means filtered, not merely "unknown"
    assert "4789/udp: `gapkit node listen` runs on 198.51.100.2 but no UDP answer" in failed["fix"]


def test_listen_skips_a_port_already_held_and_local_check_names_the_holder(
        network: Network, env: dict[str, str]) -> None:
    n1 = network.node("n1")
    network.attach(n1, "198.51.100.1/24")
    n1.add_default_route()
    holder = n1.popen(sys.executable, "-c", "import socket,time\n"
                      "s=socket.socket(); s.bind(('0.0.0.0',25000)); s.listen(); time.sleep(120)")
    n1.wait_for_port("127.0.0.1", 25000)
    process = n1.popen(sys.executable, "-m", "gapkit", "node", "listen", "--ports",
                       "16443,25000", "--duration", "60", stdout_pipe=True)
    line = wait_for_line(process, "listening on")
    assert "16443" in line and "25000" not in line

    code, report = check(n1, env)
    assert code == 1
    local = row(report, "local ports")
    assert local["status"] == "FAIL"
    assert "25000 in use: python" in local["detail"] and f"(pid {holder.pid})" in local["detail"]
    assert "16443 gapkit node listen" in local["detail"]
    assert "stop python" in local["fix"] and "25000" in local["fix"]


# --- proxy ---------------------------------------------------------------------------------------


@pytest.fixture
def behind_proxy(network: Network, tmp_path: Path) -> tuple[Node, Tinyproxy, Node]:
    """n1 (198.51.100.10/25) reaches nothing but the proxy (198.51.100.11/25); the proxy also
    sits on the upstream's subnet (198.51.100.130/25 <-> 198.51.100.131/25) and forwards no
    packets itself: only CONNECT gets through."""
    n1, proxy, upstream = network.node("n1"), network.node("px"), network.node("up")
    network.link(n1, "198.51.100.10/25", proxy, "198.51.100.11/25")
    network.link(proxy, "198.51.100.130/25", upstream, "198.51.100.131/25", "eth1", "eth0")
    n1.add_default_route()
    tinyproxy = Tinyproxy(proxy, tmp_path / "tinyproxy", "198.51.100.11").start()
    return n1, tinyproxy, upstream


def test_proxy_connect_reaches_a_registry_and_names_the_one_it_cannot(
        behind_proxy: tuple[Node, Tinyproxy, Node], env: dict[str, str], tmp_path: Path) -> None:
    n1, tinyproxy, upstream = behind_proxy
    # The registry listens on the upstream's own address, not loopback: only the proxy reaches it.
    start_registry(upstream, tmp_path / "upstream", "198.51.100.131", 5000)
    direct = n1.run(sys.executable, "-c", "import socket; socket.create_connection("
                    "('198.51.100.131', 5000), 1)", check=False)
    assert direct.returncode != 0  # the proxy namespace forwards no packets

    code, report = check(n1, env, "--proxy", tinyproxy.url,
                         "--registries", "http://198.51.100.131:5000,http://198.51.100.131:5999")
    good = row(report, "proxy -> 198.51.100.131:5000")
    assert good["status"] == "PASS"
    assert "200 Connection established" in good["detail"] and "GET /v2/ -> 200" in good["detail"]
    bad = row(report, "proxy -> 198.51.100.131:5999")
    assert bad["status"] == "FAIL"
    assert "CONNECT 198.51.100.131:5999" in bad["detail"] and "500" in bad["detail"]
    assert "ConnectPort" in bad["fix"]
    assert code == 1
    assert sorted(tinyproxy.connects()) == ["198.51.100.131:5000", "198.51.100.131:5999"]


def test_proxy_to_a_tls_registry_by_name_verifies_its_certificate(
        behind_proxy: tuple[Node, Tinyproxy, Node], env: dict[str, str], tmp_path: Path) -> None:
    n1, tinyproxy, upstream = behind_proxy
    name = "registry.gapkit.test"
    ca = peers.TestCA(tmp_path / "ca").create(names=(name,))
    start_registry(upstream, tmp_path / "upstream", "198.51.100.131", 5443, tls=ca)
    tinyproxy.node.hosts({"198.51.100.131": name})  # only the proxy resolves the name

    _, report = check(n1, env, "--proxy", tinyproxy.url, "--registries", f"{name}:5443",
                      "--upstream-ca", str(ca.ca_cert))
    assert row(report, f"proxy -> {name}:5443")["status"] == "PASS"
    assert f"CONNECT {name}:5443" in row(report, f"proxy -> {name}:5443")["detail"]

    # Without the CA, the certificate is not trusted: what a TLS-inspecting proxy looks like.
    _, report = check(n1, env, "--proxy", tinyproxy.url, "--registries", f"{name}:5443")
    untrusted = row(report, f"proxy -> {name}:5443")
    assert untrusted["status"] == "FAIL"
    assert "not trusted" in untrusted["detail"] and "--upstream-ca" in untrusted["fix"]
    assert tinyproxy.connects().count(f"{name}:5443") == 2


def test_proxy_that_is_not_there_fails_with_the_url_for_each_upstream(
        network: Network, env: dict[str, str], tmp_path: Path) -> None:
    n1 = network.node("n1")
    network.attach(n1, "198.51.100.1/24")
    n1.add_default_route()
    code, report = check(n1, env, "--proxy", "http://198.51.100.1:3128")
    assert code == 1
    proxy_rows = rows(report, "proxy")
    assert [r["name"] for r in proxy_rows] == [
        "proxy -> docker.io", "proxy -> registry.k8s.io", "proxy -> quay.io"]
    assert all(r["status"] == "FAIL" and "cannot reach the proxy http://198.51.100.1:3128"
               in r["detail"] for r in proxy_rows)
    assert "check the proxy URL" in proxy_rows[0]["fix"]

    # with --bundle, the upstreams are the ones its images come from
    layout = tmp_path / "layout"
    write_layout(layout, [ImageSpec("ghcr.io/team/app:1", [make_layer(5, 500)])])
    _, report = check(n1, env, "--proxy", "http://198.51.100.1:3128", "--bundle", str(layout))
    assert [r["name"] for r in rows(report, "proxy")] == ["proxy -> ghcr.io"]


# --- mirror ---------------------------------------------------------------------------------------

CNI = "docker.io/calico/cni:v3.28.1"
PAUSE = "registry.k8s.io/pause:3.10"
SPEAKER = "quay.io/metallb/speaker:v0.15.2"


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A small OCI layout standing in for a bundle: calico, pause (multi-arch) and metallb."""
    folder = tmp_path / "layout"
    write_layout(folder, [
        ImageSpec(CNI, [make_layer(1, 3000)]),
        ImageSpec(PAUSE, [make_layer(2, 700)], others={"linux/arm64/v8": [make_layer(3, 600)]}),
        ImageSpec(SPEAKER, [make_layer(4, 900)]),
    ])
    return folder


def test_mirror_with_bundle_names_the_missing_image_and_tells_the_layout(
        registry: Registry, layout: Path) -> None:
    registry.push_layout(layout, CNI, "calico/cni:v3.28.1")
    registry.push_layout(layout, PAUSE, "pause:3.10")

    result = gapkit("node", "check", "--json", "--timeout", "2", "--mirror", registry.url,
                    "--bundle", str(layout), check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert row(report, "mirror /v2/")["status"] == "PASS"
    assert "(plain HTTP)" in row(report, "mirror /v2/")["detail"]
    images = row(report, "mirror images")
    assert images["status"] == "FAIL"
    assert images["detail"].startswith("2 of 3 image(s) resolvable: 2 by flat name")
    assert f"missing: {SPEAKER}" in images["detail"]
    assert f"gapkit registry push BUNDLE --to {registry.host}" in images["fix"]

    # pushed under its upstream's prefix, the image is found there, and the detail says how
    registry.push_layout(layout, SPEAKER, "quay.io/metallb/speaker:v0.15.2")
    report = json.loads(gapkit("node", "check", "--json", "--mirror", registry.url, "--bundle",
                               str(layout), check=False).stdout)
    images = row(report, "mirror images")
    assert images["status"] == "PASS", images
    assert "3 of 3" in images["detail"] and "1 under upstream prefixes" in images["detail"]
    assert "override_path" in images["detail"]

    # another image under pause's tag: resolvable, but not the bundle's
    registry.push_layout(layout, CNI, "pause:3.10")
    report = json.loads(gapkit("node", "check", "--json", "--mirror", registry.url, "--bundle",
                               str(layout), check=False).stdout)
    images = row(report, "mirror images")
    assert images["status"] == "WARN"
    assert f"a different digest than the bundle's: {PAUSE}" in images["detail"]


def test_mirror_over_tls_needs_its_ca(tls_registry: Registry, layout: Path, tmp_path: Path) -> None:
    assert tls_registry.tls is not None
    single = tmp_path / "one"
    write_layout(single, [ImageSpec(CNI, [make_layer(1, 3000)])])
    tls_registry.push_layout(single, CNI, "calico/cni:v3.28.1")

    report = json.loads(gapkit("node", "check", "--json", "--mirror", tls_registry.url, "--ca",
                               str(tls_registry.tls.ca_cert), "--bundle", str(single),
                               check=False).stdout)
    assert row(report, "mirror /v2/")["status"] == "PASS"
    assert f"TLS verified with {tls_registry.tls.ca_cert}" in row(report, "mirror /v2/")["detail"]
    assert row(report, "mirror images")["status"] == "PASS"

    report = json.loads(gapkit("node", "check", "--json", "--timeout", "2", "--mirror",
                               tls_registry.url, check=False).stdout)
    ping = row(report, "mirror /v2/")
    assert ping["status"] == "FAIL" and "certificate" in ping["detail"]
    assert "--ca FILE" in ping["fix"]
    assert not rows(report, "mirror")[1:]  # no image check without --bundle


def test_mirror_with_basic_auth_warns_without_credentials(auth_registry: Registry,
                                                          layout: Path) -> None:
    report = json.loads(gapkit("node", "check", "--json", "--mirror", auth_registry.url,
                               "--bundle", str(layout), check=False).stdout)
    assert row(report, "mirror /v2/")["status"] == "WARN"
    assert "--creds" in row(report, "mirror /v2/")["fix"]
    assert row(report, "mirror images")["detail"].startswith("not checked")
    auth_registry.push_layout(layout, PAUSE, "pause:3.10")
    report = json.loads(gapkit("node", "check", "--json", "--mirror", auth_registry.url,
                               "--creds", "gapkit:s3cret", "--bundle", str(layout),
                               check=False).stdout)
    assert row(report, "mirror /v2/")["status"] == "PASS"
    images = row(report, "mirror images")
    assert images["detail"].startswith("1 of 3"), images  # HEADs carry the credentials too
    assert f"missing: {CNI}, {SPEAKER}" in images["detail"]


# --- state read through a runner: fake /proc files and command answers ----------------------------


class FakeRunner(LocalRunner):
    """Files under `root` (a fake /proc); commands answered from a table."""

    def __init__(self, root: Path, answers: dict[str, tuple[int, str]]) -> None:
        super().__init__(root, "fake")
        self.answers = answers

    async def run(self, argv, stdin=None):  # type: ignore[no-untyped-def]
        code, out = self.answers.get(" ".join(argv[:2]), (127, ""))
        return CommandResult(tuple(argv), code, out, "" if code != 127 else "not found")


PROC_ROUTE_NONE = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                   "eth0\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
PROC_ROUTE_GW = PROC_ROUTE_NONE + "eth0\t00000000\t016433C6\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
IPV6_REJECT_ONLY = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
                    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n")
IPV6_DEFAULT = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
                "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n")
SS = ("tcp   LISTEN 0 4096 0.0.0.0:16443 0.0.0.0:* users:((\"kubelite\",pid=812,fd=10))\n"
      "tcp   LISTEN 0 4096 [::]:10250 [::]:* users:((\"nginx\",pid=99,fd=3))\n"
      "udp   UNCONN 0 0 0.0.0.0:4789 0.0.0.0:*\n")
IP_ADDR = json.dumps([{"ifname": "lo", "flags": ["LOOPBACK", "UP"], "addr_info": [
    {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifname": "eth0", "flags": ["UP"], "addr_info": [
        {"family": "inet", "local": "198.51.100.1", "prefixlen": 24, "scope": "global"}]},
    {"ifname": "vxlan.calico", "flags": ["UP"], "addr_info": []}])


def test_route_parsers_take_gateways_metrics_and_skip_the_ipv6_reject_entry() -> None:
    (route,) = parse_ipv4_default_routes(PROC_ROUTE_GW)
    assert (route.interface, route.gateway, route.metric) == ("eth0", "198.51.100.1", 100)
    assert parse_ipv4_default_routes(PROC_ROUTE_NONE) == []
    assert parse_ipv6_default_routes(IPV6_REJECT_ONLY) == []
    (v6,) = parse_ipv6_default_routes(IPV6_DEFAULT + IPV6_REJECT_ONLY)
    assert (v6.interface, v6.gateway) == ("eth0", "fe80::1")
    assert [(s.port, s.process, s.pid) for s in parse_ss(SS)] == [
        (16443, "kubelite", 812), (10250, "nginx", 99), (4789, "", None)]


async def test_checks_read_node_state_through_the_runner(tmp_path: Path) -> None:
    proc = tmp_path / "proc" / "net"
    proc.mkdir(parents=True)
    (proc / "route").write_text(PROC_ROUTE_NONE)
    (proc / "ipv6_route").write_text(IPV6_DEFAULT + IPV6_REJECT_ONLY)
    runner = FakeRunner(tmp_path, {
        "ip -j": (0, IP_ADDR), "ss -Hlntup": (0, SS), "hostname": (0, "node1\n"),
        "snap version": (0, "snap 2.61\nsnapd 2.61\nseries 16\n"),
        "snap list": (0, "Name Version Rev Tracking Publisher Notes\n"
                         "microk8s v1.27.4 5891 1.27/stable canonical classic\n"),
        "sh -c": (0, "/dev/vda 1000 10 2000 1% /\n/dev/vda 1000 10 2000 1% /\n"),
    })
    report = await check_node(CheckOptions(), runner)
    checks = {c.name: c for c in report.checks}
    route = checks["default route"]
    assert route.status == "WARN" and "IPv6 default dev eth0 via fe80::1" in route.detail
    assert route.fix.startswith("ip route add default dev eth0\n")
    ports = checks["local ports"]
    assert ports.status == "FAIL"
    assert "16443 MicroK8s (kubelite)" in ports.detail
    assert "4789/udp MicroK8s (kernel VXLAN vxlan.calico)" in ports.detail
    assert "10250 in use: nginx (pid 99)" in ports.detail and "stop nginx (pid 99)" in ports.fix
    assert checks["snapd"].status == "PASS" and "2.61" in checks["snapd"].detail
    assert checks["microk8s"].detail.startswith("installed: v1.27.4 (revision 5891")
    assert checks["disk /var/snap and /var/lib/snapd"].status == "WARN"  # 2 MB free
    assert not report.ok


def test_disk_needs_follow_the_bundle_and_add_up_on_one_file_system() -> None:
    bundle = BundleFacts(Path("b.tar"), [], "1.32", snap_bytes=300_000_000,
                         image_bytes=1_000_000_000)
    snapd, snap = PurePosixPath("/var/lib/snapd"), PurePosixPath("/var/snap")
    (same,) = disk_checks([snap, snapd], [(4_000_000_000, "/"), (4_000_000_000, "/")], bundle)
    assert same.status == "FAIL" and "about 4.3 GB" in same.detail and "free 330.0 MB" in same.fix
    apart = disk_checks([snap, snapd], [(4_000_000_000, "/var"), (400_000_000, "/srv")], bundle)
    assert [c.status for c in apart] == ["PASS", "PASS"]
