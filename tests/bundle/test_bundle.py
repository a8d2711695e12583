"""Bundles built from real registries standing in for docker.io, registry.k8s.io and quay.io,
then read by the real programs on the other side of the gap: ctr (namespace k8s.io) and skopeo.

The snaps are synthetic (`tests/support/snaps.py`) and come in through `--snaps-from`: no real
MicroK8s snap can be downloaded here.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gapkit.bundle import reuse
from gapkit.catalog import resolve_images
from gapkit.oci.model import Descriptor, Digest
from gapkit.oci.reference import Reference
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.units import human_bytes
from tests.support.cli import gapkit
from tests.support.containerd import Containerd
from tests.support.images import partial_bundle_blobs
from tests.support.snaps import make_snap
from tests.support.upstreams import Upstreams

RELEASE = "1.32"




@dataclass
class Built:
    bundle: Path
    images: list[str]
    upstreams: Upstreams
    snaps: Path
    folder: Path

    def source_flags(self) -> list[str]:
        return self.upstreams.source_flags()


def _snaps(folder: Path) -> Path:
    for name, revision in (("microk8s", 7394), ("core20", 2015), ("snapd", 21759)):
        make_snap(folder, name, revision)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    folder = tmp_path_factory.mktemp("bundle")
    upstreams = Upstreams(folder / "upstreams")
    try:
        images = [str(i.reference) for i in resolve_images(microk8s=RELEASE, addons=["metallb"])]
        upstreams.push(images)
        built = Built(folder / "microk8s.tar", images, upstreams, _snaps(folder / "snaps"), folder)
        gapkit("bundle", "create", "--microk8s", RELEASE, "--addons", "metallb",
               "--snaps-from", str(built.snaps), "--cache", str(folder / "cache"),
               "-o", str(built.bundle), *built.source_flags())
        yield built
    finally:
        upstreams.stop()


def test_the_bundle_needs_three_upstreams_and_holds_pause_calico_and_coredns(built: Built) -> None:
    assert set(built.upstreams.registries) == {"docker.io", "registry.k8s.io", "quay.io"}
    names = set(built.images)
    assert "registry.k8s.io/pause:3.10" in names
    assert {f"docker.io/calico/{c}:v3.28.1" for c in ("cni", "node", "kube-controllers")} <= names
    assert any(n.startswith("docker.io/coredns/coredns:") for n in names)


def test_ctr_imports_the_bundle_itself_and_lists_every_image_by_full_name(
        built: Built, containerd: Containerd) -> None:
    containerd.ctr("image", "import", "--platform", "linux/amd64", str(built.bundle))
    assert containerd.image_names() == sorted(built.images)
    listed = containerd.ctr("image", "ls").stdout
    for name in built.images:
        assert built.upstreams.pushed[name] in listed


def test_skopeo_reads_the_bundle(built: Built) -> None:
    for name in built.images:
        out = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{built.bundle}:{name}"],
                             capture_output=True, check=True)
        assert "sha256:" + hashlib.sha256(out.stdout).hexdigest() == built.upstreams.pushed[name]


def test_verify_passes_and_inspect_tells_release_snaps_and_registries(built: Built) -> None:
    verified = json.loads(gapkit("bundle", "verify", "--json", str(built.bundle)).stdout)
    assert verified["ok"] is True
    assert verified["images"] == len(built.images)
    assert verified["snaps"] == 3
    summary = json.loads(gapkit("bundle", "inspect", "--json", str(built.bundle)).stdout)
    assert summary["microk8s"] == RELEASE
    assert summary["snap_base"] == "core20"
    assert summary["registries"] == ["docker.io", "quay.io", "registry.k8s.io"]
    assert [s["name"] for s in summary["snaps"]] == ["snapd", "core20", "microk8s"]
    assert {i["reference"] for i in summary["images"]} == set(built.images)
    assert summary["shared_bytes_saved"] > 0
    sources = {i["reference"]: i["sources"] for i in summary["images"]}
    speakers = [ref for ref in sources if ref.startswith("quay.io/metallb/speaker:")]
    assert speakers and any("metallb" in s for s in sources[speakers[0]])


def test_exported_images_tar_imports_into_ctr_and_carries_no_snaps(
        built: Built, containerd: Containerd) -> None:
    exported = built.folder / "images.tar"
    gapkit("images", "export", str(built.bundle), "-o", str(exported))
    with tarfile.open(exported) as tar:
        names = tar.getnames()
    assert not [n for n in names if n.startswith("gapkit/")]
    containerd.ctr("image", "import", "--platform", "linux/amd64", str(exported))
    assert containerd.image_names() == sorted(built.images)
    assert exported.stat().st_size < built.bundle.stat().st_size


def _rewrite(source: Path, target: Path, *, drop: str | None = None,
             extra: Sequence[tuple[tarfile.TarInfo, bytes]] = ()) -> None:
    with tarfile.open(source) as src, tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            if member.name == drop:
                continue
            data = src.extractfile(member) if member.isfile() else None
            dst.addfile(member, data)
        for info, payload in extra:
            dst.addfile(info, io.BytesIO(payload) if payload else None)


def _member(name: str, payload: bytes = b"x", kind: bytes = tarfile.REGTYPE,
            link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(payload) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, payload if kind == tarfile.REGTYPE else b""


def _a_layer(bundle: Path) -> tuple[str, int, int]:
    with tarfile.open(bundle) as tar:
        biggest = max((m for m in tar.getmembers() if m.name.startswith("blobs/")),
                      key=lambda m: m.size)
        return biggest.name, biggest.offset_data, biggest.size


def _damage(kind: str, bundle: Path, target: Path) -> str:
    """Write a damaged copy of `bundle`; return what verify must name."""
    if kind == "truncated":
        data = bundle.read_bytes()
        target.write_bytes(data[: len(data) * 2 // 3])
        return "truncated"
    if kind == "flipped byte":
        shutil.copy(bundle, target)
        name, offset, size = _a_layer(bundle)
        with open(target, "r+b") as f:
            f.seek(offset + size // 2)
            byte = f.read(1)
            f.seek(offset + size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        return name.rsplit("/", 1)[1]
    if kind == "missing blob":
        name, _, _ = _a_layer(bundle)
        _rewrite(bundle, target, drop=name)
        return name.rsplit("/", 1)[1]
    if kind == "dot-dot member":
        _rewrite(bundle, target, extra=[_member("../outside")])
        return "../outside"
    if kind == "absolute member":
        _rewrite(bundle, target, extra=[_member("/etc/cron.d/evil")])
        return "/etc/cron.d/evil"
    if kind == "link member":
        _rewrite(bundle, target, extra=[_member("gapkit/link", kind=tarfile.SYMTYPE,
                                                link="/etc/passwd")])
        return "gapkit/link"
    if kind == "duplicate member":
        _rewrite(bundle, target, extra=[_member("gapkit/bundle.json", b"{}")])
        return "gapkit/bundle.json"
    raise AssertionError(kind)


DAMAGE = ["truncated", "flipped byte", "missing blob", "dot-dot member", "absolute member",
          "link member", "duplicate member"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_names_each_kind_of_damage_and_other_commands_refuse_it(
        built: Built, kind: str, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.tar"
    culprit = _damage(kind, built.bundle, damaged)
    out = gapkit("bundle", "verify", str(damaged), check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert culprit in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    commands = [["images", "export", str(damaged), "-o", str(tmp_path / "out.tar")]]
    if kind not in ("flipped byte", "missing blob"):  # inspect reads no blob content
        commands.append(["bundle", "inspect", str(damaged)])
    for command in commands:
        refused = gapkit(*command, check=False)
        assert refused.returncode != 0, (command, refused.stdout)
        assert refused.stderr.startswith("error:"), refused.stderr
        assert "Traceback" not in refused.stderr
    assert not (tmp_path / "out.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tar")]


def test_an_interrupted_build_restarts_without_fetching_finished_blobs(
        upstreams: Upstreams, tmp_path: Path) -> None:
    """The build writes its bundle in the cache until it is complete; a killed build leaves it
    there, and the next one takes every whole blob from it instead of fetching it again."""
    refs = [f"docker.io/team/app{i}:1" for i in range(4)]
    upstreams.push(refs, layer_size=8_000_000)
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "gapkit", "bundle", "create", "--jobs", "1", "--cache",
            str(cache), "-o", str(tmp_path / "b.tar"), *[f"--image={r}" for r in refs],
            *upstreams.mirror_flags(), "--plain-http", upstreams.registries["docker.io"].host]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if sum(size > 1_000_000 for size in partial_bundle_blobs(cache).values()) >= 2:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    kept = partial_bundle_blobs(cache)
    assert not (tmp_path / "b.tar").exists() and len(kept) >= 2
    report = json.loads(gapkit(*args[3:], "--json").stdout)
    fetched = report["fetched"]
    # every layer and config is fetched once, except the whole ones the killed build left
    # (manifests, which it also wrote, are always fetched again: a tag may have moved)
    manifests = {image["digest"] for image in report["manifest"]["images"]}
    kept = {digest: size for digest, size in kept.items() if digest not in manifests}
    assert fetched["bytes_copied"] + sum(kept.values()) == report["manifest"]["blob_bytes"]
    assert fetched["blobs_reused"] == len(kept) >= 1
    assert fetched["bytes_reused"] == sum(kept.values())
    assert json.loads(gapkit("bundle", "verify", "--json", str(tmp_path / "b.tar")).stdout)["ok"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert list((cache / "partial").iterdir()) == []  # the partial became the bundle


def test_a_damaged_blob_of_an_earlier_bundle_is_fetched_again_and_a_warm_build_matches(
        upstreams: Upstreams, tmp_path: Path) -> None:
    """Bundles built before serve as the cache of the next build; their blobs are checked on
    use, so a damaged one is fetched again and named in a warning."""
    refs = [f"docker.io/team/app{i}:1" for i in range(2)]
    upstreams.push(refs, layer_size=3_000_000)
    cache = tmp_path / "cache"
    flags = ["--no-snaps", "--cache", str(cache), *[f"--image={r}" for r in refs],
             *upstreams.source_flags(), "--json"]
    cold_tar = tmp_path / "cold.tar"
    cold = json.loads(gapkit("bundle", "create", "-o", str(cold_tar), *flags).stdout)
    assert cold["fetched"]["blobs_copied"] > 0 and not cold["warnings"]
    assert cold["fetched"]["bytes_copied"] == cold["manifest"]["blob_bytes"]

    warm = json.loads(gapkit("bundle", "create", "-o", str(tmp_path / "warm.tar"), *flags).stdout)
    assert warm["fetched"]["bytes_copied"] == 0 and not warm["warnings"]
    assert warm["fetched"]["bytes_reused"] == cold["manifest"]["blob_bytes"]

    with tarfile.open(cold_tar) as tar:
        biggest = max((m for m in tar if m.name.startswith("blobs/sha256/")),
                      key=lambda m: m.size)
    digest = "sha256:" + biggest.name.rsplit("/", 1)[1]
    # Rot on disk, which leaves size and times as they were (a file changed by a program is
    # not used at all). The newest bundle is the first source.
    warm_tar = tmp_path / "warm.tar"
    times = warm_tar.stat()
    with open(warm_tar, "r+b") as f:
        f.seek(find_member(warm_tar, biggest.name) + biggest.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(warm_tar, ns=(times.st_atime_ns, times.st_mtime_ns))
    again = json.loads(gapkit("bundle", "create", "-o", str(tmp_path / "again.tar"),
                              *flags).stdout)
    assert again["warnings"] == [
        f"blob {digest} in {tmp_path / 'warm.tar'} was damaged; fetched it again"]
    assert again["fetched"]["blobs_copied"] == 1
    assert again["fetched"]["bytes_copied"] == biggest.size
    for name in ("cold.tar", "again.tar"):
        assert json.loads(gapkit("bundle", "verify", "--json", str(tmp_path / name)).stdout)["ok"]
    assert [i["digest"] for i in again["manifest"]["images"]] == \
        [i["digest"] for i in cold["manifest"]["images"]]
    text = gapkit("bundle", "create", "-o", str(tmp_path / "text.tar"), *flags[:-1]).stdout
    assert f"0 blob(s) fetched, {again['fetched']['blobs_reused'] + 1} taken from earlier " \
        "builds" in text
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def find_member(archive: Path, name: str) -> int:
    """Where member `name`'s data starts in `archive`."""
    with tarfile.open(archive) as tar:
        return tar.getmember(name).offset_data


