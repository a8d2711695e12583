"""Open whatever holds images on the air-gapped side: a gapkit bundle, an OCI layout folder, or
a tar that `ctr image export`, `microk8s images export-local`, `docker save` or skopeo wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gapkit.bundle.model import BUNDLE_JSON, BundleManifest
from gapkit.bundle.reader import open_bundle
from gapkit.errors import UsageError
from gapkit.oci.model import Platform
from gapkit.oci.stores.archive import ArchiveStore
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.layout import OCI_LAYOUT_FILE, LayoutStore


@dataclass
class ImageSource:
    path: Path
    store: Store
    #: The bundle's record, when the source is a gapkit bundle.
    bundle: BundleManifest | None = None

    @property
    def kind(self) -> str:
        """"bundle", "archive" (an OCI or `docker save` tar) or "layout"."""
        if self.bundle is not None:
            return "bundle"
        return "layout" if isinstance(self.store, LayoutStore) else "archive"

    @property
    def platforms(self) -> list[Platform] | None:
        """The platforms a bundle carries; None (whatever is present) for other sources."""
        if self.bundle is None:
            return None
        return [Platform.parse(p) for p in self.bundle.platforms]


async def open_image_source(path: Path) -> ImageSource:
    """Open `path` for reading; a gapkit bundle goes through the bundle reader, so a damaged
    bundle is refused (pointing at `bundle verify`)."""
    hint = "give a gapkit bundle, an image tar, or the folder that holds oci-layout, index.json " \
        "and blobs/"
    if path.is_dir():
        if not (path / OCI_LAYOUT_FILE).is_file():
            raise UsageError(f"{path} is a folder but not an OCI image layout (it has no "
                             f"{OCI_LAYOUT_FILE})", hint=hint)
        return ImageSource(path, LayoutStore(path, create=False, durable=False))
    if not path.exists():
        raise UsageError(f"{path} does not exist", hint=hint)
    if not path.is_file():
        raise UsageError(f"{path} is not a file or a folder", hint=hint)
    archive = await ArchiveStore.open(path)
    if BUNDLE_JSON in archive.member_names():
        await archive.close()
        bundle = await open_bundle(path)
        return ImageSource(path, bundle.store, bundle.manifest)
    return ImageSource(path, archive)
