"""The copy engine's own guarantees, between two OCI layouts (no network needed)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gapkit.errors import NotFound
from gapkit.oci.copy import BlobFinished, CopyEvent, CopyRequest, ImageCopied, copy
from gapkit.oci.model import Descriptor, Platform
from gapkit.oci.reference import Reference, Repository
from gapkit.oci.stores.layout import LayoutStore
from tests.support.images import ImageSpec, make_layer, write_layout


class CountingLayout(LayoutStore):
    """A real layout store that counts blob reads and how many run at once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, create=False)
        self.reads: Counter[str] = Counter()
        self.active = 0
        self.peak = 0

    async def open_blob(self, repository: Repository, descriptor: Descriptor,
                        offset: int = 0) -> AsyncIterator[bytes]:
        self.reads[str(descriptor.digest)] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            async for chunk in super().open_blob(repository, descriptor, offset):
                await asyncio.sleep(0)
                yield chunk
        finally:
            self.active -= 1


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    base = make_layer(1, 50_000)
    write_layout(tmp_path / "src", [
        ImageSpec(f"docker.io/team/app{i}:v1", [base, make_layer(100 + i, 2000 + i)])
        for i in range(8)
    ] + [ImageSpec("docker.io/library/multi:v1", [base],
                   others={"linux/arm64/v8": [make_layer(3, 100)]})])
    return tmp_path / "src"


async def test_each_shared_blob_is_fetched_once_per_run(layout: Path, tmp_path: Path) -> None:
    source = CountingLayout(layout)
    refs = [Reference.parse(f"team/app{i}:v1") for i in range(8)]
    renamed = [CopyRequest(r, Reference.parse(f"other/app{i}:v1")) for i, r in enumerate(refs)]
    requests = [CopyRequest(r, r) for r in refs] + renamed
    report = await copy(source, LayoutStore(tmp_path / "dst"), requests)
    assert max(source.reads.values()) == 1
    assert report.blobs_copied == len(source.reads)
    assert len(report.images) == 16


async def test_concurrency_is_bounded_by_jobs(layout: Path, tmp_path: Path) -> None:
    source = CountingLayout(layout)
    refs = [Reference.parse(f"team/app{i}:v1") for i in range(8)]
    await copy(source, LayoutStore(tmp_path / "dst"), [CopyRequest(r, r) for r in refs], jobs=2)
    assert source.peak <= 2
    assert sum(source.reads.values()) > 2


async def test_second_run_copies_nothing_and_reports_it(layout: Path, tmp_path: Path) -> None:
    refs = [Reference.parse(f"team/app{i}:v1") for i in range(3)]
    requests = [CopyRequest(r, r) for r in refs]
    await copy(LayoutStore(layout, create=False), LayoutStore(tmp_path / "dst"), requests)
    events: list[CopyEvent] = []
    report = await copy(LayoutStore(layout, create=False), LayoutStore(tmp_path / "dst"), requests,
                        on_event=events.append)
    assert report.blobs_copied == 0
    assert report.bytes_copied == 0
    assert report.blobs_present > 0
    assert {e.how for e in events if isinstance(e, BlobFinished)} == {"present"}
    assert sum(isinstance(e, ImageCopied) for e in events) == 3


async def test_a_platform_the_index_lacks_is_refused_listing_what_it_has(
        layout: Path, tmp_path: Path) -> None:
    ref = Reference.parse("multi:v1")
    with pytest.raises(NotFound) as err:
        await copy(LayoutStore(layout, create=False), LayoutStore(tmp_path / "dst"),
                   [CopyRequest(ref, ref)], platforms=[Platform.parse("linux/s390x")])
    assert "linux/s390x" in err.value.message
    assert "linux/amd64, linux/arm64" in err.value.message