def test_a_build_names_the_partial_bundles_other_stopped_builds_left(
        upstreams: Upstreams, tmp_path: Path) -> None:
    """The partial bundle of a stopped build of another output is a blob source, is kept (it is
    that build's resume point), and the finished build says it is there and how big."""
    refs = ["docker.io/team/other:1"]
    upstreams.push(refs, layer_size=300_000)
    cache = tmp_path / "cache"
    stopped = reuse.new_partial(cache, tmp_path / "elsewhere.tar")
    data = b"a blob of a build that was stopped" * 1000

    async def stop_a_build() -> None:
        store = ArchiveStore.create(tmp_path / "elsewhere.tar", keep_at=stopped)
        digest = Digest.of(data)
        await store.put_blob(Reference.parse("x/y").repository,
                             Descriptor("application/octet-stream", digest, len(data)),
                             one_chunk(data))
        await store.abort()

    asyncio.run(stop_a_build())
    report = json.loads(gapkit("bundle", "create", "--no-snaps", "--cache", str(cache),
                               "-o", str(tmp_path / "b.tar"), f"--image={refs[0]}",
                               *upstreams.source_flags(), "--json").stdout)
    size = stopped.stat().st_size
    assert report["warnings"] == [
        f"1 partial bundle(s) of other stopped builds ({human_bytes(size)}) are kept in "
        f"{cache / 'partial'}; delete them if those builds will not run again"]
    assert list((cache / "partial").iterdir()) == [stopped]


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data
