"""`gapkit cluster up`: snaps uploaded and installed in order, containerd configured, images
side-loaded, the cluster formed one join at a time, and a rerun that continues where it stopped.

Stand-ins (TESTBED.md): `snap` and `microk8s` are the executables of
`tests/support/microk8s.py`, the only programs these tests stand in for. They record their
arguments and answer as the real ones do: `snap ack`/`install` (an ack before install,
`--classic` for microk8s, the base first; the install hook's copy of pre-staged side-load tars),
`microk8s status --wait-ready`, `add-node --token T --token-ttl N` (prints `microk8s join
<ip>:25000/<token>/<12 hex>`), `join` (checks token, expiry and fingerprint), and `kubectl get
nodes -o json` from a state file shared by every node of a test, so Ready follows the joins.
The snaps are synthetic (`tests/support/snaps.py`), the bundle is built by `gapkit bundle
create` from real registries standing in for the upstreams.

Here each node is a `LocalRunner(root)` (its files under its own folder, its own stand-ins);
the SSH tests further down run the same code over real sshd in network namespaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gapkit.catalog import resolve_images
from gapkit.cluster.inventory import load_inventory
from gapkit.cluster.join import ClusterNode, join_url
from gapkit.cluster.up import UpOptions, UpReport, cluster_up, up_from_inventory
from gapkit.errors import ClusterError, NodeStepError
from gapkit.node.plan import CommandResult, LocalRunner
from tests.support.containerd import Containerd
from tests.support.microk8s import StandInMicroK8s
from tests.support.snaps import make_snap
from tests.support.sshnodes import SSHNodes
from tests.support.upstreams import Upstreams

RELEASE = "1.32"
SNAPS = (("snapd", 21759), ("core20", 2015), ("microk8s", 7394))


@dataclass
class Bundle:
    path: Path
    images: list[str]
    mirror: str


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundle]:
    folder = tmp_path_factory.mktemp("up-bundle")
    upstreams = Upstreams(folder / "upstreams")
    try:
        images = [str(i.reference) for i in resolve_images(microk8s=RELEASE)]
        upstreams.push(images, layer_size=2000)
        for name, revision in SNAPS:
            make_snap(folder / "snaps", name, revision)
        path = upstreams.build_bundle(folder / "bundle.tar", microk8s=RELEASE,
                                      snaps_from=folder / "snaps")
        yield Bundle(path, images, "http://198.51.100.10:5000")
    finally:
        upstreams.stop()


@pytest.fixture(scope="module")
def bundle_1_24(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundle]:
    """A 1.24 bundle (base core18): before the side-load plugin."""
    folder = tmp_path_factory.mktemp("up-bundle-1.24")
    upstreams = Upstreams(folder / "upstreams")
    try:
        images = [str(i.reference) for i in resolve_images(microk8s="1.24")]
        upstreams.push(images, layer_size=2000)
        for name, revision in (("snapd", 21759), ("core18", 2284), ("microk8s", 6530)):
            make_snap(folder / "snaps", name, revision)
        path = upstreams.build_bundle(folder / "bundle.tar", microk8s="1.24",
                                      snaps_from=folder / "snaps")
        yield Bundle(path, images, "")
    finally:
        upstreams.stop()


class StandInRunner(LocalRunner):
    """A LocalRunner whose `snap` and `microk8s` are this node's stand-ins."""

    def __init__(self, root: Path, stand_in: StandInMicroK8s, name: str) -> None:
        super().__init__(root, name)
        self.stand_in = stand_in

    async def run(self, argv: Sequence[str], stdin: bytes | Path | None = None) -> CommandResult:
        if argv and argv[0] in ("snap", "microk8s"):
            argv = [str(self.stand_in.bin_dir / argv[0]), *argv[1:]]
            result = await super().run(argv, stdin)
            return CommandResult((Path(result.argv[0]).name, *result.argv[1:]),
                                 result.returncode, result.stdout, result.stderr)
        return await super().run(argv, stdin)


