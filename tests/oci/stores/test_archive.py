"""The tar archive store against real programs: skopeo writes what gapkit reads, and skopeo and
containerd (`ctr image import`) read what gapkit writes. Images are synthetic OCI layouts
(`tests/support/images.py`); no network."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gapkit.errors import DigestMismatch, NotFound, StoreError
from gapkit.oci.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    Descriptor,
    Digest,
    Manifest,
    Platform,
)
from gapkit.oci.reference import Reference
from gapkit.oci.stores import archive as archive_module
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.oci.stores.base import Store
from gapkit.oci.stream import VerifiedStream
from tests.support.containerd import Containerd
from tests.support.images import ImageSpec, Layer, file_digest, make_layer, write_layout

APP = Reference.parse("app:v1")
MULTI = Reference.parse("multi:v1")
BIG = 3 * 1024 * 1024 + 123  # several 1 MiB chunks, and not a whole number of tar blocks
BUNDLE_JSON = b'{"kind": "gapkit bundle"}'


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout: `app` (two layers, one of several MiB) and `multi` (amd64 + arm64)."""
    root = tmp_path_factory.mktemp("layout")
    write_layout(root, [
        ImageSpec("app", [make_layer(1, 2000), make_layer(2, BIG)]),
        ImageSpec("multi", [make_layer(3, 1500)], others={"linux/arm64": [make_layer(4, 1500)]}),
    ])
    return root


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"skopeo {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def blob_path(layout: Path, digest: Digest | str) -> Path:
    return layout / "blobs" / "sha256" / str(digest).split(":", 1)[1]


def layout_manifest(layout: Path, name: str) -> Manifest:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == name)
    return Manifest.parse(blob_path(layout, entry["digest"]).read_bytes(), entry["mediaType"])


def layout_child(layout: Path, desc: Descriptor) -> Manifest:
    return Manifest.parse(blob_path(layout, desc.digest).read_bytes(), desc.media_type)


