"""`gapkit bundle create`: resolve, fetch into a cache and write the bundle as blobs arrive.

Images are fetched from their registries into a cache (an OCI layout, `--cache`), so a run that
is stopped and started again fetches only what is missing, and bundles of related releases
share what they have in common. Each blob goes on into the bundle as soon as it is in the
cache, while the fetch goes on. The cache skips fsync, so a blob an earlier run left there is
hashed again on its way into the bundle, and one that fails is dropped and fetched again; a
blob fetched in this run was checked as it streamed in, and the kernel copies it unhashed. The
bundle itself is written to a temporary file, fsynced and renamed only when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from gapkit import __version__
from gapkit.bundle.model import (
    BUNDLE_JSON,
    SNAPS_FOLDER,
    BundleImage,
    BundleManifest,
    BundleSnap,
)
from gapkit.bundle.spec import BundleSpec
from gapkit.catalog import ImageList, resolve_images
from gapkit.errors import DigestMismatch
from gapkit.oci.copy import (
    DEFAULT_JOBS,
    BlobFinished,
    CopyEvent,
    CopyReport,
    CopyRequest,
    EventHandler,
    copy,
    gather_all,
)
from gapkit.oci.fsutil import file_digest
from gapkit.oci.model import Digest, Platform
from gapkit.oci.reference import Reference
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.oci.stores.layout import LayoutStore
from gapkit.snaps import FetchedSnap, fetch_snaps

WarningHandler = Callable[[str], None]


def default_cache() -> Path:
    if env := os.environ.get("GAPKIT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gapkit"


@dataclass
class CreateReport:
    manifest: BundleManifest
    output: Path
    fetched: CopyReport
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        fetched = self.fetched.to_json()
        fetched.pop("images")
        return {"bundle": str(self.output), "manifest": self.manifest.model_dump(),
                "fetched": fetched, "warnings": self.warnings}


async def _file_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk


async def create_bundle(
    spec: BundleSpec,
    output: Path,
    cache: Path | None = None,
    jobs: int = DEFAULT_JOBS,
    on_event: EventHandler | None = None,
    on_warning: WarningHandler | None = None,
) -> CreateReport:
    spec.check()
    warn = on_warning or (lambda message: None)
    cache = cache or default_cache()
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    resolved = resolve_images(
        microk8s=spec.channel or spec.microk8s, addons=spec.addons, manifests=spec.manifests,
        images=spec.images, images_from=spec.images_from)
    for message in resolved.warnings:
        note(message)
    platforms = spec.platform_set()
    requests = [CopyRequest(entry.reference, entry.reference) for entry in resolved.images]
    sources = {entry.reference: entry.sources for entry in resolved.images}

    snaps: list[FetchedSnap] = []
    if spec.microk8s and spec.snaps.enabled:
        channel = str(resolved.channel) if resolved.channel else f"{spec.microk8s}/stable"
        snaps = await asyncio.to_thread(
            fetch_snaps, channel=channel, base=resolved.snap_base or "",
            dest=cache / "snaps" / channel.replace("/", "_"), snaps_from=spec.snaps.from_,
            include_snapd=spec.snaps.snapd, on_warning=note)

    cache_layout = cache / "oci"
    output.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            return await _build(spec, resolved, output, cache_layout, requests, sources, snaps,
                                platforms, jobs, on_event, warnings)
        except DigestMismatch as exc:
            if attempt == 2:
                raise
            # A cached blob went bad (the cache is not fsynced): drop it and fetch it again.
            bad = cache_layout / "blobs" / exc.expected.replace(":", "/", 1)
            with contextlib.suppress(FileNotFoundError):
                bad.unlink()
            note(f"cached blob {exc.expected} was damaged; fetched it again")
    raise AssertionError("unreachable")


class _CacheToBundle:
    """Appends each blob to the bundle as soon as it is in the cache, while the fetch goes on.

    A blob fetched in this run passed a `VerifiedStream` on its way into the cache, so the
    kernel copies it into the bundle unhashed. A blob that was in the cache already (an earlier
    run's, never fsynced) is hashed first, several at once; a mismatch is a `DigestMismatch`
    that `create_bundle` heals by fetching the blob again.
    """

    def __init__(self, cache: LayoutStore, bundle: ArchiveStore, jobs: int) -> None:
        self.cache = cache
        self.bundle = bundle
        self.slots = asyncio.Semaphore(jobs)
        self.queue: asyncio.Queue[BlobFinished | None] = asyncio.Queue()
        self.seen: set[Digest] = set()

    def on_event(self, event: CopyEvent) -> None:
        if isinstance(event, BlobFinished) and event.digest not in self.seen:
            self.seen.add(event.digest)
            self.queue.put_nowait(event)

    def finish(self) -> None:
        self.queue.put_nowait(None)

    async def run(self) -> None:
        appends: list[asyncio.Task[None]] = []
        try:
            while (event := await self.queue.get()) is not None:
                await self.slots.acquire()
                for done in [task for task in appends if task.done()]:
                    done.result()  # a failed append stops the build (and the fetch) now
                    appends.remove(done)
                appends.append(asyncio.ensure_future(self._append(event)))
            await gather_all(appends)
        finally:
            for task in appends:
                task.cancel()
            await asyncio.gather(*appends, return_exceptions=True)

    async def _append(self, event: BlobFinished) -> None:
        try:
            location = await self.cache.blob_location(event.digest)
            if location is None:
                return  # the final copy from the cache names what is missing
            if event.how != "copied":
                hexdigest = await asyncio.to_thread(
                    file_digest, location[0], event.digest.algorithm)
                actual = f"{event.digest.algorithm}:{hexdigest}"
                if actual != str(event.digest):
                    raise DigestMismatch(str(event.digest), actual, str(location[0]))
            await self.bundle.put_checked_blob(event.digest, event.size, location)
        finally:
            self.slots.release()


async def _fetch(spec: BundleSpec, cache: LayoutStore, requests: list[CopyRequest],
                 platforms: list[Platform], jobs: int, on_event: EventHandler | None,
                 feeder: _CacheToBundle) -> CopyReport:
    def events(event: CopyEvent) -> None:
        feeder.on_event(event)
        if on_event is not None:
            on_event(event)

    source = spec.registries.settings().store()
    try:
        return await copy(source, cache, requests, platforms, jobs, events)
    finally:
        feeder.finish()
        await source.close()


async def _build(spec: BundleSpec, resolved: ImageList, output: Path, cache_layout: Path,
                 requests: list[CopyRequest], sources: dict[Reference, tuple[str, ...]],
                 snaps: list[FetchedSnap], platforms: list[Platform], jobs: int,
                 on_event: EventHandler | None, warnings: list[str]) -> CreateReport:
    """Fetch into the cache and write the bundle at the same time, then add the manifests."""
    cache = LayoutStore(cache_layout, durable=False)
    try:
        async with ArchiveStore.create(output, format="oci") as bundle:
            feeder = _CacheToBundle(cache, bundle, jobs)
            fetched = (await gather_all([
                _fetch(spec, cache, requests, platforms, jobs, on_event, feeder), feeder.run()]))[0]
            assert isinstance(fetched, CopyReport)
            return await _finish_bundle(spec, resolved, output, cache, bundle, requests,
                                        sources, snaps, fetched, platforms, warnings)
    finally:
        await cache.close()


async def _finish_bundle(spec: BundleSpec, resolved: ImageList, output: Path,
                         source: LayoutStore, bundle: ArchiveStore, requests: list[CopyRequest],
                         sources: dict[Reference, tuple[str, ...]], snaps: list[FetchedSnap],
                         fetched: CopyReport, platforms: list[Platform],
                         warnings: list[str]) -> CreateReport:
    """Manifests and indexes (every blob is in the bundle already), snaps and bundle.json."""
    written = await copy(source, bundle, requests, platforms)
    bundle_snaps: list[BundleSnap] = []
    for snap in snaps:
        for local, member in ((snap.path, snap.file_name), (snap.assert_path, snap.assert_name)):
            size = local.stat().st_size
            await bundle.put_member(f"{SNAPS_FOLDER}/{member}", size, _file_chunks(local))
        bundle_snaps.append(BundleSnap(
            name=snap.name, file=f"{SNAPS_FOLDER}/{snap.file_name}",
            assertion=f"{SNAPS_FOLDER}/{snap.assert_name}", revision=str(snap.revision),
            channel=snap.channel or "", size=snap.size, sha256=snap.sha256,
            sha3_384=snap.sha3_384))
    unique = {d.digest: d.size for image in written.images for d in image.blobs}
    total = sum(image.size for image in written.images)
    manifest = BundleManifest(
        tool=f"gapkit {__version__}",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        microk8s=resolved.release.name if resolved.release else None,
        channel=str(resolved.channel) if resolved.channel else None,
        snap_base=resolved.snap_base,
        platforms=[str(p) for p in platforms],
        spec=json.loads(spec.model_dump_json(by_alias=True, exclude={"registries"})),
        images=[BundleImage(reference=str(image.destination), digest=str(image.digest),
                            media_type=image.media_type,
                            platforms=[str(p) for p in image.platforms], size=image.size,
                            sources=list(sources.get(image.source, [])), note=image.note)
                for image in written.images],
        snaps=bundle_snaps,
        blob_bytes=sum(unique.values()),
        shared_bytes_saved=total - sum(unique.values()),
    )
    data = manifest.model_dump_json(indent=2).encode() + b"\n"

    async def once() -> AsyncIterator[bytes]:
        yield data

    await bundle.put_member(BUNDLE_JSON, len(data), once())
    return CreateReport(manifest, output, fetched, warnings)