@dataclass
class Cluster:
    nodes: list[ClusterNode]
    stand_ins: dict[str, StandInMicroK8s]
    runners: dict[str, StandInRunner]
    roots: dict[str, Path]
    cluster_file: Path

    def log(self) -> list[dict[str, object]]:
        log: list[dict[str, object]] = json.loads(self.cluster_file.read_text())["log"]
        return log

    def calls(self, name: str) -> list[list[str]]:
        return self.stand_ins[name].calls()

    def changing_calls(self, name: str) -> list[list[str]]:
        """The calls that change a node (install, ack, join, add-node)."""
        return [c for c in self.calls(name)
                if c[:2] in (["snap", "install"], ["snap", "ack"], ["microk8s", "join"],
                             ["microk8s", "add-node"], ["snap", "restart"])]

    def up(self, options: UpOptions, bundle: Path, plan_only: bool = False) -> UpReport:
        return asyncio.run(cluster_up(self.nodes, self.runners, bundle, options,
                                      plan_only=plan_only))


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    nodes = [ClusterNode("node1", "198.51.100.11"), ClusterNode("node2", "198.51.100.12"),
             ClusterNode("node3", "198.51.100.13", "worker")]
    cluster_file = tmp_path / "cluster.json"
    stand_ins, runners, roots = {}, {}, {}
    for node in nodes:
        root = tmp_path / node.name / "fs"
        stand_in = StandInMicroK8s(tmp_path / node.name / "stand-in", cluster_file=cluster_file,
                                   node_name=node.name, node_address=node.address,
                                   fs_root=root, ready_after=2).install()
        stand_ins[node.name] = stand_in
        runners[node.name] = StandInRunner(root, stand_in, node.name)
        roots[node.name] = root
    return Cluster(nodes, stand_ins, runners, roots, cluster_file)


def mirror_options(bundle: Bundle, **extra: object) -> UpOptions:
    return UpOptions(images_mode="mirror", mirror=bundle.mirror, poll=0.05, ready_timeout=20,
                     **extra)  # type: ignore[arg-type]


SIDELOAD = UpOptions(images_mode="sideload", poll=0.05, ready_timeout=20, sideload_timeout=5)


def test_plan_shows_every_file_and_command_per_node_and_touches_nothing(
        bundle: Bundle, cluster: Cluster) -> None:
    report = cluster.up(mirror_options(bundle), bundle.path, plan_only=True)
    text = report.render()
    for node in ("node1", "node2", "node3"):
        assert f"# node {node}: install" in text
        assert f"# node {node}: configure" in text
    for name, revision in SNAPS:
        assert f"/var/lib/gapkit/snaps/{name}_{revision}.snap: upload" in text
        assert f"$ snap ack /var/lib/gapkit/snaps/{name}_{revision}.assert" in text
    assert "$ snap install /var/lib/gapkit/snaps/microk8s_7394.snap --classic" in text
    assert "+++ /var/snap/microk8s/current/args/certs.d/registry.k8s.io/hosts.toml" in text
    assert "$ [node1] microk8s add-node --token <token> --token-ttl 900" in text
    assert "$ [node2] microk8s join 198.51.100.11:25000/<token>/<hash>\n" in text
    assert "$ [node3] microk8s join 198.51.100.11:25000/<token>/<hash> --worker" in text
    # only reading: snap list and a kubectl attempt (microk8s is not installed: 127)
    for each in cluster.nodes:
        assert not cluster.changing_calls(each.name)
        assert not cluster.roots[each.name].exists()
    assert json.loads(json.dumps(report.to_json()))["planned"] is True


def test_up_installs_in_order_configures_the_mirror_and_joins_one_at_a_time(
        bundle: Bundle, cluster: Cluster) -> None:
    report = cluster.up(mirror_options(bundle), bundle.path)
    for node in cluster.nodes:
        calls = cluster.changing_calls(node.name)
        assert calls[:6] == [
            ["snap", "ack", "/var/lib/gapkit/snaps/snapd_21759.assert"],
            ["snap", "install", "/var/lib/gapkit/snaps/snapd_21759.snap"],
            ["snap", "ack", "/var/lib/gapkit/snaps/core20_2015.assert"],
            ["snap", "install", "/var/lib/gapkit/snaps/core20_2015.snap"],
            ["snap", "ack", "/var/lib/gapkit/snaps/microk8s_7394.assert"],
            ["snap", "install", "/var/lib/gapkit/snaps/microk8s_7394.snap", "--classic"]]
        assert cluster.stand_ins[node.name].installed() == {
            name: str(rev) for name, rev in SNAPS}
        certs = cluster.roots[node.name] / "var/snap/microk8s/current/args/certs.d"
        assert sorted(p.name for p in certs.iterdir()) == ["docker.io", "registry.k8s.io"]
        assert 'host."http://198.51.100.10:5000"' in (certs / "docker.io/hosts.toml").read_text()
        assert ["microk8s", "status", "--wait-ready", "--timeout", "600"] in \
            cluster.calls(node.name)
        assert not (cluster.roots[node.name] / "etc/hosts").exists()  # not needed from 1.28
    # the join sequence: one add-node on the first node, then node2, then node3 as a worker
    assert [(e["node"], e["call"], e.get("worker")) for e in cluster.log()] == [
        ("node1", "add-node", None), ("node2", "join", False), ("node3", "join", True)]
    add = next(c for c in cluster.calls("node1") if c[1:2] == ["add-node"])
    token = add[add.index("--token") + 1]
    assert len(token) == 32 and int(token, 16) >= 0
    assert add[add.index("--token-ttl") + 1] == "900"
    join = next(c for c in cluster.calls("node3") if c[1:2] == ["join"])
    assert join[2].startswith(f"198.51.100.11:25000/{token}/") and join[3:] == ["--worker"]
    assert report.join is not None and report.join.ready == ["node1", "node2", "node3"]
    assert report.join.joined == ["node2", "node3"]
    assert token not in report.render() and token not in json.dumps(report.to_json())