async def file_chunks(path: Path, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def put_image(store: ArchiveStore, layout: Path, name: str, ref: Reference,
                    platforms: set[str] | None = None) -> Manifest:
    """Copy image `name` of the layout into `store` as the copy engine would: blobs, children,
    then the tagged top manifest. `platforms` limits an index's children (the index is kept)."""
    top = layout_manifest(layout, name)
    images = [top]
    if top.is_index:
        images = [layout_child(layout, d) for d in top.manifests
                  if platforms is None or str(d.platform) in platforms]
    for image in images:
        for desc in image.blobs:
            await store.put_blob(ref.repository, desc, VerifiedStream(
                file_chunks(blob_path(layout, desc.digest)), desc))
        if image is not top:
            await store.put_manifest(ref.with_tag(None).with_digest(image.digest), image)
    await store.put_manifest(ref, top)
    return top


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def tar_member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def build_tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                tar.addfile(info, io.BytesIO(item[1]))


def rewrite_tar(src: Path, dst: Path, change: Any) -> None:
    """Copy a tar member by member; `change(name, data)` returns new data or None to drop it."""
    members: list[tuple[str, bytes] | tarfile.TarInfo] = []
    with tarfile.open(src) as tar:
        for info in tar.getmembers():
            if not info.isfile():
                members.append(info)
                continue
            extracted = tar.extractfile(info)
            assert extracted is not None
            data = change(info.name, extracted.read())
            if data is not None:
                members.append((info.name, data))
    build_tar(dst, members)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- reading what skopeo writes ------------------------------------------------------------


async def test_reads_skopeo_oci_archive_with_the_layouts_exact_bytes(
        layout: Path, tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    skopeo("copy", "--quiet", f"oci:{layout}:app", f"oci-archive:{archive}:{APP}")
    source = layout_manifest(layout, "app")

    store = await ArchiveStore.open(archive)
    assert isinstance(store, Store)
    assert store.format == "oci"
    assert await store.images() == [APP.with_digest(source.digest)]
    assert await store.tags(APP.repository) == ["v1"]
    manifest = await store.get_manifest(APP)
    assert manifest.raw == source.raw and manifest.digest == source.digest
    assert await store.head_manifest(APP) == source.descriptor()
    assert (await store.get_manifest(APP.with_digest(source.digest))).raw == source.raw
    for desc in source.blobs:
        assert await store.head_blob(APP.repository, desc.digest) == desc.size
        data = await read_all(VerifiedStream(store.open_blob(APP.repository, desc), desc))
        assert data == blob_path(layout, desc.digest).read_bytes()
    big = source.layers[1]
    tail = await read_all(store.open_blob(APP.repository, big, offset=big.size - 5000))
    assert tail == blob_path(layout, big.digest).read_bytes()[-5000:]
    location = await store.blob_location(big.digest)
    assert location is not None and location[0] == archive and location[2] == big.size
    with open(archive, "rb") as f:
        f.seek(location[1])
        assert sha256(f.read(location[2])) == str(big.digest)
    assert await store.head_manifest(Reference.parse("app:v2")) is None
    with pytest.raises(NotFound):
        await store.get_manifest(Reference.parse("other:v1"))
    await store.close()


async def test_reads_a_multi_arch_oci_archive_named_by_a_short_ref_name(
        layout: Path, tmp_path: Path) -> None:
    archive = tmp_path / "multi.tar"
    # skopeo writes `ref.name: "v1"`, which matches Reference.parse("v1") by the shared rule.
    skopeo("copy", "--quiet", "--all", f"oci:{layout}:multi", f"oci-archive:{archive}:v1")
    source = layout_manifest(layout, "multi")

    async with await ArchiveStore.open(archive) as store:
        short = Reference.parse("v1")
        assert await store.images() == [short.with_digest(source.digest)]
        index = await store.get_manifest(short)
        assert index.is_index and index.raw == source.raw
        for desc in index.manifests:
            child = await store.get_manifest(short.with_digest(desc.digest))
            assert child.raw == layout_child(layout, desc).raw
            assert child.media_type == desc.media_type
            for blob in child.blobs:
                data = await read_all(VerifiedStream(store.open_blob(short.repository, blob), blob))
                assert data == blob_path(layout, blob.digest).read_bytes()


async def test_reads_a_skopeo_docker_archive_as_a_registry_would_serve_it(
        layout: Path, tmp_path: Path) -> None:
    archive = tmp_path / "app-docker.tar"
    skopeo("copy", "--quiet", f"oci:{layout}:app", f"docker-archive:{archive}:{APP}")
    source = layout_manifest(layout, "app")
    config = json.loads(blob_path(layout, source.config.digest).read_bytes())  # type: ignore[union-attr]

    store = await ArchiveStore.open(archive)
    assert store.format == "docker"
    # blobs are found before any manifest was asked for (digests computed on demand)
    assert await store.head_blob(APP.repository, source.config.digest) == source.config.size  # type: ignore[union-attr]
    manifest = await store.get_manifest(APP)
    assert manifest.media_type == DOCKER_MANIFEST
    assert manifest.config is not None and manifest.config.media_type == DOCKER_CONFIG
    assert manifest.config.digest == source.config.digest  # type: ignore[union-attr]
    # skopeo's docker-archive layers are uncompressed, so each digest is the layer's diff_id
    assert [str(d.digest) for d in manifest.layers] == config["rootfs"]["diff_ids"]
    assert {d.media_type for d in manifest.layers} == {DOCKER_LAYER}
    for desc, original in zip(manifest.layers, source.layers, strict=True):
        data = await read_all(VerifiedStream(store.open_blob(APP.repository, desc), desc))
        assert data == gzip.decompress(blob_path(layout, original.digest).read_bytes())
    again = await store.get_manifest(APP.with_digest(manifest.digest))
    assert again.raw == manifest.raw
    assert await store.images() == [APP.with_digest(manifest.digest)]
    await store.close()


def legacy_docker_save(path: Path, layers: list[Layer], extra: bool = True) -> dict[str, Any]:
    """A tar as `docker save` wrote it before Docker 25: `<id>/layer.tar`, `<id>.json` config,
    `manifest.json`, `repositories`; a layer saved twice is a symlink, the second layer stays
    gzip-compressed (docker load takes that), and a `gapkit/` member rides along."""
    raw_first = gzip.decompress(layers[0].blob.data)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [layers[0].diff_id, layers[1].diff_id, layers[0].diff_id]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    members: list[tuple[str, bytes] | tarfile.TarInfo] = [
        ("./aaaa/layer.tar", raw_first), ("./aaaa/VERSION", b"1.0"),
        ("./bbbb/layer.tar", layers[1].blob.data),
    ]
    link = tarfile.TarInfo("./cccc/layer.tar")
    link.type, link.linkname = tarfile.SYMTYPE, "../aaaa/layer.tar"
    members.append(link)
    doc = [{"Config": config_name, "RepoTags": ["app:v1", "example.com/team/app:2"],
            "Layers": ["aaaa/layer.tar", "bbbb/layer.tar", "cccc/layer.tar"]}]
    members += [(config_name, config), ("manifest.json", json.dumps(doc).encode()),
                ("repositories", b'{"app":{"v1":"cccc"}}')]
    if extra:
        members.append(("gapkit/bundle.json", b'{"kind":"bundle"}'))
    build_tar(path, members)
    return {"config": config, "first": raw_first}


async def test_reads_a_legacy_docker_save_with_id_folders_links_and_gzip_layers(
        tmp_path: Path) -> None:
    layers = [make_layer(11, 3000), make_layer(12, 4000)]
    archive = tmp_path / "saved.tar"
    parts = legacy_docker_save(archive, layers)

    store = await ArchiveStore.open(archive)
    manifest = await store.get_manifest(APP)
    assert [str(r) for r in await store.images()] == [
        f"docker.io/library/app:v1@{manifest.digest}", f"example.com/team/app:2@{manifest.digest}"]
    assert (await store.get_manifest(Reference.parse("example.com/team/app:2"))).raw == manifest.raw
    assert manifest.config is not None and manifest.config.digest == Digest.of(parts["config"])
    assert [d.media_type for d in manifest.layers] == [DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER]
    assert [str(d.digest) for d in manifest.layers] == [
        layers[0].diff_id, layers[1].blob.digest, layers[0].diff_id]
    for desc in manifest.blobs:
        await read_all(VerifiedStream(store.open_blob(APP.repository, desc), desc))
    assert await read_all(store.open_member("gapkit/bundle.json")) == b'{"kind":"bundle"}'
    assert "gapkit/bundle.json" in store.member_names()
    await store.close()


async def test_index_names_match_either_annotation_and_list_the_containerd_name(
        tmp_path: Path) -> None:
    """Docker 25+ `docker save` (also an OCI layout) names `ref.name: "latest"` beside the full
    containerd name; a nested nameless index carries names on its entries."""
    layout_dir = tmp_path / "layout"
    digests = write_layout(layout_dir, [ImageSpec("x", [make_layer(5, 100)]),
                                        ImageSpec("y", [make_layer(6, 100)])])
    manifest_x = blob_path(layout_dir, digests["x"]).read_bytes()
    manifest_y = blob_path(layout_dir, digests["y"]).read_bytes()
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                        "digest": digests["y"], "size": len(manifest_y),
                                        "annotations": {"org.opencontainers.image.ref.name":
                                                        "quay.io/org/y:1"}}]}).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digests["x"],
         "size": len(manifest_x), "annotations": {
             "io.containerd.image.name": "docker.io/library/nginx:1.25",
             "org.opencontainers.image.ref.name": "1.25"}},
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(nested),
         "size": len(nested)},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digests["x"],
         "size": len(manifest_x), "annotations": {"org.opencontainers.image.ref.name": "Bad Name"}},
    ]}
    members: list[tuple[str, bytes] | tarfile.TarInfo] = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", json.dumps(index).encode()),
        ("manifest.json", b"[]"),
        (f"blobs/sha256/{sha256(nested)[7:]}", nested),
    ]
    for path in sorted((layout_dir / "blobs" / "sha256").iterdir()):
        members.append((f"./blobs/sha256/{path.name}", path.read_bytes()))
    archive = tmp_path / "d25.tar"
    build_tar(archive, members)

    store = await ArchiveStore.open(archive)
    assert store.format == "oci"
    assert [str(r) for r in await store.images()] == [
        f"docker.io/library/nginx:1.25@{digests['x']}", f"quay.io/org/y:1@{digests['y']}"]
    by_full = await store.get_manifest(Reference.parse("nginx:1.25"))
    by_short = await store.get_manifest(Reference.parse("1.25"))
    assert by_full.raw == by_short.raw == manifest_x
    assert (await store.get_manifest(Reference.parse("quay.io/org/y:1"))).raw == manifest_y


