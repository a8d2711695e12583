"""Blobs a bundle build takes from files on disk instead of fetching them again.

Two kinds of file hold blobs that a new build can use, both found through the cache folder:

- the **partial bundles** of builds that were stopped (killed, or failed): each build writes
  its bundle in `CACHE/partial/` (`ArchiveStore.create(keep_at=...)`) and only moves it onto
  the output when it is complete, so a stopped build leaves every whole blob it fetched there;
- the **bundles built before**, recorded in `CACHE/bundles.json` and used while each is where
  it was and unchanged: bundles of related releases share most of their blobs.

`ReusingSource` serves a blob from those files when one holds it and from the registries
otherwise. Every blob it serves passes the copy engine's digest check like any fetched one, so
a damaged file costs a fetch again (see `create_bundle`), never a wrong bundle. A blob is
written once: straight from the network, or from one of these files, into the new bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from gapkit.errors import StoreError
from gapkit.oci.fsutil import atomic_write
from gapkit.oci.model import Descriptor, Digest, Manifest
from gapkit.oci.reference import Reference, Repository
from gapkit.oci.stores.archive import scan_blobs
from gapkit.oci.stores.base import CHUNK_SIZE, Store

PARTIAL_FOLDER = "partial"
BUILT_BUNDLES = "bundles.json"
#: Bundles remembered as blob sources; older ones are forgotten (the files stay).
MAX_BUILT_BUNDLES = 8


def _output_key(output: Path) -> str:
    return hashlib.sha256(str(output.absolute()).encode()).hexdigest()[:12]


def new_partial(cache: Path, output: Path) -> Path:
    """Where a build of `output` writes its bundle until it is complete (a new, unique name)."""
    folder = cache / PARTIAL_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot use the cache folder {cache}: {exc.strerror or exc}",
                         hint="choose a writable one with --cache") from None
    return folder / f"{output.name}.{_output_key(output)}.{os.getpid()}-{secrets.token_hex(3)}.tar"


def stopped_partials(cache: Path) -> list[Path]:
    """Partial bundles no running build holds (their writer's `flock` is gone), newest first."""
    folder = cache / PARTIAL_FOLDER
    found: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.name.endswith(".tar") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                found.append((os.fstat(fd).st_mtime, Path(entry.path)))
            except OSError:
                pass  # a build is writing it
            finally:
                os.close(fd)
    return [path for _, path in sorted(found, reverse=True)]


def remove_partials_of(cache: Path, output: Path, partials: list[Path]) -> None:
    """Remove the stopped partial bundles of `output`, now that it is built."""
    marker = f".{_output_key(output)}."
    for path in partials:
        if path.name.startswith(output.name + marker):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass(frozen=True)
class _Built:
    path: Path
    size: int
    mtime_ns: int
    inode: int

    def unchanged(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.inode)

    @classmethod
    def of(cls, path: Path) -> _Built:
        st = path.stat()
        return cls(path.absolute(), st.st_size, st.st_mtime_ns, st.st_ino)


def built_bundles(cache: Path) -> list[Path]:
    """The recorded bundles that are still where they were, unchanged, newest first."""
    return [entry.path for entry in _read_built(cache) if entry.unchanged()]


def record_built(cache: Path, output: Path) -> None:
    """Remember `output` as a source of blobs for later builds (best effort: a cache)."""
    with contextlib.suppress(OSError):
        entries = [_Built.of(output)] + [e for e in _read_built(cache)
                                         if e.path != output.absolute() and e.unchanged()]
        data = json.dumps([{"path": str(e.path), "size": e.size, "mtime_ns": e.mtime_ns,
                            "inode": e.inode} for e in entries[:MAX_BUILT_BUNDLES]], indent=1)
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(cache / BUILT_BUNDLES, data.encode() + b"\n", durable=False)


def _read_built(cache: Path) -> list[_Built]:
    try:
        raw = json.loads((cache / BUILT_BUNDLES).read_bytes()[:1 << 20])
        return [_Built(Path(e["path"]), int(e["size"]), int(e["mtime_ns"]), int(e["inode"]))
                for e in raw if isinstance(e, dict)]
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return []  # no record, or a damaged one: a cache, rebuilt by the next build


@dataclass
class BlobPool:
    """Blobs found in files on disk: digest -> (file, offset, size). Unverified."""

    blobs: dict[Digest, tuple[Path, int, int]] = field(default_factory=dict)

    @classmethod
    def scan(cls, files: list[Path], exclude: set[Digest]) -> BlobPool:
        """Index the blob members of `files` (earlier files win); skip unreadable files."""
        pool = cls()
        for path in files:
            try:
                found = scan_blobs(path)
            except OSError:
                continue
            for digest, (offset, size) in found.items():
                if digest not in exclude:
                    pool.blobs.setdefault(digest, (path, offset, size))
        return pool


class ReusingSource:
    """A source store: blobs from a `BlobPool` when it holds them, else from `upstream`.

    Manifests always come from `upstream` (a tag may have moved since the pool's files were
    written). `reused` records what was served from the pool, so the report can tell blobs
    fetched from blobs reused, and a digest mismatch can be traced to its file.
    """

    verifies_digests = False

    def __init__(self, upstream: Store, pool: BlobPool) -> None:
        self.upstream = upstream
        self.pool = pool
        self.reused: dict[Digest, int] = {}

    def where(self, digest: Digest) -> Path | None:
        found = self.pool.blobs.get(digest)
        return None if found is None else found[0]

    async def get_manifest(self, ref: Reference) -> Manifest:
        return await self.upstream.get_manifest(ref)

    async def head_manifest(self, ref: Reference) -> Descriptor | None:
        return await self.upstream.head_manifest(ref)

    async def put_manifest(self, ref: Reference, manifest: Manifest) -> None:
        raise StoreError("a bundle build's source cannot be written to")

    async def head_blob(self, repository: Repository, digest: Digest) -> int | None:
        found = self.pool.blobs.get(digest)
        return found[2] if found else await self.upstream.head_blob(repository, digest)

    async def open_blob(self, repository: Repository, descriptor: Descriptor,
                        offset: int = 0) -> AsyncIterator[bytes]:
        path, start, size = self.pool.blobs.get(descriptor.digest, (None, 0, -1))
        f = None
        if path is not None and size == descriptor.size:
            with contextlib.suppress(OSError):  # gone since the scan (another build used it up)
                f = open(path, "rb")  # noqa: SIM115 - closed below
        if f is None:
            async for chunk in self.upstream.open_blob(repository, descriptor, offset):
                yield chunk
            return
        self.reused[descriptor.digest] = size
        with f:
            position = offset
            while position < size:
                chunk = await asyncio.to_thread(
                    os.pread, f.fileno(), min(CHUNK_SIZE, size - position), start + position)
                if not chunk:
                    return  # the file shrank: the digest check names the blob
                position += len(chunk)
                yield chunk

    async def put_blob(self, repository: Repository, descriptor: Descriptor,
                       chunks: AsyncIterator[bytes]) -> None:
        raise StoreError("a bundle build's source cannot be written to")

    async def tags(self, repository: Repository) -> list[str]:
        return await self.upstream.tags(repository)

    async def images(self) -> list[Reference]:
        return await self.upstream.images()

    async def close(self) -> None:
        await self.upstream.close()