def test_a_second_run_finds_everything_done_and_changes_nothing(
        bundle: Bundle, cluster: Cluster) -> None:
    cluster.up(mirror_options(bundle), bundle.path)
    before = {n.name: cluster.changing_calls(n.name) for n in cluster.nodes}
    log = cluster.log()
    report = cluster.up(mirror_options(bundle), bundle.path)
    assert {n.name: cluster.changing_calls(n.name) for n in cluster.nodes} == before
    assert cluster.log() == log
    for node in report.nodes:
        assert node.steps["upload"] == "skipped (all there)"
        assert node.steps["install microk8s"] == "skipped (revision 7394 installed)"
        assert node.steps["configure"] == "skipped (already as wanted)"
    assert report.join is not None and report.join.already == ["node2", "node3"]
    assert report.nodes[2].steps["wait-ready"] == "skipped (a worker of the cluster)"
    planned = cluster.up(mirror_options(bundle), bundle.path, plan_only=True).render()
    assert "add-node" not in planned and "$ snap" not in planned
    assert "# node2: already in the cluster" in planned


def test_sideload_stages_a_lean_images_tar_before_install(
        bundle: Bundle, cluster: Cluster, containerd: Containerd) -> None:
    # node1's side-load plugin imports into a real containerd (`ctr image import --platform`)
    cluster.stand_ins["node1"].containerd_address = containerd.address
    cluster.stand_ins["node1"].save()
    report = cluster.up(SIDELOAD, bundle.path)
    assert containerd.image_names() == sorted(bundle.images)
    for node in cluster.nodes:
        root = cluster.roots[node.name]
        staged = root / "var/snap/microk8s/common/sideload/gapkit-images.tar"
        assert staged.is_file()
        # copied by the install hook, imported by the plugin at first start
        assert (root / "var/snap/microk8s/common/etc/sideload/gapkit-images.tar.loaded").is_file()
        loads = cluster.stand_ins[node.name].sideloads()
        assert [entry["file"] for entry in loads] == ["gapkit-images.tar"]
        members = loads[0]["members"]
        assert isinstance(members, list) and "index.json" in members
        assert not any(str(m).startswith("gapkit/") for m in members)  # no snaps in it
        assert not (root / "var/snap/microk8s/current/args/certs.d").exists()
        steps = next(n for n in report.nodes if n.node == node.name).steps
        assert steps["images"].startswith("imported by the side-load plugin")


def test_sideload_plan_names_the_tar_without_exporting_it_and_a_rerun_plan_finds_it_loaded(
        bundle: Bundle, cluster: Cluster) -> None:
    planned = cluster.up(SIDELOAD, bundle.path, plan_only=True).render()
    assert ("# /var/snap/microk8s/common/sideload/gapkit-images.tar: upload the bundle's "
            "linux/amd64 images, exported when applied") in planned
    assert "images import" not in planned
    cluster.up(SIDELOAD, bundle.path)
    again = cluster.up(SIDELOAD, bundle.path, plan_only=True).render()
    assert "gapkit-images.tar.loaded says the side-loaded images were imported" in again
    assert "gapkit-images.tar: upload" not in again