# ---- writing what skopeo and containerd read -----------------------------------------------


async def test_written_oci_archive_is_read_by_skopeo_and_imported_by_ctr(
        layout: Path, tmp_path: Path, containerd: Containerd) -> None:
    target = tmp_path / "out" / "images.tar"
    target.parent.mkdir()
    async with ArchiveStore.create(target) as store:
        app = await put_image(store, layout, "app", APP)
        multi = await put_image(store, layout, "multi", MULTI)
        await store.put_member("gapkit/bundle.json", len(BUNDLE_JSON), one_chunk(BUNDLE_JSON))
        assert await store.head_manifest(APP) == app.descriptor()
        assert await store.images() == [APP.with_digest(app.digest),
                                        MULTI.with_digest(multi.digest)]
        assert not target.exists()
    assert sorted(os.listdir(target.parent)) == ["images.tar"]

    names = tar_names(target)
    assert names[0] == "oci-layout" and len(names) == len(set(names))
    index = json.loads(tar_member(target, "index.json"))
    assert index["manifests"][0]["annotations"] == {
        "io.containerd.image.name": str(APP), "org.opencontainers.image.ref.name": str(APP)}

    inspected = json.loads(skopeo("inspect", f"oci-archive:{target}:{APP}"))
    assert inspected["Digest"] == str(app.digest)
    copied = tmp_path / "copied"
    skopeo("copy", "--quiet", "--all", f"oci-archive:{target}:{MULTI}", f"oci:{copied}:m")
    assert layout_manifest(copied, "m").raw == multi.raw
    skopeo("copy", "--quiet", f"oci-archive:{target}:{APP}", f"oci:{copied}:a")
    assert layout_manifest(copied, "a").raw == app.raw
    for desc in app.blobs:
        assert file_digest(blob_path(copied, desc.digest)) == str(desc.digest)

    containerd.ctr("image", "import", "--all-platforms", str(target))
    assert containerd.image_names() == [str(APP), str(MULTI)]
    listing = containerd.ctr("image", "ls").stdout
    assert str(app.digest) in listing and str(multi.digest) in listing

    reread = await ArchiveStore.open(target)
    assert (await reread.get_manifest(MULTI)).raw == multi.raw
    assert await read_all(reread.open_member("gapkit/bundle.json")) == BUNDLE_JSON

    # and what `ctr image export` writes (OCI layout + manifest.json) reads back the same
    exported = tmp_path / "exported.tar"
    containerd.ctr("image", "export", "--all-platforms", str(exported), str(APP), str(MULTI))
    from_ctr = await ArchiveStore.open(exported)
    assert from_ctr.format == "oci"
    assert await from_ctr.images() == [APP.with_digest(app.digest),
                                       MULTI.with_digest(multi.digest)]
    for desc in app.blobs:
        await read_all(VerifiedStream(from_ctr.open_blob(APP.repository, desc), desc))
    for child in multi.manifests:
        assert (await from_ctr.get_manifest(MULTI.with_digest(child.digest))).digest == child.digest
    assert await reread.images() == [APP.with_digest(app.digest),
                                     MULTI.with_digest(multi.digest)]


