"""`gapkit bundle inspect`: what a bundle holds, from bundle.json and its layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gapkit.bundle.model import BundleManifest
from gapkit.bundle.reader import open_bundle
from gapkit.oci.reference import Reference


@dataclass
class BundleSummary:
    path: Path
    file_size: int
    manifest: BundleManifest
    #: Registries the images come from: each needs a mirror (or a side-load) on the nodes.
    registries: list[str]

    def to_json(self) -> dict[str, object]:
        return {"bundle": str(self.path), "file_size": self.file_size,
                "registries": self.registries, **self.manifest.model_dump()}


async def inspect_bundle(path: Path) -> BundleSummary:
    bundle = await open_bundle(path)
    try:
        registries = sorted({Reference.parse(image.reference).registry
                             for image in bundle.manifest.images})
        return BundleSummary(path, path.stat().st_size, bundle.manifest, registries)
    finally:
        await bundle.close()