def test_an_https_mirror_gets_its_ca_beside_each_hosts_toml(
        bundle: Bundle, cluster: Cluster, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    options = UpOptions(images_mode="mirror", mirror="https://198.51.100.10:5443", ca=ca,
                        poll=0.05, ready_timeout=20)
    cluster.up(options, bundle.path)
    for node in cluster.nodes:
        folder = cluster.roots[node.name] / "var/snap/microk8s/current/args/certs.d/docker.io"
        assert (folder / "ca.crt").read_text() == ca.read_text()
        hosts = (folder / "hosts.toml").read_text()
        assert '[host."https://198.51.100.10:5443"]' in hosts and 'ca = "ca.crt"' in hosts


def test_before_1_27_sideload_means_images_import_after_the_node_is_ready(
        bundle_1_24: Bundle, tmp_path: Path, containerd: Containerd) -> None:
    """No side-load plugin before 1.27: `microk8s ctr image import` once MicroK8s runs, every
    image checked in containerd by name and digest; a rerun finds them and imports nothing."""
    stand_in = StandInMicroK8s(tmp_path / "stand-in", containerd_address=containerd.address,
                               version="v1.24.17", cluster_file=tmp_path / "cluster.json",
                               node_name="node1", node_address="198.51.100.11",
                               fs_root=tmp_path / "fs").install()
    runner = StandInRunner(tmp_path / "fs", stand_in, "node1")
    nodes = [ClusterNode("node1", "198.51.100.11")]
    report = asyncio.run(cluster_up(nodes, {"node1": runner}, bundle_1_24.path, SIDELOAD))
    assert report.nodes[0].steps["images"] == f"{len(bundle_1_24.images)} image(s) imported and checked"
    assert containerd.image_names() == sorted(bundle_1_24.images)
    assert not (tmp_path / "fs/var/snap/microk8s/common/sideload").exists()
    assert stand_in.installed() == {"snapd": "21759", "core18": "2284", "microk8s": "6530"}
    imports = [c for c in stand_in.calls() if c[1:4] == ["ctr", "image", "import"]]
    assert imports == [["microk8s", "ctr", "image", "import", "--platform", "linux/amd64", "-"]]
    again = asyncio.run(cluster_up(nodes, {"node1": runner}, bundle_1_24.path, SIDELOAD))
    assert again.nodes[0].steps["images"] == "skipped (every image is there)"
    assert len([c for c in stand_in.calls() if c[1:4] == ["ctr", "image", "import"]]) == 1


def test_up_to_1_27_every_node_gets_the_others_names_in_etc_hosts(
        bundle_1_24: Bundle, cluster: Cluster) -> None:
    own = cluster.roots["node2"] / "etc/hosts"
    own.parent.mkdir(parents=True)
    own.write_text("127.0.0.1 localhost\n198.51.100.12 node2\n")
    options = UpOptions(poll=0.05, ready_timeout=20)
    report = cluster.up(options, bundle_1_24.path)
    for node in cluster.nodes:
        lines = (cluster.roots[node.name] / "etc/hosts").read_text().splitlines()
        assert {"198.51.100.11 node1", "198.51.100.12 node2", "198.51.100.13 node3"} <= set(lines)
        assert lines.count("198.51.100.12 node2") == 1
    assert own.read_text().startswith("127.0.0.1 localhost\n198.51.100.12 node2\n# Added by")
    assert all(n.steps["/etc/hosts"] == "done" for n in report.nodes)
    again = cluster.up(options, bundle_1_24.path)
    assert all(n.steps["/etc/hosts"] == "skipped (every node's name is there)"
               for n in again.nodes)


def test_join_url_takes_port_and_fingerprint_from_add_node_and_needs_an_ip() -> None:
    token = "0123456789abcdef" * 2
    printed = (f"microk8s join 10.0.0.10:25001/{token}/abcdef012345\n\n"
               f"microk8s join 10.0.0.10:25001/{token}/abcdef012345 --worker\n"
               f"microk8s join 172.17.0.1:25001/{token}/abcdef012345\n")
    assert join_url("198.51.100.11", token, printed) == \
        f"198.51.100.11:25001/{token}/abcdef012345"
    # join wants a literal IP: for a host name, the address add-node chose
    assert join_url("node1.example", token, printed) == f"10.0.0.10:25001/{token}/abcdef012345"
    assert join_url("2001:db8::1", token, "") == f"[2001:db8::1]:25000/{token}"


def test_a_failing_install_stops_before_the_join_and_a_rerun_continues(
        bundle: Bundle, cluster: Cluster) -> None:
    cluster.stand_ins["node2"].fail = ("snap install microk8s",)
    cluster.stand_ins["node2"].save()
    with pytest.raises(NodeStepError) as failed:
        cluster.up(mirror_options(bundle), bundle.path)
    error = failed.value
    assert error.node == "node2" and error.step == "install microk8s"
    assert "snap-update-ns failed: stand-in failure" in error.message
    assert "the cluster was not formed" in error.message
    assert not cluster.cluster_file.exists() or cluster.log() == []
    assert cluster.stand_ins["node2"].installed() == {"snapd": "21759", "core20": "2015"}
    assert "microk8s" in cluster.stand_ins["node1"].installed()
    before = {n: len(cluster.changing_calls(n)) for n in ("node1", "node3")}
    node2_before = len(cluster.changing_calls("node2"))

    cluster.up(mirror_options(bundle), bundle.path)
    for name in ("node1", "node3"):
        assert len(cluster.changing_calls(name)) == before[name] + 1  # add-node, join
    # node2 went on with microk8s only: snapd and core20 were not installed again
    assert cluster.changing_calls("node2")[node2_before:node2_before + 2] == [
        ["snap", "ack", "/var/lib/gapkit/snaps/microk8s_7394.assert"],
        ["snap", "install", "/var/lib/gapkit/snaps/microk8s_7394.snap", "--classic"]]
    assert [e["call"] for e in cluster.log()] == ["add-node", "join", "join"]


def test_a_failing_join_names_the_node_and_a_rerun_joins_only_the_rest(
        bundle: Bundle, cluster: Cluster) -> None:
    cluster.stand_ins["node3"].fail = ("join",)
    cluster.stand_ins["node3"].save()
    with pytest.raises(NodeStepError) as failed:
        cluster.up(mirror_options(bundle), bundle.path)
    assert failed.value.node == "node3" and failed.value.step == "join"
    assert "Connection failed" in failed.value.message
    assert "<token>" in failed.value.message  # the token itself is never printed
    assert [(e["node"], e["call"]) for e in cluster.log()] == [
        ("node1", "add-node"), ("node2", "join")]
    cluster.up(mirror_options(bundle), bundle.path)
    assert [(e["node"], e["call"]) for e in cluster.log()] == [
        ("node1", "add-node"), ("node2", "join"), ("node1", "add-node"), ("node3", "join")]
    assert len([c for c in cluster.calls("node2") if c[1:2] == ["join"]]) == 1


def test_nodes_that_never_get_ready_are_named_after_the_timeout(
        bundle: Bundle, cluster: Cluster) -> None:
    for name in ("node2", "node3"):
        cluster.stand_ins[name].ready_after = 10_000
        cluster.stand_ins[name].save()
    options = UpOptions(images_mode="mirror", mirror=bundle.mirror, poll=0.05, ready_timeout=0.5)
    with pytest.raises(ClusterError) as failed:
        cluster.up(options, bundle.path)
    assert "not every node is Ready: node2 (not Ready), node3 (not Ready)" in failed.value.message


# ---- over SSH: three nodes in network namespaces, each with a real sshd ------------------------

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not Path("/usr/sbin/sshd").exists(),
    reason="SSH nodes need root, iproute2 and openssh-server")

