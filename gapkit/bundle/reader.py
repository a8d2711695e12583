"""Opening a bundle for use: the archive store plus bundle.json, refusing damaged bundles.

`bundle verify` reports every problem; every other command opens bundles here and refuses
one whose structure is wrong (unsafe paths, links, members written twice) or whose
bundle.json is missing or invalid, pointing at `bundle verify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from gapkit.bundle.model import BUNDLE_JSON, MAX_BUNDLE_JSON_SIZE, BundleManifest
from gapkit.errors import BundleError, GapkitError
from gapkit.oci.stores.archive import ArchiveStore

_VERIFY_HINT = "run `gapkit bundle verify {path}` for every problem, then build the bundle again"


@dataclass
class OpenBundle:
    path: Path
    store: ArchiveStore
    manifest: BundleManifest

    async def close(self) -> None:
        await self.store.close()


async def read_bundle_json(store: ArchiveStore) -> BundleManifest:
    if BUNDLE_JSON not in store.member_names():
        raise BundleError(
            f"{store.path} has no {BUNDLE_JSON}: it is not a gapkit bundle",
            hint="for an image archive that is not a bundle, use `gapkit copy oci-archive:FILE …`")
    data = await store.read_member(BUNDLE_JSON, MAX_BUNDLE_JSON_SIZE)
    try:
        return BundleManifest.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(f"{store.path}: {BUNDLE_JSON} is invalid ({exc.error_count()} problems)",
                          hint=_VERIFY_HINT.format(path=store.path)) from None


async def open_bundle(path: Path) -> OpenBundle:
    try:
        store = await ArchiveStore.open(path)
    except GapkitError as exc:
        raise BundleError(exc.message, hint=exc.hint or _VERIFY_HINT.format(path=path)) from None
    try:
        problems = store.structural_problems()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BundleError(f"{path} is damaged: {problems[0]}{more}",
                              hint=_VERIFY_HINT.format(path=path))
        manifest = await read_bundle_json(store)
    except BaseException:
        await store.close()
        raise
    return OpenBundle(path, store, manifest)
