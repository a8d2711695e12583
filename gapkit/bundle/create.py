"""`gapkit bundle create`: resolve, fetch into a cache, then write the bundle in one stream.

Images are fetched from their registries into a cache (an OCI layout, `--cache`), so a run that
is stopped and started again fetches only what is missing, and bundles of related releases
share what they have in common. The cache skips fsync: every blob passes a `VerifiedStream`
again on its way into the bundle, and a cached blob that fails that check is dropped and
fetched again. The bundle itself is written to a temporary file, fsynced and renamed only when
complete.
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
from gapkit.oci.copy import DEFAULT_JOBS, CopyReport, CopyRequest, EventHandler, copy
from gapkit.oci.model import Platform
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
    fetched = await _fetch(spec, cache_layout, requests, platforms, jobs, on_event)
    output.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            return await _assemble(spec, resolved, output, cache_layout, requests,
                                   sources, snaps, fetched, platforms, warnings)
        except DigestMismatch as exc:
            if attempt == 2:
                raise
            # A cached blob went bad (the cache is not fsynced): drop it and fetch it again.
            bad = cache_layout / "blobs" / exc.expected.replace(":", "/", 1)
            with contextlib.suppress(FileNotFoundError):
                bad.unlink()
            note(f"cached blob {exc.expected} was damaged; fetched it again")
            fetched = await _fetch(spec, cache_layout, requests, platforms, jobs, on_event)
    raise AssertionError("unreachable")


async def _fetch(spec: BundleSpec, cache_layout: Path, requests: list[CopyRequest],
                 platforms: list[Platform], jobs: int, on_event: EventHandler | None) -> CopyReport:
    source = spec.registries.settings().store()
    destination = LayoutStore(cache_layout, durable=False)
    try:
        return await copy(source, destination, requests, platforms, jobs, on_event)
    finally:
        await destination.close()
        await source.close()


async def _assemble(spec: BundleSpec, resolved: ImageList, output: Path, cache_layout: Path,
                    requests: list[CopyRequest], sources: dict[Reference, tuple[str, ...]],
                    snaps: list[FetchedSnap], fetched: CopyReport, platforms: list[Platform],
                    warnings: list[str]) -> CreateReport:
    source = LayoutStore(cache_layout, create=False, durable=False)
    async with ArchiveStore.create(output, format="oci") as bundle:
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
    await source.close()
    return CreateReport(manifest, output, fetched, warnings)
