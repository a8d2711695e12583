"""`gapkit cluster status` (and its parsing) against SSH nodes in namespaces.

`snap` and `microk8s` on the nodes are the stand-ins of tests/support/microk8s.py (no MicroK8s
snap can be installed here): they keep install and cluster state, answer `microk8s version` and
`kubectl get nodes -o json`, and hand `microk8s ctr` to a real containerd.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from gapkit.cluster.status import (
    NodeStatus,
    match_ready,
    parse_image_list,
    parse_kube_nodes,
    parse_version,
)
from tests.support.containerd import Containerd
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.sshnodes import SSHNode, SSHNodes

needs_nodes = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not Path("/usr/sbin/sshd").exists(),
    reason="SSH nodes need root, iproute2 and openssh-server")
TOKEN = "0123456789abcdef0123456789abcdef"


def test_parsing_version_images_and_nodes() -> None:
    assert parse_version("MicroK8s v1.32.3 revision 7964\n") == ("v1.32.3", "7964")
    assert parse_version("nonsense") == (None, None)
    assert parse_image_list("docker.io/library/nginx:1.27\nsha256:abc\n\n"
                            "registry.k8s.io/pause:3.10\n") == [
        "docker.io/library/nginx:1.27", "registry.k8s.io/pause:3.10"]
    kube = parse_kube_nodes(json.dumps({"items": [
        {"metadata": {"name": "n1"}, "status": {
            "addresses": [{"type": "InternalIP", "address": "198.51.100.11"}],
            "conditions": [{"type": "Ready", "status": "True"}]}},
        {"metadata": {"name": "other-name"}, "status": {
            "addresses": [{"type": "InternalIP", "address": "198.51.100.12"}],
            "conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}}]}))
    by_name, by_address, absent = (NodeStatus("n1", "198.51.100.11", "control-plane"),
                                   NodeStatus("n2", "198.51.100.12", "worker"),
                                   NodeStatus("n3", "198.51.100.13", "worker"))
    for status in (by_name, by_address, absent):
        match_ready(status, kube)
    assert (by_name.ready, by_name.ready_detail) == (True, "Ready")
    assert (by_address.ready, by_address.ready_detail) == (False, "NotReady: KubeletNotReady")
    assert absent.ready is False and "not in the cluster" in absent.ready_detail


def install(node: SSHNode) -> None:
    """What `cluster up` does to a node, through the stand-in `snap` (files made on the node)."""
    node.run("sh", "-c", "mkdir -p /var/lib/gapkit && touch /var/lib/gapkit/core20_1.snap "
             "/var/lib/gapkit/microk8s_7964.snap")
    node.run("snap", "install", "/var/lib/gapkit/core20_1.snap", "--dangerous")
    node.run("snap", "install", "/var/lib/gapkit/microk8s_7964.snap", "--classic", "--dangerous")


def status(nodes: SSHNodes, *args: str) -> tuple[int, dict[str, dict[str, object]], str]:
    result = nodes.gapkit("cluster", "status", "-i", str(nodes.inventory()), "--json", *args)
    assert result.stdout, result.stderr
    data = json.loads(result.stdout)
    return result.returncode, {n["name"]: n for n in data["nodes"]}, result.stderr


@needs_nodes
def test_status_reports_version_images_and_ready_per_node(
        ssh_nodes_factory: Callable[..., SSHNodes], containerd: Containerd) -> None:
    nodes = ssh_nodes_factory(3, containerd_address=containerd.address)
    code, found, _ = status(nodes)
    assert code == 1
    assert all(n["reachable"] for n in found.values())
    assert found["node1"]["error"] == "MicroK8s is not installed"
    assert found["node1"]["ready"] is None

    for node in nodes.nodes:
        install(node)
    one, two, three = nodes.nodes
    one.run("microk8s", "add-node", "--token", TOKEN, "--token-ttl", "600")
    two.run("microk8s", "join", f"{one.address}:25000/{TOKEN}")
    code, found, _ = status(nodes)
    assert code == 1
    assert {n: (v["microk8s"], v["images"], v["ready"]) for n, v in found.items()} == {
        "node1": ("v1.32.3", 0, True), "node2": ("v1.32.3", 0, True),
        "node3": ("v1.32.3", 0, False)}
    assert "not in the cluster" in str(found["node3"]["ready_detail"])

    three.run("microk8s", "join", f"{one.address}:25000/{TOKEN}", "--worker")
    code, found, _ = status(nodes)
    assert code == 0 and all(v["ready"] for v in found.values())
    table = nodes.gapkit("cluster", "status", "-i", str(nodes.inventory()))
    assert table.returncode == 0
    for name in ("node1", "node2", "node3"):
        assert name in table.stdout
    assert "v1.32.3" in table.stdout and "Ready" in table.stdout

    # One node down: it is named, the others are still reported; Ready comes from node2 when
    # node1 (the first control plane) does not answer.
    one.kill_sshd()
    code, found, _ = status(nodes)
    assert code == 1
    assert found["node1"]["reachable"] is False
    assert str(found["node1"]["error"]).startswith("node1: connect: cannot reach root@198.51.100.11:22")
    assert found["node2"]["ready"] is True and found["node3"]["ready"] is True


@needs_nodes
def test_status_counts_a_bundles_images_on_each_node(
        ssh_nodes_factory: Callable[..., SSHNodes], containerd: Containerd, tmp_path: Path) -> None:
    present = ImageSpec("docker.io/library/app:1", [make_layer(1, 300)])
    absent = ImageSpec("registry.k8s.io/pause:3.10", [make_layer(2, 200)])
    on_node = tmp_path / "on-node"
    write_layout(on_node, [present])
    archive = tmp_path / "on-node.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(on_node, arcname=".")
    containerd.ctr("image", "import", "--no-unpack", str(archive))
    layout = tmp_path / "bundle-layout"
    write_layout(layout, [present, absent])
    nodes = ssh_nodes_factory(1, containerd_address=containerd.address)
    install(nodes.nodes[0])
    nodes.nodes[0].run("microk8s", "add-node", "--token", TOKEN)
    code, found, _ = status(nodes, "--bundle", str(layout))
    assert code == 0
    assert found["node1"]["images"] == 1
    assert found["node1"]["bundle"] == {"present": 1, "total": 2,
                                        "missing": ["registry.k8s.io/pause:3.10"]}
    table = nodes.gapkit("cluster", "status", "-i", str(nodes.inventory()), "--bundle", str(layout))
    assert "1 (1/2 of the bundle)" in table.stdout
    assert "node1: missing 1 image(s): registry.k8s.io/pause:3.10" in table.stdout
