"""The one copy engine: moves images between any two stores.

Like containers/image's `copy.Image`, every blob passes through `VerifiedStream`, so a wrong
byte fails the copy and the destination keeps nothing of that blob. Destinations are written in
a fixed order: blobs, then each platform's manifest, then the index under its tag, so an image
is only ever named once all it needs is there; a run that was interrupted starts again by asking
the destination which blobs it has, and fetches only the rest.

Each blob is fetched once per run however many images share it: blob work is keyed by digest,
and a second repository that needs the same blob waits for the first transfer and then finds it
(layout, archive) or mounts it (registry).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from gapkit.errors import GapkitError, ManifestError, NotFound, UploadInterrupted
from gapkit.oci.model import INDEX_MEDIA_TYPES, OCI_INDEX, Descriptor, Digest, Manifest, Platform
from gapkit.oci.reference import Reference, Repository
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.options import DEFAULT_JOBS
from gapkit.oci.stream import VerifiedStream

#: Indexes nested deeper than this are refused (real ones nest once at most).
MAX_INDEX_DEPTH = 4

T = TypeVar("T")


@dataclass(frozen=True)
class CopyRequest:
    """Copy the image `source` names to `destination` (often the same reference)."""

    source: Reference
    destination: Reference


@dataclass(frozen=True)
class BlobStarted:
    digest: Digest
    size: int


@dataclass(frozen=True)
class BlobProgress:
    digest: Digest
    nbytes: int


@dataclass(frozen=True)
class BlobFinished:
    digest: Digest
    size: int
    how: Literal["copied", "present", "mounted"]


@dataclass(frozen=True)
class ImageCopied:
    source: Reference
    destination: Reference
    digest: Digest
    note: str = ""


CopyEvent = BlobStarted | BlobProgress | BlobFinished | ImageCopied
EventHandler = Callable[[CopyEvent], None]


@dataclass
class CopiedImage:
    source: Reference
    destination: Reference
    #: Digest of what the destination tag now points at (the original unless `note` says why).
    digest: Digest
    media_type: str
    platforms: list[Platform]
    note: str = ""
    #: The config and layer blobs of the copied platform manifests.
    blobs: tuple[Descriptor, ...] = ()

    @property
    def size(self) -> int:
        return sum(d.size for d in self.blobs)


@dataclass
class CopyReport:
    images: list[CopiedImage] = field(default_factory=list)
    blobs_copied: int = 0
    bytes_copied: int = 0
    blobs_present: int = 0
    bytes_present: int = 0
    blobs_mounted: int = 0

    def merge(self, other: CopyReport) -> None:
        """Add another run's images and counts to this report."""
        self.images += other.images
        self.blobs_copied += other.blobs_copied
        self.bytes_copied += other.bytes_copied
        self.blobs_present += other.blobs_present
        self.bytes_present += other.bytes_present
        self.blobs_mounted += other.blobs_mounted

    def to_json(self) -> dict[str, object]:
        """The report as `--json` prints it: references and digests in their wire forms."""
        return {
            "images": [
                {"source": str(i.source), "destination": str(i.destination),
                 "digest": str(i.digest), "media_type": i.media_type,
                 "platforms": [str(p) for p in i.platforms], "size": i.size, "note": i.note}
                for i in self.images
            ],
            "blobs_copied": self.blobs_copied, "bytes_copied": self.bytes_copied,
            "blobs_present": self.blobs_present, "bytes_present": self.bytes_present,
            "blobs_mounted": self.blobs_mounted,
        }


@dataclass
class _Resolved:
    """An image's top manifest and the platform manifests to copy under it."""

    top: Manifest
    children: list[Manifest]
    #: Whether `children` is every manifest the index lists.
    complete: bool
    #: The platforms of the index entries copied, each once.
    platforms: list[Platform] = field(default_factory=list)


