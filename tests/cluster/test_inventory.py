"""The inventory: the issue's YAML shape works as written; every mistake names the key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gapkit.cluster.inventory import load_inventory
from gapkit.errors import UsageError

ISSUE_EXAMPLE = """\
ssh:                      # defaults for every node
  user: root
  port: 22
  key: ~/.ssh/id_ed25519   # or the ssh agent when absent
  known_hosts: ~/.ssh/known_hosts
  sudo: false              # run node commands through sudo
nodes:
  - {name: node1, address: 198.51.100.11}                  # role defaults to control-plane
  - {name: node2, address: 198.51.100.12, user: ubuntu, sudo: true}
  - {name: node3, address: 198.51.100.13, role: worker}
images:                   # how nodes get images
  mode: mirror            # mirror | sideload
  mirror: http://198.51.100.10:5000
proxy: http://proxy.example:3128   # optional, Option A
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def problem(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as caught:
        load_inventory(write(tmp_path, text))
    return caught.value.message


def test_the_issue_example_loads_with_per_node_overrides(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, ISSUE_EXAMPLE))
    assert [n.name for n in inventory.nodes] == ["node1", "node2", "node3"]
    assert [n.role for n in inventory.nodes] == ["control-plane", "control-plane", "worker"]
    one, two, three = (inventory.target(n) for n in inventory.nodes)
    assert (one.user, one.sudo, one.port) == ("root", False, 22)
    assert (two.user, two.sudo) == ("ubuntu", True)
    assert three.user == "root"
    assert one.key == Path("~/.ssh/id_ed25519").expanduser()
    assert one.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert not one.accept_new_host_keys  # the safe default
    assert inventory.images is not None and inventory.images.mirror == "http://198.51.100.10:5000"
    assert inventory.proxy == "http://proxy.example:3128"
    assert [n.name for n in inventory.control_planes] == ["node1", "node2"]


def test_relative_paths_are_relative_to_the_inventory_file(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    inventory = load_inventory(write(tmp_path, """\
ssh: {key: keys/id_ed25519, known_hosts: ./kh}
nodes: [{name: a, address: 198.51.100.11, key: other}]
images: {mode: mirror, mirror: "https://198.51.100.10:5000", ca: ./ca.crt}
"""))
    target = inventory.target(inventory.nodes[0])
    assert target.key == tmp_path / "other"
    assert target.known_hosts == tmp_path / "kh"
    assert inventory.images is not None and inventory.images.ca == tmp_path / "ca.crt"


def test_without_a_key_the_agent_and_default_keys_are_used(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, "nodes: [{name: a, address: 198.51.100.11}]\n"))
    assert inventory.target(inventory.nodes[0]).key is None
    assert inventory.images is None


@pytest.mark.parametrize(("text", "expected"), [
    ("nodes: [{name: a, address: 198.51.100.11}]\nssh:\n  user: root\n  passwd: x\n",
     ":4: ssh.passwd: unknown key"),
    ("nodes:\n  - name: a\n    address: 198.51.100.11\n    rol: worker\n",
     ":4: nodes[0].rol: unknown key"),
    ("nodes:\n  - name: a\n    address: 198.51.100.11\n    role: master\n",
     ":4: nodes[0].role: Input should be 'control-plane' or 'worker'"),
    ("nodes:\n  - name: a\n    address: 198.51.100.11\n  - name: Bad_Name\n    address: 198.51.100.12\n",
     ":4: nodes[1].name: 'Bad_Name' is not a node name"),
    ("nodes:\n  - name: a\n    address: 198.51.100.300\n", ":3: nodes[0].address: "),
    ("ssh:\n  port: 70000\nnodes: [{name: a, address: 198.51.100.11}]\n",
     ":2: ssh.port: Input should be less than or equal to 65535"),
    ("nodes: []\n", ":1: nodes: List should have at least 1 item"),
    ("ssh: {user: root}\n", "nodes: Field required"),
    ("nodes: [{name: a, address: 198.51.100.11}]\nimages:\n  mode: mirror\n",
     ":3: images: mode mirror needs `mirror: http(s)://HOST:PORT`"),
    ("nodes: [{name: a, address: 198.51.100.11}]\nimages:\n  mode: copy\n",
     ":3: images.mode: Input should be 'mirror' or 'sideload'"),
    ("nodes: [{name: a, address: 198.51.100.11}]\nimages:\n  mode: sideload\n  ca: ./nope.crt\n",
     ":4: images.ca: "),
    ("nodes: [{name: a, address: 198.51.100.11}]\nproxy: proxy.example:3128\n",
     ":2: proxy: 'proxy.example:3128' is not a proxy URL"),
])
def test_every_mistake_names_the_key_and_its_line(tmp_path: Path, text: str, expected: str) -> None:
    message = problem(tmp_path, text)
    assert expected in message
    assert str(tmp_path / "inventory.yaml") in message


def test_duplicate_names_and_addresses_name_the_second_node(tmp_path: Path) -> None:
    message = problem(tmp_path, """\
nodes:
  - {name: a, address: 198.51.100.11}
  - {name: b, address: 198.51.100.12}
  - name: a
    address: 198.51.100.12
""")
    assert ":4: nodes[2].name: 'a' is already the name of nodes[0]" in message
    assert ":5: nodes[2].address: 198.51.100.12 is already the address of nodes[1]" in message


def test_a_cluster_needs_a_control_plane_node(tmp_path: Path) -> None:
    message = problem(tmp_path, "nodes:\n  - {name: a, address: 198.51.100.11, role: worker}\n")
    assert ":2: nodes: no control-plane node" in message


def test_not_yaml_names_the_line(tmp_path: Path) -> None:
    assert ":3: not valid YAML" in problem(tmp_path, "nodes:\n  - name: a\n  address: x\n")


def test_the_cli_reports_inventory_mistakes_with_exit_code_2(tmp_path: Path) -> None:
    from tests.support.cli import gapkit

    path = write(tmp_path, "nodes:\n  - {name: a, address: 198.51.100.11, port: 0}\n")
    for command in ("check", "status"):
        result = gapkit("cluster", command, "-i", str(path), check=False)
        assert result.returncode == 2
        assert f"{path}:2: nodes[0].port: Input should be greater than or equal to 1" in result.stderr
