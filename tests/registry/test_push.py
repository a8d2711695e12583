"""`gapkit registry push` into real docker-registry instances, then real `ctr` pulls every image
through the hosts.toml files gapkit printed, by the images' upstream names.

The node side has no internet: each pull can only succeed through the mirror.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import gapkit
from tests.support.containerd import Containerd
from tests.support.peers import Registry
from tests.support.upstreams import Upstreams

IMAGES = [
    "docker.io/calico/cni:v3.28.1",
    "docker.io/library/busybox:1.28.4",
    "registry.k8s.io/pause:3.10",        # multi-arch index
    "docker.io/coredns/coredns:1.10.1",  # multi-arch index
    "quay.io/metallb/speaker:v0.14.8",
]




@dataclass
class Source:
    bundle: Path
    digests: dict[str, str]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """A bundle with both platforms of its multi-arch images (so indexes push unchanged)."""
    folder = tmp_path_factory.mktemp("push-source")
    upstreams = Upstreams(folder / "upstreams")
    try:
        digests = upstreams.push(IMAGES)
        bundle = upstreams.build_bundle(folder / "bundle.tar", IMAGES,
                                        ("linux/amd64", "linux/arm64"))
        yield Source(bundle, digests)
    finally:
        upstreams.stop()


def pull_all(containerd: Containerd, hosts_dir: Path, digests: dict[str, str]) -> None:
    for name, digest in digests.items():
        containerd.ctr("image", "pull", "--platform", "linux/amd64", "--hosts-dir",
                       str(hosts_dir), name)
        listed = containerd.ctr("image", "ls", "name==" + name).stdout
        assert digest in listed, f"{name}: expected {digest} in\n{listed}"


def test_flat_push_then_ctr_pulls_every_image_through_the_printed_hosts_toml(
        source: Source, registry: Registry, containerd: Containerd, tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    out = gapkit("registry", "push", str(source.bundle), "--to", registry.host, "--plain-http",
                 "--hosts-dir", str(hosts), "--json")
    report = json.loads(out.stdout)
    assert {i["destination"] for i in report["images"]} == {
        f"{registry.host}/calico/cni:v3.28.1", f"{registry.host}/library/busybox:1.28.4",
        f"{registry.host}/pause:3.10", f"{registry.host}/coredns/coredns:1.10.1",
        f"{registry.host}/metallb/speaker:v0.14.8"}
    assert [i["digest"] for i in report["images"]] == [source.digests[i["source"]]
                                                        for i in report["images"]]
    assert sorted(report["hosts_toml"]) == ["docker.io", "quay.io", "registry.k8s.io"]
    assert f'[host."http://{registry.host}"]' in report["hosts_toml"]["registry.k8s.io"]
    assert sorted(p.name for p in hosts.iterdir()) == ["docker.io", "quay.io", "registry.k8s.io"]
    pull_all(containerd, hosts, source.digests)

    again = json.loads(gapkit("registry", "push", str(source.bundle), "--to", registry.host,
                              "--plain-http", "--json").stdout)
    assert again["blobs_copied"] == 0
    assert again["bytes_copied"] == 0


def test_upstream_prefix_push_over_tls_with_credentials(
        source: Source, tmp_path: Path, containerd: Containerd) -> None:
    from tests.support.peers import TestCA

    ca = TestCA(tmp_path / "ca").create()
    registry = Registry(tmp_path / "reg", tls=ca, users={"site": "pw"}).start()
    try:
        hosts = tmp_path / "certs.d"
        out = gapkit("registry", "push", str(source.bundle), "--to", f"{registry.host}/mirror",
                     "--upstream-prefix", "--ca", str(ca.ca_cert), "--creds", "site:pw",
                     "--hosts-dir", str(hosts), "--json")
        report = json.loads(out.stdout)
        assert f"{registry.host}/mirror/registry.k8s.io/pause:3.10" in {
            i["destination"] for i in report["images"]}
        text = (hosts / "docker.io" / "hosts.toml").read_text()
        assert f'[host."https://{registry.host}/v2/mirror/docker.io"]' in text
        assert "override_path = true" in text
        assert 'ca = "ca.crt"' in text
        assert (hosts / "docker.io" / "ca.crt").read_bytes() == ca.ca_cert.read_bytes()
        assert report["hosts_toml"]["docker.io"] == text
        pull_all(containerd, hosts, source.digests)
    finally:
        registry.stop()


def test_a_flat_collision_between_upstreams_is_refused_naming_both(
        upstreams: Upstreams, registry: Registry, tmp_path: Path) -> None:
    both = ["docker.io/team/app:1", "quay.io/team/app:1"]
    upstreams.push(both)
    layout = tmp_path / "layout"
    gapkit("copy", *upstreams.source_flags(), *[f"docker://{b}" for b in both], f"oci:{layout}")
    out = gapkit("registry", "push", str(layout), "--to", registry.host, "--plain-http",
                 check=False)
    assert out.returncode == 2
    assert "docker.io/team/app:1" in out.stderr and "quay.io/team/app:1" in out.stderr
    assert "--upstream-prefix" in out.stderr
    status, body, _ = registry.request("/v2/_catalog")
    assert json.loads(body)["repositories"] == []
    gapkit("registry", "push", str(layout), "--to", registry.host, "--plain-http",
           "--upstream-prefix")
    status, body, _ = registry.request("/v2/_catalog")
    assert status == 200
    assert json.loads(body)["repositories"] == ["docker.io/team/app", "quay.io/team/app"]
