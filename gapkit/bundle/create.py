"""`gapkit bundle create`: resolve, then fetch every blob straight into the bundle.

The bundle is written in the cache folder (`CACHE/partial/`, see `gapkit.bundle.reuse`),
several blobs at once, each checked as it streams in, fsynced and moved onto the output only
when complete. A build that is stopped (killed, or failed) leaves that partial bundle, and the
next build takes every whole blob from it instead of fetching it again; bundles built before
serve the same way for bundles of related releases. Each blob is written to disk once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from gapkit.bundle.reuse import (
    PARTIAL_FOLDER,
    BlobPool,
    ReusingSource,
    built_bundles,
    new_partial,
    record_built,
    remove_partials_of,
    stopped_partials,
)
from gapkit.bundle.spec import BundleSpec
from gapkit.catalog import ImageList, resolve_images
from gapkit.errors import DigestMismatch
from gapkit.oci.copy import CopyReport, CopyRequest, EventHandler, copy
from gapkit.oci.model import Digest, Platform
from gapkit.oci.reference import Reference
from gapkit.oci.stores.archive import ArchiveStore, scan_blobs
from gapkit.oci.stores.options import DEFAULT_JOBS
from gapkit.snaps import FetchedSnap, fetch_snaps
from gapkit.units import human_bytes

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
    #: Blobs and bytes fetched from registries (`blobs_copied`), or already written
    #: (`blobs_present`: taken from earlier builds, or shared with another image of this one).
    fetched: CopyReport
    warnings: list[str] = field(default_factory=list)
    #: Of `fetched.blobs_present`: taken from a stopped build's partial bundle or an earlier one.
    blobs_reused: int = 0
    bytes_reused: int = 0

    def to_json(self) -> dict[str, object]:
        fetched: dict[str, object] = {**self.fetched.to_json(), "blobs_reused": self.blobs_reused,
                                      "bytes_reused": self.bytes_reused}
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

    output.parent.mkdir(parents=True, exist_ok=True)
    damaged: set[Digest] = set()
    while True:
        partials = await asyncio.to_thread(stopped_partials, cache)
        files = partials + await asyncio.to_thread(built_bundles, cache)
        pool = await asyncio.to_thread(BlobPool.scan, files, damaged)
        source = ReusingSource(spec.registries.settings().store(), pool)
        partial = new_partial(cache, output)
        try:
            report = await _build(spec, resolved, output, partial, source, requests, sources,
                                  snaps, platforms, jobs, on_event, warnings)
        except BaseException as exc:
            # A blob in an earlier bundle or partial went bad (they are checked on use):
            # leave it out and fetch it again. A wrong blob from a registry is an error.
            bad = Digest.parse(exc.expected) if isinstance(exc, DigestMismatch) else None
            if bad is not None and bad in source.reused and bad not in damaged:
                damaged.add(bad)
                note(f"blob {bad} in {source.where(bad)} was damaged; fetched it again")
                continue
            _tell_kept(partial, warn)
            raise
        finally:
            await source.close()
        await asyncio.to_thread(remove_partials_of, cache, output, partials)
        await asyncio.to_thread(record_built, cache, output)
        if others := await asyncio.to_thread(_sizes, partials):
            note(f"{len(others)} partial bundle(s) of other stopped builds "
                 f"({human_bytes(sum(others.values()))}) are kept in {cache / PARTIAL_FOLDER}; "
                 "delete them if those builds will not run again")
        return report


def _sizes(paths: list[Path]) -> dict[Path, int]:
    """The size of each file of `paths` that still exists."""
    sizes: dict[Path, int] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            sizes[path] = path.stat().st_size
    return sizes


def _tell_kept(partial: Path, warn: WarningHandler) -> None:
    """After a failed build: say where its whole blobs are kept, or remove a partial bundle
    that holds none."""
    with contextlib.suppress(OSError):
        blobs = scan_blobs(partial)
        if not blobs:
            partial.unlink()
            return
        size = sum(size for _, size in blobs.values())
        warn(f"what was fetched so far ({human_bytes(size)}) is kept in {partial}: run the "
             "same command again to go on from there, or delete that file")


async def _build(spec: BundleSpec, resolved: ImageList, output: Path, partial: Path,
                 source: ReusingSource, requests: list[CopyRequest],
                 sources: dict[Reference, tuple[str, ...]], snaps: list[FetchedSnap],
                 platforms: list[Platform], jobs: int, on_event: EventHandler | None,
                 warnings: list[str]) -> CreateReport:
    """Every image into the bundle (blobs several at once, then manifests), then the snaps
    and bundle.json; the report counts blobs taken from earlier files as present."""
    async with ArchiveStore.create(output, format="oci",
                                   keep_at=partial) as bundle:
        copied = await copy(source, bundle, requests, platforms, jobs, on_event)
        blobs_reused, bytes_reused = len(source.reused), sum(source.reused.values())
        fetched = dataclasses.replace(
            copied, blobs_copied=copied.blobs_copied - blobs_reused,
            bytes_copied=copied.bytes_copied - bytes_reused,
            blobs_present=copied.blobs_present + blobs_reused,
            bytes_present=copied.bytes_present + bytes_reused)
        report = await _finish_bundle(spec, resolved, output, bundle, sources, snaps, fetched,
                                      platforms, warnings)
    return dataclasses.replace(report, blobs_reused=blobs_reused, bytes_reused=bytes_reused)


async def _finish_bundle(spec: BundleSpec, resolved: ImageList, output: Path,
                         bundle: ArchiveStore, sources: dict[Reference, tuple[str, ...]],
                         snaps: list[FetchedSnap], written: CopyReport,
                         platforms: list[Platform], warnings: list[str]) -> CreateReport:
    """Snaps and bundle.json, after every image."""
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
    return CreateReport(manifest, output, written, warnings)
