"""OCI image layout directory as a store (`oci:DIR` in skopeo's terms).

Blobs are written to a temp file beside their final name, hashed as they stream, fsynced and
renamed; `index.json` is replaced atomically after each named image. Each named image carries its
full reference in both `io.containerd.image.name` and `org.opencontainers.image.ref.name`, so
`ctr image import` and skopeo (`oci:DIR:docker.io/library/nginx:latest`) find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from gapkit.errors import DigestMismatch, NotFound, StoreError
from gapkit.oci.fsutil import atomic_write, fsync_dir, pid_alive
from gapkit.oci.model import (
    OCI_INDEX,
    Descriptor,
    Digest,
    Manifest,
)
from gapkit.oci.naming import entry_names, naming_annotations
from gapkit.oci.reference import Reference, Repository
from gapkit.oci.stores.base import CHUNK_SIZE
from gapkit.oci.stream import THREAD_HASH_THRESHOLD, VerifiedStream

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_CONTENT = b'{"imageLayoutVersion": "1.0.0"}'
_PARTIAL_PREFIX = ".partial-"


class LayoutStore:
    """A store backed by an OCI image layout folder."""

    #: Blobs are hashed here only when the stream is not already a VerifiedStream (see `Store`).
    verifies_digests = False

    def __init__(self, root: Path, create: bool = True, durable: bool = True) -> None:
        """Open (or create) the layout at `root`.

        `durable=False` skips the fsyncs, for a cache whose content is checked again when it
        is used (the bundle cache: what an earlier run left there is hashed again).
        """
        self.root = Path(root)
        self.durable = durable
        self.blobs = self.root / "blobs" / "sha256"
        self._index_lock = asyncio.Lock()
        self._entries: list[Descriptor] | None = None
        self._by_name: dict[tuple[Repository, str | None], list[Descriptor]] | None = None
        #: Changes made to `_entries`, and how many of them index.json holds (`_write_index`).
        self._index_changes = 0
        self._index_written = 0
        self._dirty_dirs = False
        marker = self.root / OCI_LAYOUT_FILE
        if not marker.exists():
            if not create:
                raise StoreError(
                    f"{self.root} is not an OCI image layout (it has no {OCI_LAYOUT_FILE} file)",
                    hint="give the folder that holds oci-layout, index.json and blobs/",
                )
            if self.root.exists() and any(self.root.iterdir()):
                raise StoreError(
                    f"{self.root} exists, is not empty and is not an OCI image layout",
                    hint="choose an empty or new folder for the layout",
                )
            with self._writing():
                self.blobs.mkdir(parents=True, exist_ok=True)
                atomic_write(marker, OCI_LAYOUT_CONTENT, durable=self.durable)
                atomic_write(self.root / "index.json", self._index_bytes([]),
                             durable=self.durable)
        with self._writing():
            self.blobs.mkdir(parents=True, exist_ok=True)
        self._remove_stale_partials()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed local write (a full disk, a read-only folder) into an error that names
        the layout. Only around file operations: an OSError of a source stream (a reset) is not
        the layout's."""
        try:
            yield
        except OSError as exc:
            raise StoreError(f"cannot write the layout {self.root}: {exc.strerror or exc}",
                             hint="check the free space and the permissions there") from exc

    async def _write_in_thread(self, fn: Callable[..., object], *args: object) -> None:
        with self._writing():
            await asyncio.to_thread(fn, *args)

    # -- index.json ---------------------------------------------------------------------------

    def _load_entries(self) -> list[Descriptor]:
        if self._entries is None:
            path = self.root / "index.json"
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raw = self._index_bytes([])
            try:
                manifest = Manifest.parse(raw, OCI_INDEX, where=str(path))
            except Exception as exc:
                raise StoreError(f"{path} is damaged: {exc}",
                                 hint="restore the layout from its source") from None
            self._entries = list(manifest.manifests)
        return self._entries

    def _named(self) -> dict[tuple[Repository, str | None], list[Descriptor]]:
        """Index entries by the (repository, tag) of each name they have, in index order."""
        if self._by_name is None:
            self._by_name = {}
            for entry in self._load_entries():
                self._add_names(entry)
        return self._by_name

    def _add_names(self, entry: Descriptor) -> None:
        if self._by_name is not None:
            for name in entry_names(entry.annotations):
                self._by_name.setdefault((name.repository, name.tag), []).append(entry)

    @staticmethod
    def _index_bytes(entries: list[Descriptor]) -> bytes:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [e.to_json() for e in entries],
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    def _find(self, ref: Reference) -> Descriptor:
        if ref.tag is not None:
            for entry in self._named().get((ref.repository, ref.tag), ()):
                if ref.digest is None or entry.digest == ref.digest:
                    return entry
        if ref.digest is not None:
            for entry in self._load_entries():
                if entry.digest == ref.digest:
                    return entry
            size = self._blob_size(ref.digest)
            if size is not None:
                return Descriptor("", ref.digest, size)
        raise NotFound(f"{ref} is not in the layout {self.root}",
                       hint="list what it holds with `skopeo inspect` or `cat index.json`")

    # -- manifests ----------------------------------------------------------------------------

    async def get_manifest(self, ref: Reference) -> Manifest:
        desc = self._find(ref)
        path = self._blob_path(desc.digest)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"layout {self.root} names {ref} but has no blob {desc.digest}",
                             hint="the layout is incomplete; copy the image into it again") from None
        return Manifest.parse(raw, desc.media_type or None, where=f"{ref} in {self.root}",
                              expected=desc.digest)

    async def head_manifest(self, ref: Reference) -> Descriptor | None:
        try:
            desc = self._find(ref)
        except NotFound:
            return None
        if not desc.media_type:
            return (await self.get_manifest(ref)).descriptor()
        return desc

    async def put_manifest(self, ref: Reference, manifest: Manifest) -> None:
        path = self._blob_path(manifest.digest)
        if not path.exists():
            await self._write_in_thread(self._write_blob_bytes, path, manifest.raw)
        if ref.tag is None:
            return
        entries, named = self._load_entries(), self._named()
        replaced = named.get((ref.repository, ref.tag))
        if replaced:  # the name moves to the new manifest
            self._entries = entries = [e for e in entries if not any(e is r for r in replaced)]
            self._by_name = None
        entry = manifest.descriptor(annotations=naming_annotations(ref))
        entries.append(entry)
        self._add_names(entry)
        self._index_changes += 1
        await self._write_index(self._index_changes)

    async def _write_index(self, change: int) -> None:
        """Return once index.json holds every change up to number `change`.

        A group commit: the changes made while one write is under way go to disk together in
        the next, so naming N images at once costs a few writes of index.json, not N (each
        one all of it, fsynced).
        """
        async with self._index_lock:
            if self._index_written >= change:
                return
            latest, data = self._index_changes, self._index_bytes(self._load_entries())
            await self._write_in_thread(
                atomic_write, self.root / "index.json", data, 0o644, self.durable)
            self._index_written = latest

    def _write_blob_bytes(self, path: Path, data: bytes) -> None:
        atomic_write(path, data, mode=0o644, durable=self.durable)

    # -- blobs --------------------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> Path:
        folder = self.blobs if digest.algorithm == "sha256" else self.root / "blobs" / digest.algorithm
        return folder / digest.hex

    def _blob_size(self, digest: Digest) -> int | None:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def head_blob(self, repository: Repository, digest: Digest) -> int | None:
        return self._blob_size(digest)

    async def blob_location(self, digest: Digest) -> tuple[Path, int, int] | None:
        """(file, 0, size) of a blob held as a regular file, as `ArchiveStore.blob_location`."""
        path = self._blob_path(digest)
        try:
            info = path.lstat()
        except OSError:
            return None
        return (path, 0, info.st_size) if stat.S_ISREG(info.st_mode) else None

    async def open_blob(
        self, repository: Repository, descriptor: Descriptor, offset: int = 0
    ) -> AsyncIterator[bytes]:
        path = self._blob_path(descriptor.digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in finally across awaits
        except FileNotFoundError:
            raise NotFound(f"blob {descriptor.digest} is not in the layout {self.root}",
                           hint="the layout is incomplete; copy the image into it again") from None
        try:
            if offset:
                f.seek(offset)
            while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
                yield chunk
        finally:
            f.close()

    async def put_blob(
        self, repository: Repository, descriptor: Descriptor, chunks: AsyncIterator[bytes]
    ) -> None:
        final = self._blob_path(descriptor.digest)
        verify = not isinstance(chunks, VerifiedStream)
        hasher = descriptor.digest.hasher() if verify else None
        tmp = final.with_name(
            f"{_PARTIAL_PREFIX}{descriptor.digest.hex}-{os.getpid()}-{secrets.token_hex(4)}")
        with self._writing():
            final.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb", buffering=0)  # noqa: SIM115 - closed in finally across awaits
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if hasher is not None and len(chunk) >= THREAD_HASH_THRESHOLD:
                    await self._write_in_thread(_hash_and_write, hasher, f, chunk)
                else:
                    if hasher is not None:
                        hasher.update(chunk)
                    await self._write_in_thread(f.write, chunk)
            if hasher is not None:
                actual = f"{descriptor.digest.algorithm}:{hasher.hexdigest()}"
                if actual != str(descriptor.digest) or size != descriptor.size:
                    raise DigestMismatch(str(descriptor.digest), actual)
            if self.durable:
                await self._write_in_thread(os.fsync, f.fileno())
            with self._writing():
                f.close()
                os.replace(tmp, final)
            self._dirty_dirs = True
        finally:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def tags(self, repository: Repository) -> list[str]:
        return sorted({ref.tag for ref in await self.images()
                       if ref.repository == repository and ref.tag is not None})

    async def images(self) -> list[Reference]:
        out: list[Reference] = []
        for entry in self._load_entries():
            names = entry_names(entry.annotations)
            if names:
                out.append(names[0].with_digest(entry.digest))
        return out

    async def close(self) -> None:
        if self._dirty_dirs and self.durable:
            await self._write_in_thread(fsync_dir, self.blobs)
            self._dirty_dirs = False

    def _remove_stale_partials(self) -> None:
        """Delete temp files that a killed gapkit left; those of a live process stay."""
        for path in self.blobs.glob(f"{_PARTIAL_PREFIX}*"):
            try:
                pid = int(path.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if not pid_alive(pid) or pid == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _hash_and_write(hasher: Any, f: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    f.write(chunk)
