"""Which files a bundle build takes blobs from (`gapkit.bundle.reuse`): partial bundles no
running build holds, bundles built before while unchanged, and a source that serves their
blobs and fetches the rest from a real store (an OCI layout here)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from gapkit.bundle import reuse
from gapkit.bundle.reuse import BlobPool, ReusingSource
from gapkit.oci.model import Descriptor, Manifest
from gapkit.oci.reference import Reference
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.oci.stores.layout import LayoutStore
from gapkit.oci.stream import VerifiedStream
from tests.support.images import ImageSpec, make_layer, write_layout

APP = Reference.parse("app:v1")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    root = tmp_path / "layout"
    write_layout(root, [ImageSpec("app", [make_layer(1, 3000), make_layer(2, 2_500_000)])])
    return root


def app_manifest(layout: Path) -> Manifest:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == "app")
    data = (layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes()
    return Manifest.parse(data, entry["mediaType"])


async def write_bundle(layout: Path, output: Path, keep_at: Path | None = None,
                       finish: bool = True) -> list[Descriptor]:
    """Copy the layout's image into an archive; `finish=False` stops after the blobs."""
    source = LayoutStore(layout)
    manifest = app_manifest(layout)
    store = ArchiveStore.create(output, keep_at=keep_at)
    for desc in manifest.blobs:
        await store.put_blob(APP.repository, desc, VerifiedStream(
            source.open_blob(APP.repository, desc), desc))
    if finish:
        await store.put_manifest(APP, manifest)
        await store.close()
    else:
        await store.abort()
    await source.close()
    return list(manifest.blobs)


def test_a_partial_bundle_a_build_holds_is_not_taken_and_only_its_outputs_are_removed(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mine = reuse.new_partial(cache, tmp_path / "a.tar")
    other = reuse.new_partial(cache, tmp_path / "b.tar")
    for path in (mine, other):
        path.write_bytes(b"\0" * 1024)
    held = os.open(other, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running build holds its partial bundle
        assert reuse.stopped_partials(cache) == [mine]
    finally:
        os.close(held)
    stopped = reuse.stopped_partials(cache)
    assert sorted(stopped) == sorted([mine, other])
    reuse.remove_partials_of(cache, tmp_path / "a.tar", stopped)
    assert [p.name for p in (cache / "partial").iterdir()] == [other.name]


async def test_built_bundles_are_used_while_unchanged_and_the_newest_eight_are_kept(
        layout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bundles = []
    for i in range(10):
        bundles.append(tmp_path / f"b{i}.tar")
        await write_bundle(layout, bundles[-1])
        reuse.record_built(cache, bundles[-1])
    assert reuse.built_bundles(cache) == [b.absolute() for b in reversed(bundles[2:])]
    bundles[9].rename(tmp_path / "moved.tar")
    os.utime(bundles[8], ns=(0, 0))  # changed since it was built
    assert reuse.built_bundles(cache) == [b.absolute() for b in reversed(bundles[2:8])]
    (cache / "bundles.json").write_text("{not json")
    assert reuse.built_bundles(cache) == []


async def test_the_source_serves_whole_blobs_of_a_stopped_build_and_fetches_the_rest(
        layout: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.tar"
    blobs = await write_bundle(layout, tmp_path / "never.tar", keep_at=partial, finish=False)
    assert not (tmp_path / "never.tar").exists()
    small, *rest = sorted(blobs, key=lambda d: d.size)
    pool = BlobPool.scan([partial], exclude={small.digest})  # as if found damaged before
    assert set(pool.blobs) == {d.digest for d in rest}
    source = ReusingSource(LayoutStore(layout), pool)
    try:
        for desc in blobs:
            data = b"".join([c async for c in VerifiedStream(
                source.open_blob(APP.repository, desc), desc)])
            assert len(data) == desc.size
        assert source.reused == {d.digest: d.size for d in rest}
        assert source.where(rest[-1].digest) == partial and source.where(small.digest) is None
        digest = app_manifest(layout).digest
        assert (await source.get_manifest(APP.with_tag(None).with_digest(digest))).digest == digest
    finally:
        await source.close()


async def test_a_file_gone_since_the_scan_is_fetched_from_upstream_instead(
        layout: Path, tmp_path: Path) -> None:
    """Another build may use up a partial bundle between this build's scan and its reads."""
    partial = tmp_path / "partial.tar"
    blobs = await write_bundle(layout, tmp_path / "never.tar", keep_at=partial, finish=False)
    source = ReusingSource(LayoutStore(layout), BlobPool.scan([partial], exclude=set()))
    partial.unlink()
    try:
        for desc in blobs:
            data = b"".join([c async for c in VerifiedStream(
                source.open_blob(APP.repository, desc), desc)])
            assert len(data) == desc.size
        assert source.reused == {}
    finally:
        await source.close()