async def test_multi_arch_index_with_blobs_for_one_platform_imports_for_that_platform(
        layout: Path, tmp_path: Path, containerd: Containerd) -> None:
    target = tmp_path / "amd64.tar"
    async with ArchiveStore.create(target) as store:
        index = await put_image(store, layout, "multi", MULTI, platforms={"linux/amd64"})
    arm = next(d for d in index.manifests if d.platform == Platform.parse("linux/arm64"))

    containerd.ctr("image", "import", "--platform", "linux/amd64", str(target))
    assert containerd.image_names() == [str(MULTI)]
    assert str(index.digest) in containerd.ctr("image", "ls").stdout

    reread = await ArchiveStore.open(target)
    assert (await reread.get_manifest(MULTI)).raw == index.raw  # the original index, unchanged
    with pytest.raises(NotFound):
        await reread.get_manifest(MULTI.with_digest(arm.digest))


async def test_written_docker_archive_loads_in_skopeo_and_ctr(
        layout: Path, tmp_path: Path, containerd: Containerd) -> None:
    """Layers are written as given (gzip): skopeo and ctr both accept compressed docker-archive
    layers. An index names its host-platform (amd64) image."""
    target = tmp_path / "docker.tar"
    store = ArchiveStore.create(target, format="docker", platform=Platform.parse("linux/amd64"))
    app = await put_image(store, layout, "app", APP)
    await put_image(store, layout, "multi", MULTI)
    await put_image(store, layout, "app", Reference.parse("example.com/team/app:2"))
    await store.close()
    amd64 = layout_child(layout, layout_manifest(layout, "multi").manifests[0])

    names = tar_names(target)
    assert "manifest.json" in names and "index.json" not in names
    saved = json.loads(tar_member(target, "manifest.json"))
    assert [item["RepoTags"] for item in saved] == [["app:v1", "example.com/team/app:2"],
                                                    ["multi:v1"]]

    inspected = json.loads(skopeo("inspect", f"docker-archive:{target}:{APP}"))
    config = json.loads(blob_path(layout, app.config.digest).read_bytes())  # type: ignore[union-attr]
    assert inspected["Layers"] == config["rootfs"]["diff_ids"]
    assert inspected["Architecture"] == "amd64"
    skopeo("copy", "--quiet", f"docker-archive:{target}:{MULTI}", f"oci:{tmp_path / 'o'}:m")

    containerd.ctr("image", "import", str(target))
    assert containerd.image_names() == [
        "docker.io/library/app:v1", "docker.io/library/multi:v1", "example.com/team/app:2"]

    reread = await ArchiveStore.open(target)
    manifest = await reread.get_manifest(MULTI)
    assert manifest.config is not None and manifest.config.digest == amd64.config.digest  # type: ignore[union-attr]
    assert [d.digest for d in manifest.layers] == [d.digest for d in amd64.layers]
    assert {d.media_type for d in manifest.layers} == {DOCKER_LAYER_GZIP}


