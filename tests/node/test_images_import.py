"""`gapkit images import` on a node: the images land in a real containerd (namespace k8s.io) and
every one is checked by name and digest afterwards.

Stand-ins (TESTBED.md): `microk8s` is the executable of `tests/support/microk8s.py`, first on
PATH. `microk8s version` prints a realistic version line (1.32 or 1.24 here); `microk8s ctr …`
and `microk8s images import` hand over to the real `ctr` against the test's containerd in
namespace k8s.io, the latter as the cluster agent does (`ctr image import --platform amd64 -`),
printing a failure and exiting 0 when ctr fails, as MicroK8s does. The bundle is built by
`gapkit bundle create` from real registries standing in for the upstreams.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import gapkit
from tests.support.containerd import Containerd
from tests.support.microk8s import StandInMicroK8s
from tests.support.upstreams import Upstreams

IMAGES = [
    "registry.k8s.io/pause:3.10",        # multi-arch index
    "docker.io/calico/cni:v3.28.1",
    "docker.io/calico/node:v3.28.1",
    "quay.io/metallb/speaker:v0.14.8",
]


@dataclass
class Source:
    bundle: Path
    layout: Path
    digests: dict[str, str]
    folder: Path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """A bundle holding amd64 and arm64 (so a lean amd64 tar is smaller than the bundle)."""
    folder = tmp_path_factory.mktemp("import-source")
    upstreams = Upstreams(folder / "upstreams")
    try:
        digests = upstreams.push(IMAGES)
        bundle = upstreams.build_bundle(folder / "bundle.tar", IMAGES,
                                        ("linux/amd64", "linux/arm64"))
        yield Source(bundle, upstreams.folder / "layout", digests, folder)
    finally:
        upstreams.stop()


@pytest.fixture
def node(tmp_path: Path, containerd: Containerd, monkeypatch: pytest.MonkeyPatch) -> StandInMicroK8s:
    stand_in = StandInMicroK8s(tmp_path / "stand-in", containerd_address=containerd.address)
    stand_in.install()
    monkeypatch.setenv("PATH", stand_in.path)
    return stand_in


def listed(containerd: Containerd) -> dict[str, str]:
    """What the node's containerd holds in k8s.io (read independently of gapkit)."""
    out = containerd.ctr("image", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out if line.strip()}


def test_on_1_25_and_newer_a_bundle_goes_as_a_lean_tar_to_microk8s_images_import(
        source: Source, node: StandInMicroK8s, containerd: Containerd) -> None:
    out = gapkit("images", "import", str(source.bundle), "--json")
    report = json.loads(out.stdout)
    assert report["microk8s"] == "1.32.3" and report["platform"] == "linux/amd64"
    assert report["command"] == ["microk8s", "images", "import"]
    assert {i["name"]: i["found"] for i in report["images"]} == source.digests
    assert all(i["ok"] for i in report["images"])
    (sent,) = node.imports()
    with tarfile.open(source.bundle) as tar:
        in_bundle = set(tar.getnames())
    members = {str(m) for m in sent["members"]}  # type: ignore[attr-defined]
    assert not [m for m in members if m.startswith("gapkit/")]
    assert "gapkit/bundle.json" in in_bundle
    # pause's arm64 manifest, config and layer stay behind: only amd64 goes to the node.
    blobs = {m for m in members if m.startswith("blobs/")}
    assert blobs < {m for m in in_bundle if m.startswith("blobs/")}
    assert listed(containerd) == source.digests
    assert ["microk8s", "ctr", "image", "ls"] in node.calls()


def test_before_1_25_the_bundle_goes_as_is_to_microk8s_ctr_image_import(
        source: Source, node: StandInMicroK8s, containerd: Containerd) -> None:
    node.version = "v1.24.17"
    node.save()
    out = gapkit("images", "import", str(source.bundle))
    assert ["microk8s", "ctr", "image", "import", "--platform", "linux/amd64", "-"] in node.calls()
    assert node.imports() == []
    assert "4 image(s) imported into MicroK8s 1.24.17" in out.stderr
    assert listed(containerd) == source.digests
    for name, digest in source.digests.items():
        assert f"{name}@{digest}" in out.stdout


def test_an_import_that_fails_but_exits_0_is_caught_naming_the_missing_images(
        source: Source, node: StandInMicroK8s, containerd: Containerd) -> None:
    node.fail_imports = True
    node.save()
    out = gapkit("images", "import", str(source.bundle), check=False)
    assert out.returncode == 1
    assert "missing after `microk8s images import` (which exited 0)" in out.stderr
    assert "Failed to import images on 127.0.0.1" in out.stderr
    for name in IMAGES:
        if name not in listed(containerd):
            assert f"{name} is not there" in out.stderr


def test_a_docker_save_tar_goes_as_is_and_is_checked_by_name(
        source: Source, node: StandInMicroK8s, containerd: Containerd, tmp_path: Path) -> None:
    name = "docker.io/calico/cni:v3.28.1"
    archive = tmp_path / "cni.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{source.layout}:{name}",
                    f"docker-archive:{archive}:{name}"], check=True, capture_output=True)
    report = json.loads(gapkit("images", "import", str(archive), "--json").stdout)
    assert report["fed"] == "the source"
    assert [(i["name"], i["expected"], i["ok"]) for i in report["images"]] == [(name, None, True)]
    assert node.imports()[0]["bytes"] == archive.stat().st_size
    assert name in listed(containerd)


def test_no_microk8s_or_a_folder_is_a_clear_error(source: Source, tmp_path: Path) -> None:
    missing = gapkit("images", "import", str(source.bundle), check=False)
    assert missing.returncode == 1 and "MicroK8s is not installed" in missing.stderr
    folder = gapkit("images", "import", str(source.layout), check=False)
    assert folder.returncode == 2 and "give a bundle or an image tar" in folder.stderr
