"""`gapkit cluster check` over SSH nodes in namespaces: node checks on each node, and the port
matrix probed from each node to the others (bash's /dev/tcp on the node: nothing of gapkit runs
there). `snap` and `microk8s` on the nodes are the stand-ins of tests/support/microk8s.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gapkit.cluster.check import classify, parse_probe_output, peer_ports_check
from tests.support.netns import wait_for_line
from tests.support.sshnodes import SSHNodes

needs_nodes = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not Path("/usr/sbin/sshd").exists(),
    reason="SSH nodes need root, iproute2 and openssh-server")


def test_probe_output_and_states() -> None:
    tool, found = parse_probe_output(
        "tool bash\n198.51.100.12:16443 0 \n"
        "198.51.100.12:19001 1 bash: connect: Connection refused\n"
        "198.51.100.13:10250 124 \n198.51.100.14:25000 1 connect: No route to host\n")
    assert tool == "bash"
    assert {k: v.state for k, v in found.items()} == {
        "198.51.100.12:16443": "connected", "198.51.100.12:19001": "refused",
        "198.51.100.13:10250": "timed out", "198.51.100.14:25000": "unreachable"}
    assert classify("nc", 1, "").state == "failed"
    states = {"16443": classify("bash", 0, ""), "25000": classify("bash", 1, "Connection refused")}
    assert peer_ports_check("node2", "198.51.100.12", states, "bash").status == "WARN"
    states["10250"] = classify("bash", 124, "")
    check = peer_ports_check("node2", "198.51.100.12", states, "bash")
    assert check.status == "FAIL" and "10250: timed out: open them on node2" in check.fix
    assert peer_ports_check("node2", "x", {}, "none").status == "WARN"


@needs_nodes
def test_cluster_check_runs_node_checks_and_the_port_matrix_from_every_node(
        ssh_nodes_factory: Callable[..., SSHNodes]) -> None:
    nodes = ssh_nodes_factory(3)
    for node in nodes.nodes:
        node.ns.add_default_route()
    two = nodes.node("node2")
    listener = two.ns.popen(sys.executable, "-m", "gapkit", "node", "listen", "--ports",
                            "16443,25000", "--address", two.address, stdout_pipe=True)
    wait_for_line(listener, "listening on")
    dropped = nodes.node("node3").ns.iptables_drop(10250)
    inventory = nodes.inventory()

    result = nodes.gapkit("cluster", "check", "-i", str(inventory), "--timeout", "1", "--json")
    if dropped:
        assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    matrix = data["matrix"]
    assert {src: {dst: {p: s["state"] for p, s in row.items()} for dst, row in peers.items()}
            for src, peers in matrix.items()}["node1"]["node2"] == {
        "16443": "connected", "25000": "connected", "19001": "refused", "10250": "refused"}
    assert matrix["node3"]["node1"]["16443"]["state"] == "refused"
    if dropped:
        assert matrix["node1"]["node3"]["10250"]["state"] == "timed out"
        assert matrix["node2"]["node3"]["10250"]["state"] == "timed out"
    by_node = {n["name"]: n for n in data["nodes"]}
    assert all(n["probe_tool"] == "bash" for n in by_node.values())
    checks = {name: {c["name"]: c["status"] for c in n["report"]["checks"]}
              for name, n in by_node.items()}
    assert checks["node1"]["default route"] == "PASS"
    assert checks["node1"]["ports to node2"] == "WARN"  # refused: nothing listens there yet
    assert checks["node1"]["ports to node3"] == ("FAIL" if dropped else "WARN")
    assert checks["node2"]["local ports"] == "WARN"  # `gapkit node listen` holds two ports
    assert by_node["node2"]["report"]["node"] == "node2"  # the node's own host name

    # One node down: named once, the others are still checked; the table says it all.
    nodes.node("node3").kill_sshd()
    table = nodes.gapkit("cluster", "check", "-i", str(inventory), "--timeout", "1")
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert any(line.split()[:4] == ["reachable", "PASS", "PASS", "FAIL"] for line in lines)
    assert any(line.split()[:4] == ["node1", "node2", "connected", "connected"] for line in lines)
    assert "FAIL node3: node3: connect: cannot reach root@198.51.100.13:22" in table.stdout
    assert "UDP 4789 (VXLAN) is not probed" in table.stderr
