"""The OCI layout store, read and written, checked by skopeo as an independent reader."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gapkit.errors import DigestMismatch, NotFound, StoreError
from gapkit.oci.copy import CopyRequest, copy
from gapkit.oci.model import Platform
from gapkit.oci.reference import Reference
from gapkit.oci.stores.layout import LayoutStore
from tests.support.images import ImageSpec, file_digest, make_layer, write_layout

AMD64 = Platform.parse("linux/amd64")


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    base = make_layer(1, 200_000)
    write_layout(tmp_path / "src", [
        ImageSpec("docker.io/library/app:v1", [base, make_layer(2, 5000)]),
        ImageSpec("docker.io/library/multi:v1", [base],
                  others={"linux/arm64/v8": [make_layer(3, 100)]}),
    ])
    return tmp_path / "src"


async def test_skopeo_reads_the_layout_gapkit_wrote(source: Path, tmp_path: Path) -> None:
    dst = LayoutStore(tmp_path / "dst")
    refs = [Reference.parse("app:v1"), Reference.parse("multi:v1")]
    await copy(LayoutStore(source, create=False), dst, [CopyRequest(r, r) for r in refs], [AMD64])
    await dst.close()
    for name in ("docker.io/library/app:v1", "docker.io/library/multi:v1"):
        inspected = skopeo("inspect", f"oci:{tmp_path / 'dst'}:{name}")
        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout)["Architecture"] == "amd64"
    out = skopeo("copy", "--quiet", f"oci:{tmp_path / 'dst'}:docker.io/library/app:v1",
                 f"oci:{tmp_path / 'again'}:app")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "dst" / "index.json").read_text())
    names = {m["annotations"]["io.containerd.image.name"] for m in index["manifests"]}
    assert names == {"docker.io/library/app:v1", "docker.io/library/multi:v1"}
    for entry in index["manifests"]:
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == \
            entry["annotations"]["io.containerd.image.name"]


async def test_gapkit_reads_what_skopeo_wrote(source: Path, tmp_path: Path) -> None:
    out = skopeo("copy", "--quiet", f"oci:{source}:docker.io/library/app:v1",
                 f"oci:{tmp_path / 'by-skopeo'}:v7")
    assert out.returncode == 0, out.stderr
    store = LayoutStore(tmp_path / "by-skopeo", create=False)
    manifest = await store.get_manifest(Reference.parse("v7"))
    original = await LayoutStore(source, create=False).get_manifest(Reference.parse("app:v1"))
    assert manifest.digest == original.digest
    dst = LayoutStore(tmp_path / "out")
    await copy(store, dst, [CopyRequest(Reference.parse("v7"), Reference.parse("app:v1"))])
    for blob in (tmp_path / "by-skopeo" / "blobs" / "sha256").iterdir():
        copied = tmp_path / "out" / "blobs" / "sha256" / blob.name
        assert file_digest(copied) == "sha256:" + blob.name


async def test_multi_arch_keeps_the_original_index_digest(source: Path, tmp_path: Path) -> None:
    src = LayoutStore(source, create=False)
    ref = Reference.parse("multi:v1")
    original = await src.get_manifest(ref)
    dst = LayoutStore(tmp_path / "dst")
    await copy(src, dst, [CopyRequest(ref, ref)], [AMD64])
    copied = await dst.get_manifest(ref)
    assert copied.raw == original.raw
    assert (await dst.get_manifest(ref.with_tag(None).with_digest(original.digest))).raw == original.raw
    arm = next(d for d in original.manifests if d.platform and d.platform.architecture == "arm64")
    amd = next(d for d in original.manifests if d.platform == AMD64)
    assert await dst.head_blob(ref.repository, amd.digest) is not None
    assert await dst.head_blob(ref.repository, arm.digest) is None
    inspected = skopeo("inspect", "--raw", f"oci:{tmp_path / 'dst'}:docker.io/library/multi:v1")
    assert inspected.stdout.encode() == original.raw


async def test_a_wrong_blob_fails_naming_the_digest_and_leaves_nothing(
        source: Path, tmp_path: Path) -> None:
    src = LayoutStore(source, create=False)
    manifest = await src.get_manifest(Reference.parse("app:v1"))
    layer = manifest.layers[1]
    path = source / "blobs" / "sha256" / layer.digest.hex
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    dst = LayoutStore(tmp_path / "dst")
    ref = Reference.parse("app:v1")
    with pytest.raises(DigestMismatch) as err:
        await copy(src, dst, [CopyRequest(ref, ref)])
    assert str(layer.digest) in err.value.message
    blobs = tmp_path / "dst" / "blobs" / "sha256"
    assert not (blobs / layer.digest.hex).exists()
    assert not [p for p in blobs.iterdir() if p.name.startswith(".")]
    with pytest.raises(NotFound):
        await dst.get_manifest(ref)


async def test_stale_partial_files_of_a_dead_process_are_removed(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "l")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = store.blobs / f".partial-{'a' * 64}-{dead.pid}-0000"
    live = store.blobs / f".partial-{'b' * 64}-{os.getppid()}-0000"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    LayoutStore(tmp_path / "l")
    assert not stale.exists()
    assert live.exists()


def test_not_a_layout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(StoreError, match="not an OCI image layout"):
        LayoutStore(tmp_path / "junk", create=False)
    with pytest.raises(StoreError, match="not empty"):
        LayoutStore(tmp_path / "junk")


async def test_damaged_index_json_is_reported(source: Path) -> None:
    (source / "index.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"index\.json is damaged"):
        await LayoutStore(source, create=False).images()


async def test_thousands_of_names_at_once_all_reach_index_json_and_a_moved_tag_moves(
        source: Path, tmp_path: Path) -> None:
    """Names given at the same time share writes of index.json (a group commit); every one of
    them must be on disk when its put returns, and a tag given again names the new manifest."""
    import asyncio

    src = LayoutStore(source, create=False)
    app = await src.get_manifest(Reference.parse("app:v1"))
    multi = await src.get_manifest(Reference.parse("multi:v1"))
    dst = LayoutStore(tmp_path / "dst")
    names = [Reference.parse(f"registry.example/team/app{i}:v1") for i in range(3000)]
    await asyncio.gather(*(dst.put_manifest(name, app) for name in names))
    await asyncio.gather(dst.put_manifest(names[7], multi),
                         *(dst.put_manifest(Reference.parse(f"other.example/x:{i}"), app)
                           for i in range(50)))
    await dst.close()
    again = LayoutStore(tmp_path / "dst", create=False)  # what index.json on disk says
    images = await again.images()
    assert len(images) == 3050
    assert (await again.get_manifest(names[7])).digest == multi.digest
    assert (await again.get_manifest(names[8])).digest == app.digest
    index = json.loads((tmp_path / "dst" / "index.json").read_text())
    moved = [m for m in index["manifests"]
             if m["annotations"]["io.containerd.image.name"] == str(names[7])]
    assert [m["digest"] for m in moved] == [str(multi.digest)]
    assert not [p for p in (tmp_path / "dst").iterdir() if p.name.startswith(".")]
