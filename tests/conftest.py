"""Shared fixtures: real peers on loopback, stopped even when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.peers import Registry, TestCA
from tests.support.sshnodes import SSHNodes
from tests.support.upstreams import Upstreams


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A plain-HTTP CNCF registry."""
    reg = Registry(tmp_path / "registry")
    try:
        yield reg.start()
    finally:
        reg.stop()


@pytest.fixture
def second_registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry2")
    try:
        yield reg.start()
    finally:
        reg.stop()


@pytest.fixture
def test_ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca").create()


@pytest.fixture
def tls_registry(tmp_path: Path, test_ca: TestCA) -> Iterator[Registry]:
    """A CNCF registry over HTTPS with a test CA (`registry.tls.ca_cert`)."""
    reg = Registry(tmp_path / "tls-registry", tls=test_ca)
    try:
        yield reg.start()
    finally:
        reg.stop()


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[Registry]:
    """A plain-HTTP CNCF registry with htpasswd basic auth (user `gapkit`, password `s3cret`)."""
    reg = Registry(tmp_path / "auth-registry", users={"gapkit": "s3cret"})
    try:
        yield reg.start()
    finally:
        reg.stop()



@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A real containerd (CRI plugin off), its own root, state and socket; see `Containerd.ctr`."""
    daemon = Containerd(tmp_path / "containerd")
    try:
        yield daemon.start()
    finally:
        daemon.stop()


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Upstreams]:
    """Real registries standing in for docker.io, registry.k8s.io, quay.io (use as mirrors)."""
    stand_ins = Upstreams(tmp_path / "upstreams")
    try:
        yield stand_ins
    finally:
        stand_ins.stop()


@pytest.fixture
def ssh_nodes_factory(tmp_path: Path) -> Iterator[Callable[..., SSHNodes]]:
    """Make `SSHNodes(count, stand_in={...})`: nodes in network namespaces with a real sshd
    each, their own /etc and /var, the stand-in snap/microk8s on PATH (tests/support/sshnodes.py);
    every one is closed (processes by PID, namespaces deleted) even when the test fails."""
    made: list[SSHNodes] = []

    def make(count: int = 3, **stand_in: object) -> SSHNodes:
        nodes = SSHNodes(tmp_path / f"ssh-nodes-{len(made)}", count, dict(stand_in))
        made.append(nodes)
        return nodes.start()

    try:
        yield make
    finally:
        for nodes in made:
            nodes.close()


@pytest.fixture
def ssh_nodes(ssh_nodes_factory: Callable[..., SSHNodes]) -> SSHNodes:
    """Three SSH nodes (node1..node3 at 198.51.100.11-13; the jump host is 198.51.100.10)."""
    return ssh_nodes_factory(3)