class _Copier:
    def __init__(self, source: Store, destination: Store,
                 platforms: frozenset[Platform] | None, jobs: int,
                 on_event: EventHandler | None, present_only: bool = False) -> None:
        self.present_only = present_only
        self.source = source
        self.destination = destination
        self.platforms = platforms
        self.slots = asyncio.Semaphore(max(1, jobs))
        self.on_event = on_event or (lambda event: None)
        self.report = CopyReport()
        self._blob_tasks: dict[tuple[Repository, Digest], asyncio.Task[None]] = {}
        self._digest_locks: dict[Digest, asyncio.Lock] = {}
        #: Indexes resolved, by repository and digest: many tags of one index resolve it once.
        self._resolved: dict[tuple[Repository, Digest], asyncio.Future[_Resolved]] = {}

    async def copy_image(self, request: CopyRequest) -> None:
        resolved = await self.resolve(request.source)
        src_repo, dst_repo = request.source.repository, request.destination.repository
        blobs = {d.digest: d for child in resolved.children for d in child.blobs if not d.is_foreign}
        await gather_all(self.ensure_blob(src_repo, dst_repo, desc) for desc in blobs.values())
        untagged = Reference(dst_repo)
        for child in resolved.children:
            if child is not resolved.top:
                await self.destination.put_manifest(untagged.with_digest(child.digest), child)
        top, note = await self.put_top(request.destination, resolved)
        self.report.images.append(CopiedImage(request.source, request.destination, top.digest,
                                              top.media_type, resolved.platforms, note,
                                              tuple(blobs.values())))
        self.on_event(ImageCopied(request.source, request.destination, top.digest, note))

    async def put_top(self, ref: Reference, resolved: _Resolved) -> tuple[Manifest, str]:
        """Put the top manifest under its tag, keeping the original index bytes.

        Some registries (CNCF distribution among them) refuse an index whose platform manifests
        are not all present. Then, as skopeo and crane do, the tag gets the one selected
        platform's manifest, or an index of just the selected platforms, and the report says
        the digest changed.
        """
        top = resolved.top
        target = ref if ref.tag is not None else ref.with_digest(top.digest)
        try:
            await self.destination.put_manifest(target, top)
            return top, ""
        except GapkitError as exc:
            if not top.is_index or resolved.complete or ref.tag is None:
                raise
            reason = exc.message
        if len(resolved.children) == 1:
            replacement = resolved.children[0]
        else:
            entries = [d for d in top.manifests if d.digest in {c.digest for c in resolved.children}]
            doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                   "manifests": [d.to_json() for d in entries]}
            replacement = Manifest.parse(json.dumps(doc, indent=2).encode(), OCI_INDEX)
        await self.destination.put_manifest(ref, replacement)
        note = (f"the destination refused the index {top.digest} without its other platforms "
                f"({reason}); {ref.tag} now names {replacement.digest}")
        return replacement, note

    async def resolve(self, ref: Reference) -> _Resolved:
        top = await self.source.get_manifest(ref)
        if not top.is_index:
            return _Resolved(top, [top], True)
        key = (ref.repository, top.digest)
        if key not in self._resolved:
            self._resolved[key] = asyncio.ensure_future(self._resolve_index(ref, top))
        return await asyncio.shield(self._resolved[key])

    async def _resolve_index(self, ref: Reference, top: Manifest) -> _Resolved:
        children: list[Manifest] = []
        complete = await self._collect(ref, top, children, 1, {top.digest})
        if not any(not c.is_index for c in children):
            available = ", ".join(sorted({str(d.platform) for d in top.manifests if d.platform}))
            wanted = ", ".join(sorted(str(p) for p in self.platforms or ()))
            raise NotFound(
                f"{ref} has no manifest for {wanted} (it has {available or 'no platforms'})",
                hint="choose one of its platforms with --platform, or copy all with --all-platforms",
            )
        copied = {c.digest for c in children}
        platforms = dict.fromkeys(d.platform for d in top.manifests
                                  if d.platform and d.digest in copied)
        return _Resolved(top, children, complete, list(platforms))

    async def _collect(self, ref: Reference, index: Manifest, out: list[Manifest],
                       depth: int, seen: set[Digest]) -> bool:
        """Fetch the manifests under `index` for our platforms into `out`, each digest once
        (`seen`): an index listing one child thousands of times, nested, is not a bomb."""
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"{ref} nests indexes more than {MAX_INDEX_DEPTH} deep")
        selected = index.manifests if self.platforms is None else tuple(
            d for d in index.manifests
            if d.media_type in INDEX_MEDIA_TYPES
            or (d.platform is not None and d.platform in self.platforms))
        if self.present_only:
            selected = tuple([d for d in selected if await self.source.head_manifest(
                ref.with_tag(None).with_digest(d.digest)) is not None])
        complete = len(selected) == len(index.manifests)
        fresh = {d.digest: d for d in selected if d.digest not in seen}
        seen.update(fresh)
        fetched = await gather_all(self.source.get_manifest(ref.with_tag(None).with_digest(digest))
                                   for digest in fresh)
        for child in fetched:
            if child.is_index:
                complete = await self._collect(ref, child, out, depth + 1, seen) and complete
            out.append(child)
        return complete

    def ensure_blob(self, src_repo: Repository, dst_repo: Repository,
                    desc: Descriptor) -> asyncio.Task[None]:
        key = (dst_repo, desc.digest)
        task = self._blob_tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(self._transfer(src_repo, dst_repo, desc))
            self._blob_tasks[key] = task
        return task

    async def _transfer(self, src_repo: Repository, dst_repo: Repository, desc: Descriptor) -> None:
        lock = self._digest_locks.setdefault(desc.digest, asyncio.Lock())
        async with lock:
            if await self.destination.head_blob(dst_repo, desc.digest) is not None:
                self.report.blobs_present += 1
                self.report.bytes_present += desc.size
                self.on_event(BlobFinished(desc.digest, desc.size, "present"))
                return
            async with self.slots:
                self.on_event(BlobStarted(desc.digest, desc.size))
                while True:
                    stream = VerifiedStream(
                        self.source.open_blob(src_repo, desc), desc, where=str(src_repo),
                        on_bytes=lambda n: self.on_event(BlobProgress(desc.digest, n)),
                        checked_by_destination=getattr(self.destination, "verifies_digests",
                                                       False))
                    try:
                        await self.destination.put_blob(dst_repo, desc, stream)
                        break
                    except UploadInterrupted:
                        # Sent again (the destination bounds how many times): its bytes so far
                        # are taken back, so progress counts each blob once.
                        self.on_event(BlobProgress(desc.digest, -stream.received))
                        continue
                    finally:
                        await stream.aclose()
            if stream.received == 0 and desc.size > 0:
                self.report.blobs_mounted += 1
                self.on_event(BlobFinished(desc.digest, desc.size, "mounted"))
            else:
                self.report.blobs_copied += 1
                self.report.bytes_copied += stream.received
                self.on_event(BlobFinished(desc.digest, desc.size, "copied"))


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all; on the first failure cancel the rest and raise that failure."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def copy(
    source: Store,
    destination: Store,
    requests: Sequence[CopyRequest],
    platforms: Collection[Platform] | None = None,
    jobs: int = DEFAULT_JOBS,
    on_event: EventHandler | None = None,
    present_only: bool = False,
) -> CopyReport:
    """Copy every requested image from `source` to `destination`.

    `platforms` selects the platform manifests of multi-arch images (None: all of them); the
    index itself is kept byte for byte, so it still resolves by its original digest.
    `present_only` skips platform manifests the source does not hold (a bundle or export made
    for some platforms only) instead of failing on them.
    """
    copier = _Copier(source, destination, frozenset(platforms) if platforms is not None else None,
                     jobs, on_event, present_only)
    await gather_all(copier.copy_image(request) for request in requests)
    order = {(r.source, r.destination): i for i, r in enumerate(requests)}
    copier.report.images.sort(key=lambda image: order[(image.source, image.destination)])
    return copier.report