PROXY = "http://198.51.100.10:3128"


def node_calls(nodes: SSHNodes, name: str) -> list[list[str]]:
    return [c for c in nodes.node(name).microk8s.calls()
            if c[:2] in (["snap", "install"], ["snap", "ack"], ["microk8s", "join"],
                         ["microk8s", "add-node"], ["snap", "restart"])]


@needs_netns
def test_over_ssh_snaps_and_images_travel_by_sftp_proxy_config_lands_and_the_cluster_is_ready(
        bundle: Bundle, ssh_nodes_factory: Callable[..., SSHNodes]) -> None:
    """The issue's acceptance test: `cluster up` on three SSH nodes (node3 a worker, reached
    through sudo as a non-root user), side-load images and the proxy; node3's sshd killed
    mid-run; a rerun after restarting it finishes without redoing what was done."""
    nodes = ssh_nodes_factory(3)
    inventory = nodes.inventory(nodes={"node3": {"role": "worker", "user": "gapkit",
                                                 "sudo": True}},
                                images={"mode": "sideload"}, proxy=PROXY)
    planned = nodes.gapkit("cluster", "up", "-i", str(inventory), str(bundle.path), "--plan")
    assert planned.returncode == 0, planned.stderr
    assert "$ snap install /var/lib/gapkit/snaps/microk8s_7394.snap --classic" in planned.stdout
    assert "/var/snap/microk8s/common/sideload/gapkit-images.tar: upload" in planned.stdout
    assert "$ [node3] microk8s join 198.51.100.11:25000/<token>/<hash> --worker" in planned.stdout
    assert all(not node_calls(nodes, n.name) for n in nodes.nodes)

    def kill_node3_mid_run(node: str, step: str, detail: str) -> None:
        if node == "node3" and step == "install core20":
            nodes.node("node3").kill_sshd()

    with nodes.from_jump(), pytest.raises(NodeStepError) as failed:
        asyncio.run(up_from_inventory(load_inventory(inventory), bundle.path,
                                      progress=kill_node3_mid_run))
    assert failed.value.node == "node3"
    assert "connection was lost" in failed.value.message or "cannot" in failed.value.message
    assert "the cluster was not formed" in failed.value.message
    assert nodes.node("node3").microk8s.installed() == {"snapd": "21759"}
    assert "microk8s" in nodes.node("node1").microk8s.installed()
    done_before = {n.name: node_calls(nodes, n.name) for n in nodes.nodes}

    nodes.node("node3").start_sshd()
    rerun = nodes.gapkit("cluster", "up", "-i", str(inventory), str(bundle.path), "--json",
                         timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    for name in ("node1", "node2"):
        # nothing redone: only the join sequence is new
        new = node_calls(nodes, name)[len(done_before[name]):]
        assert new == ([["microk8s", "add-node", "--token", ANY_TOKEN, "--token-ttl", "900"]]
                       if name == "node1" else [["microk8s", "join", ANY_URL]])
        steps = next(n for n in report["nodes"] if n["node"] == name)["steps"]
        assert steps["upload"] == "skipped (all there)"
    new3 = node_calls(nodes, "node3")[len(done_before["node3"]):]
    assert ["snap", "install", "/var/lib/gapkit/snaps/snapd_21759.snap"] not in new3
    assert ["snap", "install", "/var/lib/gapkit/snaps/core20_2015.snap"] in new3
    assert new3[-1] == ["microk8s", "join", ANY_URL, "--worker"]
    assert [(e["node"], e["call"]) for e in json.loads(nodes.cluster_file.read_text())["log"]] \
        == [("node1", "add-node"), ("node2", "join"), ("node3", "join")]
    for node in nodes.nodes:
        # the snaps and the images came over SFTP; the plugin imported the images
        assert node.path("/var/lib/gapkit/snaps/microk8s_7394.snap").is_file()
        assert node.path("/var/snap/microk8s/common/etc/sideload/gapkit-images.tar.loaded").is_file()
        assert [e["file"] for e in node.microk8s.sideloads()] == ["gapkit-images.tar"]
        env = node.path("/var/snap/microk8s/current/args/containerd-env").read_text()
        assert f"HTTPS_PROXY={PROXY}" in env and node.address in env
        assert ["snap", "restart", "microk8s"] in node.microk8s.calls()
    status = nodes.gapkit("cluster", "status", "-i", str(inventory), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert all(n["ready"] for n in json.loads(status.stdout)["nodes"])


@needs_netns
def test_over_ssh_an_unreachable_node_stops_everything_then_the_mirror_lands_everywhere(
        bundle: Bundle, ssh_nodes_factory: Callable[..., SSHNodes]) -> None:
    nodes = ssh_nodes_factory(2)
    inventory = nodes.inventory(images={"mode": "mirror", "mirror": bundle.mirror})
    nodes.node("node2").kill_sshd()
    refused = nodes.gapkit("cluster", "up", "-i", str(inventory), str(bundle.path))
    assert refused.returncode == 1
    assert "1 node(s) cannot be reached (node2); nothing was changed" in refused.stderr
    assert node_calls(nodes, "node1") == []
    nodes.node("node2").start_sshd()
    result = nodes.gapkit("cluster", "up", "-i", str(inventory), str(bundle.path), timeout=120)
    assert result.returncode == 0, result.stderr
    for node in nodes.nodes:
        hosts = node.path("/var/snap/microk8s/current/args/certs.d/registry.k8s.io/hosts.toml")
        assert f'[host."{bundle.mirror}"]' in hosts.read_text()
    assert "Ready: node1, node2" in result.stdout


class _Any:
    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.pattern.fullmatch(other) is not None

    def __repr__(self) -> str:
        return f"<matching {self.pattern.pattern}>"


ANY_TOKEN: Any = _Any(r"[0-9a-f]{32}")
ANY_URL: Any = _Any(r"198\.51\.100\.11:25000/[0-9a-f]{32}/[0-9a-f]{12}")