async def test_docker_format_refuses_an_index_without_a_clear_platform(
        layout: Path, tmp_path: Path) -> None:
    target = tmp_path / "docker.tar"
    store = ArchiveStore.create(target, format="docker", platform=Platform.parse("linux/s390x"))
    with pytest.raises(StoreError, match="one platform per image"):
        await put_image(store, layout, "multi", MULTI)
    await store.abort()
    assert os.listdir(tmp_path) == []


# ---- damage and hostile input --------------------------------------------------------------


@pytest.fixture
def oci_archive(layout: Path, tmp_path: Path) -> Path:
    archive = tmp_path / "source.tar"
    skopeo("copy", "--quiet", f"oci:{layout}:app", f"oci-archive:{archive}:{APP}")
    return archive


async def test_truncated_archives_are_refused_naming_the_file(oci_archive: Path,
                                                              tmp_path: Path) -> None:
    data = oci_archive.read_bytes()
    with tarfile.open(oci_archive) as tar:
        infos = tar.getmembers()
    last = infos[-1]
    end_of_members = last.offset_data + last.size + (-last.size % 512)
    cuts = [len(data) // 2,  # inside some member
            infos[len(infos) // 2].offset,  # just before a header: a "clean" cut
            end_of_members,  # every member whole, but no end-of-archive blocks
            last.offset_data + last.size // 2]  # inside the last member
    for cut in cuts:
        broken = tmp_path / f"cut-{cut}.tar"
        broken.write_bytes(data[:cut])
        with pytest.raises(StoreError, match=r"cut-\d+\.tar") as err:
            await ArchiveStore.open(broken)
        assert err.value.hint


async def test_non_tar_input_is_refused_with_a_hint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a tar archive"):
        await ArchiveStore.open(junk)
    gz = tmp_path / "image.tar.gz"
    gz.write_bytes(gzip.compress(b"\0" * 10240))
    with pytest.raises(StoreError, match="not a tar archive") as err:
        await ArchiveStore.open(gz)
    assert "gunzip" in (err.value.hint or "")
    plain = tmp_path / "plain.tar"
    build_tar(plain, [("hello.txt", b"hi")])
    with pytest.raises(StoreError, match=r"neither index\.json"):
        await ArchiveStore.open(plain)
    with pytest.raises(StoreError, match="cannot open"):
        await ArchiveStore.open(tmp_path / "missing.tar")


async def test_missing_blobs_are_not_found_and_a_missing_named_manifest_is_damage(
        layout: Path, oci_archive: Path, tmp_path: Path) -> None:
    source = layout_manifest(layout, "app")
    layer = source.layers[0]
    no_layer = tmp_path / "no-layer.tar"
    rewrite_tar(oci_archive, no_layer, lambda n, d: None if n.endswith(layer.digest.hex) else d)
    store = await ArchiveStore.open(no_layer)
    assert (await store.get_manifest(APP)).raw == source.raw
    assert await store.head_blob(APP.repository, layer.digest) is None
    with pytest.raises(NotFound, match=rf"no-layer\.tar.*blobs/sha256/{layer.digest.hex}"):
        await read_all(store.open_blob(APP.repository, layer))

    no_manifest = tmp_path / "no-manifest.tar"
    rewrite_tar(oci_archive, no_manifest,
                lambda n, d: None if n.endswith(source.digest.hex) else d)
    store = await ArchiveStore.open(no_manifest)
    with pytest.raises(StoreError, match=rf"no-manifest\.tar.*{source.digest.hex}"):
        await store.get_manifest(APP)

    docker = tmp_path / "docker.tar"
    legacy_docker_save(docker, [make_layer(11, 300), make_layer(12, 400)], extra=False)
    no_docker_layer = tmp_path / "docker-no-layer.tar"
    rewrite_tar(docker, no_docker_layer, lambda n, d: None if n == "./bbbb/layer.tar" else d)
    with pytest.raises(StoreError, match=r"docker-no-layer\.tar.*'bbbb/layer.tar'"):
        await ArchiveStore.open(no_docker_layer)


async def test_wrong_bytes_fail_verification_and_wrong_sizes_are_damage(
        layout: Path, oci_archive: Path, tmp_path: Path) -> None:
    source = layout_manifest(layout, "app")
    layer = source.layers[1]

    def flip(name: str, data: bytes) -> bytes:
        if name.endswith(layer.digest.hex):
            return data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
        return data

    damaged = tmp_path / "flipped.tar"
    rewrite_tar(oci_archive, damaged, flip)
    store = await ArchiveStore.open(damaged)
    with pytest.raises(DigestMismatch):
        await read_all(VerifiedStream(store.open_blob(APP.repository, layer), layer, "archive"))

    shorter = tmp_path / "shorter.tar"
    rewrite_tar(oci_archive, shorter,
                lambda n, d: d[:-10] if n.endswith(layer.digest.hex) else d)
    store = await ArchiveStore.open(shorter)
    with pytest.raises(StoreError, match=rf"shorter\.tar: member 'blobs/sha256/{layer.digest.hex}'"):
        await read_all(store.open_blob(APP.repository, layer))


async def test_members_outside_the_archive_are_never_used(
        layout: Path, tmp_path: Path) -> None:
    source = layout_manifest(layout, "app")
    config = source.config
    assert config is not None
    escape = tarfile.TarInfo(f"blobs/sha256/{config.digest.hex}")
    escape.type, escape.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    members: list[tuple[str, bytes] | tarfile.TarInfo] = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("../evil", b"x"), ("/etc/cron.d/evil", b"x"), ("blobs/../../index.json", b"{}"),
        escape,
        ("index.json", json.dumps({"schemaVersion": 2, "manifests": [dict(
            source.descriptor().to_json(),
            annotations={"org.opencontainers.image.ref.name": str(APP)})]}).encode()),
        (f"blobs/sha256/{source.digest.hex}", source.raw),
    ]
    hostile = tmp_path / "hostile.tar"
    build_tar(hostile, members)
    store = await ArchiveStore.open(hostile)
    assert "../evil" not in store.member_names() and "etc/cron.d/evil" not in store.member_names()
    assert (await store.get_manifest(APP)).raw == source.raw
    assert await store.head_blob(APP.repository, config.digest) is None

    docker = tmp_path / "docker.tar"
    build_tar(docker, [("manifest.json", json.dumps([{
        "Config": "c.json", "RepoTags": ["app:v1"], "Layers": ["../../etc/shadow"]}]).encode()),
        ("c.json", b"{}")])
    with pytest.raises(StoreError, match="outside the archive"):
        await ArchiveStore.open(docker)


async def test_absurd_headers_and_member_counts_are_refused_quickly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pax header claiming 4 GiB of header data: refused before tarfile reads it.
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 4 << 30
    bomb = tmp_path / "bomb.tar"
    bomb.write_bytes(pax.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)
    with pytest.raises(StoreError, match="extended header"):
        await ArchiveStore.open(bomb)

    # A member claiming more bytes than the file has.
    huge = tarfile.TarInfo("blobs/sha256/" + "a" * 64)
    huge.size = 1 << 40
    claim = tmp_path / "claim.tar"
    claim.write_bytes(huge.tobuf(tarfile.PAX_FORMAT) + b"\0" * 4096)
    with pytest.raises(StoreError, match=r"claim\.tar is truncated"):
        await ArchiveStore.open(claim)

    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 50)
    many = tmp_path / "many.tar"
    build_tar(many, [(f"gapkit/{i}", b"") for i in range(60)])
    with pytest.raises(StoreError, match="more than 50 members"):
        await ArchiveStore.open(many)


