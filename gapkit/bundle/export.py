"""`gapkit images export`: a lean, images-only tar streamed out of a bundle.

Format "oci" (the default) is what `microk8s images import` (1.25 and newer), `ctr image
import` and Docker 25+ `docker load` take; format "docker" is a `docker save` tar for older
Docker and tools that only read `manifest.json` (one platform per image).
"""

from __future__ import annotations

from pathlib import Path

from gapkit.bundle.reader import open_bundle
from gapkit.errors import BundleError, NotFound, UsageError
from gapkit.oci.copy import CopyReport, CopyRequest, EventHandler, copy
from gapkit.oci.model import Platform
from gapkit.oci.stores.archive import ArchiveFormat, ArchiveStore
from gapkit.oci.stores.options import DEFAULT_JOBS


def archive_format_of(text: str) -> ArchiveFormat:
    if text == "oci":
        return "oci"
    if text == "docker":
        return "docker"
    raise UsageError(f"--format {text!r}: write --format oci or --format docker")


async def export_images(
    bundle_path: Path,
    output: Path,
    platforms: list[Platform] | None = None,
    format: ArchiveFormat = "oci",
    jobs: int = DEFAULT_JOBS,
    on_event: EventHandler | None = None,
) -> CopyReport:
    """Copy every image of the bundle into a new tar at `output` (atomically).

    Without `platforms`, every platform the bundle holds is exported (for format "docker":
    this host's, since a `docker save` tar holds one platform per name).
    """
    bundle = await open_bundle(bundle_path)
    try:
        chosen = platforms or [Platform.parse(p) for p in bundle.manifest.platforms]
        if format == "docker" and not platforms:
            chosen = [Platform.host()]
        requests = [CopyRequest(ref.with_digest(None), ref.with_digest(None))
                    for ref in await bundle.store.images()]
        platform = chosen[0] if format == "docker" and len(chosen) == 1 else None
        try:
            async with ArchiveStore.create(output, format=format, platform=platform) as destination:
                return await copy(bundle.store, destination, requests, chosen, jobs, on_event)
        except NotFound as exc:
            raise BundleError(f"{bundle_path} is incomplete: {exc.message}",
                              hint=f"run `gapkit bundle verify {bundle_path}`, then build the "
                              "bundle again (or export only the platforms it holds)") from None
    finally:
        await bundle.close()