# ---- the writer's failures leave nothing behind ---------------------------------------------


async def broken_stream(path: Path, fail_after: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in file_chunks(path, 64 * 1024):
        if sent >= fail_after:
            raise ConnectionResetError("peer went away")
        sent += len(chunk)
        yield chunk


async def test_a_failed_blob_is_cut_off_and_the_archive_stays_valid(
        layout: Path, tmp_path: Path) -> None:
    source = layout_manifest(layout, "app")
    big = source.layers[1]
    target = tmp_path / "app.tar"
    store = ArchiveStore.create(target)
    with pytest.raises(ConnectionResetError):
        await store.put_blob(APP.repository, big, broken_stream(blob_path(layout, big.digest),
                                                                 512 * 1024))
    assert await store.head_blob(APP.repository, big.digest) is None
    # wrong content on a plain (unverified) stream is caught by the store itself
    small = source.layers[0]
    with pytest.raises(DigestMismatch):
        await store.put_blob(APP.repository, small,
                             file_chunks(blob_path(layout, source.layers[1].digest)))
    wrong_size = Descriptor(small.media_type, small.digest, small.size + 1)
    with pytest.raises(DigestMismatch):
        await store.put_blob(APP.repository, wrong_size, file_chunks(blob_path(layout,
                                                                               small.digest)))
    # concurrent puts (as the copy engine makes them) are written one after another
    await asyncio.gather(*(store.put_blob(APP.repository, d, VerifiedStream(
        file_chunks(blob_path(layout, d.digest)), d)) for d in source.blobs))

    async def must_not_be_read() -> AsyncIterator[bytes]:
        raise AssertionError("a blob already in the archive was read again")
        yield b""

    await store.put_blob(APP.repository, big, must_not_be_read())
    assert await read_all(store.open_blob(APP.repository, big)) == blob_path(
        layout, big.digest).read_bytes()
    await store.put_manifest(APP, source)
    await store.close()

    names = tar_names(target)
    assert len(names) == len(set(names))
    assert sorted(n for n in names if n.startswith("blobs/sha256/") and n[13:]) == sorted(
        [f"blobs/sha256/{d.digest.hex}" for d in source.blobs]
        + [f"blobs/sha256/{source.digest.hex}"])
    skopeo("copy", "--quiet", f"oci-archive:{target}:{APP}", f"oci:{tmp_path / 'check'}:a")
    assert sorted(os.listdir(tmp_path)) == ["app.tar", "check"]


async def test_an_exception_before_close_leaves_no_file_and_no_temp(
        layout: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.tar"
    with pytest.raises(RuntimeError, match="stop"):
        async with ArchiveStore.create(target) as store:
            await put_image(store, layout, "app", APP)
            assert len(os.listdir(tmp_path)) == 1  # the temp file, next to the target
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


async def test_a_failing_close_leaves_the_target_as_it_was_and_no_temp(
        layout: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.tar"
    target.mkdir()  # rename onto a folder fails at the very end of close()
    (target / "keep").write_text("x")
    store = ArchiveStore.create(target)
    await put_image(store, layout, "app", APP)
    with pytest.raises(StoreError, match=f"cannot write {target}: Is a directory"):
        await store.close()
    assert os.listdir(tmp_path) == ["out.tar"] and os.listdir(target) == ["keep"]

    docker = tmp_path / "docker.tar"
    store = ArchiveStore.create(docker, format="docker")
    with pytest.raises(StoreError, match="was not put first"):
        await store.put_manifest(APP, layout_manifest(layout, "app"))
    await store.abort()
    assert os.listdir(tmp_path) == ["out.tar"]


async def test_a_reader_refuses_writes(oci_archive: Path) -> None:
    store = await ArchiveStore.open(oci_archive)
    with pytest.raises(StoreError, match="opened for reading"):
        await store.put_manifest(APP, await store.get_manifest(APP))


async def test_a_cancelled_put_blob_is_cut_off_too(layout: Path, tmp_path: Path) -> None:
    source = layout_manifest(layout, "app")
    big = source.layers[1]
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        async for chunk in file_chunks(blob_path(layout, big.digest), 64 * 1024):
            yield chunk
            started.set()
            await asyncio.sleep(0.01)

    target = tmp_path / "app.tar"
    async with ArchiveStore.create(target) as store:
        task = asyncio.create_task(store.put_blob(APP.repository, big, slow()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.head_blob(APP.repository, big.digest) is None
        await put_image(store, layout, "app", APP)
    reread = await ArchiveStore.open(target)
    data = await read_all(VerifiedStream(reread.open_blob(APP.repository, big), big))
    assert len(data) == big.size
    assert tar_names(target).count(f"blobs/sha256/{big.digest.hex}") == 1


async def test_memory_does_not_grow_with_blob_size(tmp_path: Path) -> None:
    import tracemalloc

    chunk = os.urandom(1024 * 1024)
    count = 96
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(chunk)
    desc = Descriptor(DOCKER_LAYER, Digest("sha256", digest.hexdigest()), count * len(chunk))

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        async with ArchiveStore.create(tmp_path / "big.tar") as store:
            await store.put_blob(APP.repository, desc, stream())  # hashed by the store itself
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        reread = await ArchiveStore.open(tmp_path / "big.tar")
        size = 0
        async for part in VerifiedStream(reread.open_blob(APP.repository, desc), desc):
            size += len(part)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == desc.size
    assert written_peak < 8 * len(chunk) and read_peak < 8 * len(chunk), (written_peak, read_peak)


# ---- several blobs at once, resume files ---------------------------------------------------


def layout_blobs(layout: Path, name: str) -> list[Descriptor]:
    return list(layout_manifest(layout, name).blobs)


async def paced(path: Path, gate: asyncio.Event | None = None,
                stop_after: int | None = None) -> AsyncIterator[bytes]:
    """The file in 64 KiB chunks, yielding to the loop after each (so puts interleave);
    waiting on `gate` before the last chunk; failing after `stop_after` bytes."""
    data = path.read_bytes()
    for start in range(0, len(data), 64 * 1024):
        if stop_after is not None and start >= stop_after:
            raise ConnectionResetError("the source went away")
        if gate is not None and start + 64 * 1024 >= len(data):
            await gate.wait()
        yield data[start:start + 64 * 1024]
        await asyncio.sleep(0)


async def test_blobs_stream_in_at_once_and_a_stopped_writers_file_names_only_whole_ones(
        layout: Path, tmp_path: Path) -> None:
    """Puts interleave chunk by chunk; a blob is named `blobs/...` only once whole and checked.
    The resume file of a writer that stops is kept, Python's tarfile walks it, and
    `scan_blobs` finds exactly the whole blobs, at offsets holding their bytes."""
    blobs = layout_blobs(layout, "app") + layout_blobs(layout, "multi")
    unfinished = max(blobs, key=lambda d: d.size)
    whole = [d for d in blobs if d is not unfinished]
    keep = tmp_path / "cache" / "partial.tar"
    keep.parent.mkdir()
    gate = asyncio.Event()
    store = ArchiveStore.create(tmp_path / "out.tar", keep_at=keep)
    stuck = asyncio.create_task(store.put_blob(APP.repository, unfinished, VerifiedStream(
        paced(blob_path(layout, unfinished.digest), gate), unfinished)))
    await asyncio.gather(*(store.put_blob(APP.repository, d, VerifiedStream(
        paced(blob_path(layout, d.digest)), d)) for d in whole))
    assert not stuck.done()  # it was reserved first, so its region lies before the others
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    await store.abort()
    assert not (tmp_path / "out.tar").exists() and keep.exists()

    with tarfile.open(keep) as tar:
        names = tar.getnames()
    assert f"gapkit/pending/sha256/{unfinished.digest.hex}" in names
    assert sorted(n for n in names if n.startswith("blobs/sha256/") and n[13:]) == sorted(
        f"blobs/sha256/{d.digest.hex}" for d in whole)
    found = archive_module.scan_blobs(keep)
    assert set(found) == {d.digest for d in whole}
    with open(keep, "rb") as f:
        for d in whole:
            offset, size = found[d.digest]
            f.seek(offset)
            assert size == d.size and sha256(f.read(size)) == str(d.digest)


async def test_a_blob_failed_between_others_is_put_again_in_its_place_or_left_unused(
        layout: Path, tmp_path: Path) -> None:
    """A failed blob whose region is not the last stays reserved: a second put of it fills
    the same place; one never put again becomes `gapkit/unused/…` at close. Either way skopeo
    and ctr's format rules still hold: no duplicate names, every image intact."""
    app = layout_blobs(layout, "app")
    big, small = max(app, key=lambda d: d.size), min(app, key=lambda d: d.size)
    target = tmp_path / "app.tar"
    async with ArchiveStore.create(target) as store:
        failing = asyncio.create_task(store.put_blob(APP.repository, big, VerifiedStream(
            paced(blob_path(layout, big.digest), stop_after=512 * 1024), big)))
        await asyncio.sleep(0)
        await store.put_blob(APP.repository, small, VerifiedStream(
            file_chunks(blob_path(layout, small.digest)), small))  # reserved after `big`
        with pytest.raises(ConnectionResetError):
            await failing
        assert await store.head_blob(APP.repository, big.digest) is None
        size_before = os.path.getsize(store._data_path)
        await put_image(store, layout, "app", APP)  # puts `big` again: into its old region
        assert os.path.getsize(store._data_path) < size_before + big.size
        # a blob that fails between others and is never put again
        lost = Descriptor(small.media_type, Digest.of(b"x" * 5000), 5000)
        go_on = asyncio.Event()

        async def wrong_after_a_while() -> AsyncIterator[bytes]:
            yield b"y" * 1000
            await go_on.wait()
            yield b"y" * 4000

        losing = asyncio.create_task(store.put_blob(APP.repository, lost, wrong_after_a_while()))
        await asyncio.sleep(0.05)
        await store.put_blob(APP.repository, Descriptor(
            small.media_type, Digest.of(b"z" * 700), 700), one_chunk(b"z" * 700))
        go_on.set()
        with pytest.raises(DigestMismatch):
            await losing
    names = tar_names(target)
    assert len(names) == len(set(names))
    assert [n for n in names if n.startswith("gapkit/")] == [
        n for n in names if n.startswith("gapkit/unused/")] and len(
        [n for n in names if n.startswith("gapkit/")]) == 1
    assert tar_names(target).count(f"blobs/sha256/{big.digest.hex}") == 1
    skopeo("copy", "--quiet", f"oci-archive:{target}:{APP}", f"oci:{tmp_path / 'check'}:a")


async def test_a_resume_file_on_another_filesystem_is_copied_onto_the_target(
        layout: Path, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    keep = shm / f"gapkit-test-{os.getpid()}.tar"
    target = tmp_path / "app.tar"
    try:
        async with ArchiveStore.create(target, keep_at=keep) as store:
            await put_image(store, layout, "app", APP)
        assert not keep.exists()
        assert os.listdir(tmp_path) == ["app.tar"]
        skopeo("copy", "--quiet", f"oci-archive:{target}:{APP}", f"oci:{tmp_path / 'check'}:a")
    finally:
        keep.unlink(missing_ok=True)
