"""Tar archives of images as a store: read in place by member offsets, written as one stream.

Reading (`ArchiveStore.open`) walks the tar headers once (never the data) and keeps, for each
member, where its bytes start and how many there are; blobs are then served by reading ranges
of the tar file in a worker thread. Two kinds of archive are understood:

- an **OCI image layout** in a tar (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), as
  `skopeo copy … oci-archive:`, `ctr image export`, Docker 25+ `docker save` and gapkit's own
  bundles write it. Names come from the `io.containerd.image.name` and
  `org.opencontainers.image.ref.name` annotations of `index.json` entries (see `gapkit.oci.naming`).
- a **`docker save` tar** (`manifest.json` with `Config`, `RepoTags`, `Layers`), as older
  `docker save` and `skopeo copy … docker-archive:` write it. It has no manifests, so one Docker
  schema 2 manifest is synthesised per entry, the way a registry would serve the image: blob
  digests are the sha256 of the member bytes (hashed on first use, streamed, cached), layer media
  types say whether the member is gzip-compressed. Each RepoTag names the image.

Members gapkit does not know (a bundle's `gapkit/` folder, `repositories`, the legacy `<id>/`
folders) are ignored by the store and reachable through `open_member`. Member paths that are
absolute or contain `..` are never used; symbolic and hard links are followed only to members
inside the archive.

Writing (`ArchiveStore.create`) streams blobs straight into a tar on a temporary file next to
the target, and only `close()` writes the index (`index.json` for format `"oci"`,
`manifest.json` + `repositories` for format `"docker"`), fsyncs and renames the file onto the
target. Until then, and whenever anything fails, the target is left untouched; `abort()` (or
leaving an `async with` block by an exception) removes the temporary file, unless it was
created as a resume point (`keep_at`), which `scan_blobs` reads back.

Several blobs stream in at once: each `put_blob` reserves the blob's region (header and data,
its size is known from the descriptor) at the end of the file and fills it at its own pace.
Until its bytes are complete and checked, the member is named `gapkit/pending/<alg>/<hex>`;
the header is then rewritten with its real name, so a killed writer's file names only whole
blobs as `blobs/...`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import tarfile
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from gapkit.errors import (
    DigestMismatch,
    GapkitError,
    InvalidReference,
    ManifestError,
    NotFound,
    StoreError,
    UsageError,
)
from gapkit.oci.fsutil import remove_dead_temps, temp_path
from gapkit.oci.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    INDEX_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    Descriptor,
    Digest,
    Manifest,
    Platform,
)
from gapkit.oci.naming import entry_names, naming_annotations
from gapkit.oci.reference import Reference, Repository
from gapkit.oci.stores.base import CHUNK_SIZE
from gapkit.oci.stream import VerifiedStream

ArchiveFormat = Literal["oci", "docker"]
FORMATS: tuple[ArchiveFormat, ...] = ("oci", "docker")

#: More members than any real image archive has (a bundle of 1000 images has ~10 000).
MAX_MEMBERS = 100_000
#: `index.json`, `manifest.json`, `repositories`: far larger than real ones, small enough to read.
MAX_METADATA_SIZE = 16 * 1024 * 1024
#: Data of pax and GNU long-name headers, which tarfile reads into memory.
MAX_HEADER_DATA = 1024 * 1024
#: Links followed in a row before an archive is called hostile.
MAX_LINK_HOPS = 8
#: Member and link names (PATH_MAX): every name is kept while the archive is open.
MAX_NAME_LENGTH = 4096
#: Nested indexes followed from `index.json` to find names.
MAX_INDEX_DEPTH = 4
#: Parsed manifests kept (by their size): names sharing a manifest parse it once, so an archive
#: naming one big index thousands of times costs no more than naming it once.
MANIFEST_CACHE_BYTES = 16 * 1024 * 1024

OCI_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOB_PATH = re.compile(r"^blobs/([a-z0-9]+)/([a-f0-9]+)$")
_RESERVED = frozenset({"oci-layout", "index.json", "manifest.json", "repositories"})
_META_HEADER_TYPES = frozenset({
    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
})
_DAMAGED = "the archive is damaged or incomplete; copy it again and compare its sha256 with the source"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# The tar index: member name -> where its bytes are


@dataclass(frozen=True)
class _Member:
    """A regular member's data: `size` bytes from `offset` in the tar file."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Entry:
    kind: Literal["file", "symlink", "hardlink"]
    offset: int
    size: int
    link: str = ""


class _HostileHeader(Exception):
    """Raised from inside tarfile's header parsing; turned into a StoreError by the walker."""


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses pax / GNU long-name headers whose data would be absurdly large.

    tarfile reads such header data into memory whole; a hostile archive could declare
    gigabytes. Every header (also the ones chained after a pax header) passes through here.
    """

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> _GuardedTarInfo:
        fileobj = tarfile.fileobj
        assert fileobj is not None
        start = fileobj.tell()
        buf = fileobj.read(_BLOCK)
        fileobj.seek(start)
        # Only the type flag and the size field: tarfile parses (and checks) the header itself.
        if len(buf) == _BLOCK and buf[156:157] in _META_HEADER_TYPES:
            size_field = buf[124:136]
            if size_field[0] & 0x80:  # base-256: only needed for sizes of 8 GiB and more
                size = 1 << 63
            else:
                try:
                    size = int(size_field.replace(b"\0", b" ").strip() or b"0", 8)
                except ValueError:
                    size = 0  # not a valid header: tarfile reports it
            if size > MAX_HEADER_DATA:
                raise _HostileHeader(
                    f"an extended header at byte {start} declares {size} bytes of header data")
        return super().fromtarfile(tarfile)


def _normalise(name: str) -> str | None:
    """`./blobs//sha256/x` -> `blobs/sha256/x`; None for absolute paths and `..` components."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


@dataclass
class _TarIndex:
    path: Path
    file_size: int
    entries: dict[str, _Entry]
    #: Names of members that were skipped because their paths are unsafe.
    unsafe: list[str]
    #: Names that more than one member carries (the last one wins, as in tar).
    duplicates: list[str] = field(default_factory=list)

    def resolve(self, name: str, what: str) -> _Member:
        """The regular member `name` stands for, following links inside the archive."""
        current = name
        for _ in range(MAX_LINK_HOPS + 1):
            entry = self.entries.get(current)
            if entry is None:
                via = f" (reached through a link from {name!r})" if current != name else ""
                raise StoreError(
                    f"{self.path}: {what} refers to member {current!r}{via}, "
                    "which is not in the archive", hint=_DAMAGED)
            if entry.kind == "file":
                return _Member(current, entry.offset, entry.size)
            if entry.kind == "hardlink":
                target = _normalise(entry.link)
            elif entry.link.startswith("/"):
                target = None
            else:
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(current), entry.link))
                target = None if joined == ".." or joined.startswith("../") else _normalise(joined)
            if target is None:
                raise StoreError(
                    f"{self.path}: member {current!r} links to {entry.link!r}, "
                    "outside the archive; gapkit does not follow it",
                    hint="the archive was not written by an image tool; do not use it")
            current = target
        raise StoreError(f"{self.path}: member {name!r} is a chain of more than "
                         f"{MAX_LINK_HOPS} links", hint="the archive is hostile or broken")


def _walk(path: Path) -> _TarIndex:
    """Read every tar header of `path` (seeking over the data) into a member index."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise StoreError(f"cannot open archive {path}: {exc.strerror or exc}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=f, mode="r:", tarinfo=_GuardedTarInfo)  # noqa: SIM115
        except (tarfile.TarError, _HostileHeader) as exc:
            hint = "give gapkit an uncompressed tar (an OCI archive or a `docker save` tar)"
            if magic.startswith(_GZIP_MAGIC):
                hint = "it is gzip-compressed: decompress it first (`gunzip -k FILE`)"
            elif magic.startswith(_ZSTD_MAGIC):
                hint = "it is zstd-compressed: decompress it first (`zstd -d FILE`)"
            raise StoreError(f"{path} is not a tar archive ({exc})", hint=hint) from None
        entries: dict[str, _Entry] = {}
        unsafe: list[str] = []
        duplicates: list[str] = []
        count = 0
        last = "(none)"
        try:
            while True:
                info = tar.next()
                if info is None:
                    break
                tar.members.clear()  # type: ignore[attr-defined]  # else it keeps every TarInfo
                if info.size < 0:  # tarfile takes a pax size of -1536 and walks back, for ever
                    raise StoreError(
                        f"{path}: member {info.name[:64]!r} at byte {info.offset} declares a "
                        f"size of {info.size} bytes; refusing it",
                        hint="the archive is hostile or broken")
                count += 1
                if count > MAX_MEMBERS:
                    raise StoreError(
                        f"{path} has more than {MAX_MEMBERS} members; refusing it",
                        hint="no image archive has that many; the file is not one gapkit can use")
                if info.offset_data + info.size > file_size and info.isreg():
                    raise StoreError(
                        f"{path} is truncated: member {info.name!r} declares {info.size} bytes "
                        f"but the file ends {file_size - info.offset_data} bytes into it",
                        hint=_DAMAGED)
                if max(len(info.name), len(info.linkname)) > MAX_NAME_LENGTH:
                    long = max(info.name, info.linkname, key=len)
                    raise StoreError(
                        f"{path}: member {info.name[:64]!r}... at byte {info.offset} has a name "
                        f"of {len(long)} characters, more than the {MAX_NAME_LENGTH} any real "
                        "archive uses; refusing it", hint="the archive is hostile or broken")
                last = info.name
                name = _normalise(info.name)
                if name is None:
                    unsafe.append(info.name)
                    continue
                if name in entries and not info.isdir():
                    duplicates.append(name)
                if info.isreg() and not info.issparse():
                    entries[name] = _Entry("file", info.offset_data, info.size)
                elif info.issym():
                    entries[name] = _Entry("symlink", 0, 0, info.linkname)
                elif info.islnk():
                    entries[name] = _Entry("hardlink", 0, 0, info.linkname)
                else:
                    entries.pop(name, None)
        except _HostileHeader as exc:
            raise StoreError(f"{path}: {exc}; refusing it", hint="the archive is hostile or broken"
                             ) from None
        except tarfile.TarError as exc:
            raise StoreError(f"{path} is damaged after member {last!r}: {exc}",
                             hint=_DAMAGED) from None
        # tar ends with zero blocks; a file cut at a member boundary has none.
        f.seek(tar.offset)
        trailer = f.read(_BLOCK)
        if len(trailer) < _BLOCK or trailer.count(0) != _BLOCK:
            why = ("it ends without tar's end-of-archive blocks" if len(trailer) < _BLOCK
                   else f"the data at byte {tar.offset} is not a tar header")
            raise StoreError(f"{path} is truncated or damaged after member {last!r}: {why}",
                             hint=_DAMAGED)
        return _TarIndex(path, file_size, entries, unsafe, duplicates)


def scan_blobs(path: Path) -> dict[Digest, tuple[int, int]]:
    """The blob members of a tar, finished or not: digest -> (offset, size) of the data.

    For reusing blobs of an earlier archive, or of a writer's `keep_at` file that was never
    finished (a kill, an error): headers are read until the first thing that is not one (the
    end of a partial file), members still named pending are passed over, and a member whose
    data the file does not hold is left out. Nothing is verified here: hash before trusting.
    """
    found: dict[Digest, tuple[int, int]] = {}
    with open(path, "rb") as f:
        fd = f.fileno()
        file_size = os.fstat(fd).st_size
        position, named_elsewhere = 0, False
        for _ in range(MAX_MEMBERS):
            block = os.pread(fd, _BLOCK, position)
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                break
            data = position + _BLOCK
            if info.size < 0:
                break
            match = _BLOB_PATH.match(info.name)
            if (match and info.isreg() and not named_elsewhere
                    and data + info.size <= file_size):
                with contextlib.suppress(InvalidReference, ValueError):
                    found[Digest.parse(f"{match[1]}:{match[2]}")] = (data, info.size)
            # a pax or GNU long-name header gives the next member a name its own header lacks
            named_elsewhere = info.type in _META_HEADER_TYPES
            position = data + info.size + (-info.size % _BLOCK)
    return found


def _pread_exact(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise StoreError(f"{path} ended early: the file changed or was truncated while open",
                         hint=_DAMAGED)
    return data


def _hash_range(path: Path, offset: int, size: int) -> Digest:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        pos, end = offset, offset + size
        while pos < end:
            chunk = os.pread(fd, min(CHUNK_SIZE, end - pos), pos)
            if not chunk:
                raise StoreError(f"{path} ended early: the file changed or was truncated "
                                 "while open", hint=_DAMAGED)
            hasher.update(chunk)
            pos += len(chunk)
    return Digest("sha256", hasher.hexdigest())


# --------------------------------------------------------------------------------------------
# Names


def _layer_type(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return DOCKER_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return OCI_LAYER_ZSTD
    return DOCKER_LAYER


@dataclass
class _DockerImage:
    """One `manifest.json` entry of a `docker save` tar."""

    position: int
    config: _Member
    layers: tuple[_Member, ...]
    manifest: Manifest | None = None


# --------------------------------------------------------------------------------------------
# The store


#: Bytes written between two fdatasyncs of an archive being written.
WRITE_BACK_STEP = 128 << 20


@dataclass
class _Region:
    """Room reserved in an archive being written for one blob: a header at `start`, then
    `size` bytes of data and the padding to a whole block."""

    digest: Digest
    size: int
    start: int
    header_size: int
    #: A `put_blob` is filling it; others for the same blob wait for `idle`.
    busy: bool = True
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def data(self) -> int:
        return self.start + self.header_size

    @property
    def end(self) -> int:
        return self.data + self.size + (-self.size % _BLOCK)


@dataclass
class _Writer:
    """State of an archive being written."""

    temp: Path
    file: Any  # io.BufferedRandom, used only on the executor's one thread
    executor: concurrent.futures.ThreadPoolExecutor
    #: Runs the fdatasyncs of `ArchiveStore._write_back`, beside the writes.
    syncer: concurrent.futures.ThreadPoolExecutor
    platform: Platform
    finalizer: weakref.finalize[Any, Any]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The end of the archive so far: where the next member or blob region starts.
    position: int = 0
    #: Bytes written since the last fdatasync (see `ArchiveStore._write_back`).
    unsynced: int = 0
    #: The fdatasync in flight, if any.
    write_back: concurrent.futures.Future[None] | None = None
    #: Blob regions reserved and not (yet) complete, by (digest, size).
    regions: dict[tuple[Digest, int], _Region] = field(default_factory=dict)
    broken: str | None = None
    extra_members: dict[str, _Member] = field(default_factory=dict)
    #: docker format: name -> the image manifest written for it.
    docker_tags: dict[Reference, Digest] = field(default_factory=dict)


class ArchiveStore:
    """A tar archive as a `Store`: `await ArchiveStore.open(path)` or `ArchiveStore.create(path)`.

    A store opened for reading serves manifests and blobs and never changes the file. A store
    from `create` accepts `put_blob` / `put_manifest` / `put_member` and also answers
    `head_*`, `get_manifest`, `open_blob`, `tags` and `images` about what it has written so far.
    Blobs are global: the repository argument of the blob methods is ignored.
    """

    #: Blobs are hashed here only when the stream is not already a VerifiedStream (see `Store`).
    verifies_digests = False

    def __init__(self, path: Path, format: ArchiveFormat) -> None:
        """Use `open` or `create`."""
        self.path = path
        #: "oci" or "docker": what was found (reading) or what is written.
        self.format: ArchiveFormat = format
        self._data_path = path
        self._tar: _TarIndex | None = None
        self._blobs: dict[Digest, _Member] = {}
        self._media_types: dict[Digest, str] = {}
        self._names: dict[Reference, Descriptor] = {}
        self._listed: dict[Reference, None] = {}
        self._manifests: dict[Digest, Manifest] = {}
        self._docker_images: list[_DockerImage] = []
        self._docker_names: dict[Reference, _DockerImage] = {}
        self._docker_done = False
        self._member_digests: dict[int, Digest] = {}
        self._synth_lock = asyncio.Lock()
        self._parsed: OrderedDict[tuple[Digest, str | None], tuple[asyncio.Future[Manifest], int]]
        self._parsed = OrderedDict()
        self._parsed_bytes = 0
        self._writer: _Writer | None = None
        self._closed = False

    # ---- construction ------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> ArchiveStore:
        """Index the archive at `path` for reading (headers only; the data is not read).

        Raises `StoreError` naming the file (and member) when it is not a tar, is truncated or
        damaged, is hostile (absurd member counts or header sizes), or is neither an OCI
        layout tar nor a `docker save` tar.
        """
        store = cls(Path(path), "oci")
        await asyncio.to_thread(store._load)
        return store

    @classmethod
    def create(cls, path: str | os.PathLike[str], format: ArchiveFormat = "oci", *,
               platform: Platform | None = None,
               keep_at: Path | None = None) -> ArchiveStore:
        """Start writing an archive that will appear at `path` when `close()` succeeds.

        `format="oci"` writes an OCI image layout tar (what `ctr image import`,
        `microk8s images import`, `skopeo … oci-archive:` and gapkit read); names go into
        both `io.containerd.image.name` and `org.opencontainers.image.ref.name` as the full
        reference. `format="docker"` writes a `docker save` tar (`manifest.json` +
        `repositories`, blobs under `blobs/sha256/`, layers exactly as given, gzip or not,
        which `docker load`, `ctr image import` and `skopeo … docker-archive:` accept); it
        holds one platform per name, chosen with `platform` (default: this host's), see
        `put_manifest`.

        `keep_at` (a new file's path) writes the archive there instead of next to `path` and
        keeps it when the archive is not finished (an error, `abort`, a kill): a resume point
        whose whole blobs `scan_blobs` finds. It is locked (`flock`) while being written, and
        moved onto `path` by `close()` (copied, when on another filesystem).
        """
        if format not in FORMATS:
            raise UsageError(f"archive format {format!r} is not one of {', '.join(FORMATS)}")
        target = Path(path)
        store = cls(target, format)
        remove_dead_temps(target.parent, target.name)
        temp = keep_at or temp_path(target)
        try:
            # O_EXCL: never reuse a file; 0o666 & umask, as a plain `open` would create it.
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise StoreError(f"cannot write {temp}: {exc.strerror or exc}",
                             hint="check that the folder exists and is writable") from None
        if keep_at is not None:
            with contextlib.suppress(OSError):  # a new file: nobody else holds it
                fcntl.flock(fd, fcntl.LOCK_EX)
        file = os.fdopen(fd, "w+b")
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gapkit-archive")
        syncer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gapkit-archive-sync")
        finalizer = weakref.finalize(store, _discard_temp, file, temp, (executor, syncer),
                                     keep_at is not None)
        store._writer = _Writer(temp, file, executor, syncer, platform or Platform.host(),
                                finalizer)
        store._data_path = temp
        # Directories first, like other image tools; oci-layout first so a sniffer finds it.
        prefix = b"".join(_header(d, 0, directory=True) for d in ("blobs/", "blobs/sha256/"))
        if format == "oci":
            prefix = (_header("oci-layout", len(OCI_LAYOUT_VERSION))
                      + _padded(OCI_LAYOUT_VERSION) + prefix)
        file.write(prefix)
        store._writer.position = len(prefix)
        return store

    async def __aenter__(self) -> ArchiveStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None and self._writer is not None:
            await self.abort()
        else:
            await self.close()

    # ---- reading: load -----------------------------------------------------------------

    def _load(self) -> None:
        tar = _walk(self.path)
        self._tar = tar
        entries = tar.entries
        if "index.json" in entries and ("oci-layout" in entries or "manifest.json" not in entries):
            self.format = "oci"
            self._load_oci(tar)
        elif "manifest.json" in entries:
            self.format = "docker"
            self._load_docker(tar)
        else:
            raise StoreError(
                f"{self.path} is a tar, but not an image archive: it has neither index.json "
                "(an OCI layout) nor manifest.json (a `docker save` tar)",
                hint="write it with `skopeo copy … oci-archive:FILE`, `ctr image export`, "
                "`docker save` or gapkit")

    def _index_blobs(self, tar: _TarIndex) -> None:
        for name in tar.entries:
            match = _BLOB_PATH.match(name)
            if not match:
                continue
            try:
                digest = Digest.parse(f"{match[1]}:{match[2]}")
                self._blobs[digest] = tar.resolve(name, f"blob {match[1]}:{match[2]}")
            except (InvalidReference, StoreError):
                continue  # not a digest, or a link gapkit will not follow: never used

    def _read_metadata(self, member: _Member, limit: int = MAX_METADATA_SIZE) -> bytes:
        if member.size > limit:
            raise StoreError(
                f"{self.path}: member {member.name!r} is {member.size} bytes, larger than any "
                "real one; refusing it", hint="the archive is hostile or broken")
        return _pread_exact(self._data_path, member.offset, member.size)

    def _load_oci(self, tar: _TarIndex) -> None:
        self._index_blobs(tar)
        member = tar.resolve("index.json", "the layout")
        where = f"{self.path}: member index.json"
        try:
            index = Manifest.parse(self._read_metadata(member), None, where)
        except ManifestError as exc:
            raise StoreError(exc.message, hint=_DAMAGED) from None
        if not index.is_index:
            raise StoreError(f"{where} is not an image index", hint=_DAMAGED)
        self._collect_names(index.manifests, 0, set())

    def _collect_names(self, descriptors: tuple[Descriptor, ...], depth: int,
                       seen: set[Digest]) -> None:
        """Names from index entries, looking into each nameless nested index once (`seen`)."""
        for desc in descriptors:
            if desc.media_type:
                self._media_types.setdefault(desc.digest, desc.media_type)
            matches = entry_names(desc.annotations)
            listed = matches[0] if matches else None
            plain = Descriptor(desc.media_type, desc.digest, desc.size)
            for ref in matches:
                self._names.setdefault(ref, plain)
            if listed is not None:
                self._listed[listed] = None
            member = self._blobs.get(desc.digest)
            if (matches or desc.media_type not in INDEX_MEDIA_TYPES or member is None
                    or depth >= MAX_INDEX_DEPTH or member.size > MAX_MANIFEST_SIZE
                    or desc.digest in seen):
                continue
            seen.add(desc.digest)
            # A nameless nested index: the names may be on its entries.
            try:
                nested = Manifest.parse(self._read_metadata(member), desc.media_type,
                                        f"{self.path}: member {member.name}", desc.digest)
            except ManifestError:
                continue
            self._collect_names(nested.manifests, depth + 1, seen)

    def _load_docker(self, tar: _TarIndex) -> None:
        self._index_blobs(tar)  # Docker 25+ tars keep blobs/sha256/ even without oci-layout
        where = f"{self.path}: member manifest.json"
        raw = self._read_metadata(tar.resolve("manifest.json", "the archive"))
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise StoreError(f"{where} nests JSON arrays or objects too deep to read",
                             hint="the archive is hostile or broken") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{where} is not valid JSON: {exc}", hint=_DAMAGED) from None
        if not isinstance(doc, list):
            raise StoreError(f"{where} is not a list of images", hint=_DAMAGED)
        for position, item in enumerate(doc):
            if not isinstance(item, dict):
                raise StoreError(f"{where}: entry {position} is not a JSON object", hint=_DAMAGED)
            config_path = item.get("Config")
            layer_paths = item.get("Layers")
            if not isinstance(config_path, str) or not isinstance(layer_paths, list):
                raise StoreError(f"{where}: entry {position} has no Config or Layers",
                                 hint=_DAMAGED)
            config = self._docker_member(tar, config_path, f"manifest.json entry {position}")
            layers = tuple(self._docker_member(tar, p, f"manifest.json entry {position}")
                           for p in layer_paths)
            image = _DockerImage(position, config, layers)
            self._docker_images.append(image)
            for tag in item.get("RepoTags") or ():
                try:
                    ref = Reference.parse(str(tag))
                except InvalidReference:
                    continue
                if ref.digest is None and ref not in self._docker_names:
                    self._docker_names[ref] = image
                    self._listed[ref] = None

    def _docker_member(self, tar: _TarIndex, path: Any, what: str) -> _Member:
        name = _normalise(path) if isinstance(path, str) else None
        if name is None:
            raise StoreError(
                f"{self.path}: {what} refers to {path!r}, a path outside the archive; "
                "refusing it", hint="the archive is hostile or broken")
        return tar.resolve(name, what)

    # ---- reading: docker save ----------------------------------------------------------

    async def _member_digest(self, member: _Member) -> Digest:
        digest = self._member_digests.get(member.offset)
        if digest is None:
            digest = await asyncio.to_thread(_hash_range, self._data_path, member.offset,
                                             member.size)
            self._member_digests[member.offset] = digest
        return digest

    async def _synthesise(self, image: _DockerImage) -> Manifest:
        """The Docker schema 2 manifest a registry would serve for a `docker save` entry."""
        async with self._synth_lock:
            if image.manifest is not None:
                return image.manifest
            config = await self._member_digest(image.config)
            layers = []
            for member in image.layers:
                digest = await self._member_digest(member)
                head = await asyncio.to_thread(
                    _pread_exact, self._data_path, member.offset, min(4, member.size))
                layers.append((member, digest, _layer_type(head)))
            doc = {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "size": image.config.size,
                           "digest": str(config)},
                "layers": [{"mediaType": media_type, "size": member.size, "digest": str(digest)}
                           for member, digest, media_type in layers],
            }
            raw = json.dumps(doc, separators=(",", ":")).encode()
            manifest = Manifest.parse(raw, DOCKER_MANIFEST,
                                      f"{self.path}: manifest.json entry {image.position}")
            self._blobs.setdefault(config, image.config)
            for member, digest, _ in layers:
                self._blobs.setdefault(digest, member)
            self._manifests.setdefault(manifest.digest, manifest)
            image.manifest = manifest
            return manifest

    async def _synthesise_all(self) -> None:
        if self.format == "docker" and self._writer is None and not self._docker_done:
            for image in self._docker_images:
                await self._synthesise(image)
            self._docker_done = True

    # ---- Store: manifests --------------------------------------------------------------

    async def get_manifest(self, ref: Reference) -> Manifest:
        self._check_open()
        if ref.digest is not None:
            return await self._manifest_by_digest(ref)
        if self._writer is not None:
            digest = (self._writer.docker_tags.get(ref) if self.format == "docker"
                      else (self._names[ref].digest if ref in self._names else None))
            if digest is None:
                raise self._not_found(ref)
            return self._manifests[digest]
        if self.format == "docker":
            image = self._docker_names.get(ref)
            if image is None:
                raise self._not_found(ref)
            return await self._synthesise(image)
        named = self._names.get(ref)
        if named is None:
            raise self._not_found(ref)
        member = self._blobs.get(named.digest)
        if member is None:
            raise StoreError(
                f"{self.path}: index.json names {ref} as {named.digest}, but the archive has "
                f"no member blobs/{named.digest.algorithm}/{named.digest.hex}", hint=_DAMAGED)
        if member.size != named.size:
            raise StoreError(
                f"{self.path}: member {member.name!r} is {member.size} bytes, but index.json "
                f"declares {named.size} for {ref}", hint=_DAMAGED)
        return await self._read_manifest(member, named.digest, named.media_type)

    async def _manifest_by_digest(self, ref: Reference) -> Manifest:
        assert ref.digest is not None
        digest = ref.digest
        await self._synthesise_all()
        known = self._manifests.get(digest)
        if known is not None:
            return known
        member = self._blobs.get(digest) if self.format == "oci" else None
        if member is None:
            raise self._not_found(ref)
        return await self._read_manifest(member, digest, self._media_types.get(digest))

    async def _read_manifest(self, member: _Member, digest: Digest,
                             media_type: str | None) -> Manifest:
        """The manifest in `member`, parsed once while it stays in the cache (concurrent
        readers share one parse; an error is the same error for each of them)."""
        key = (digest, media_type or None)
        cached = self._parsed.get(key)
        if cached is not None:
            self._parsed.move_to_end(key)
            return await asyncio.shield(cached[0])
        parsing = asyncio.ensure_future(self._parse_manifest(member, digest, media_type))
        size = min(member.size, MAX_MANIFEST_SIZE)
        self._parsed[key] = (parsing, size)
        self._parsed_bytes += size
        while self._parsed_bytes > MANIFEST_CACHE_BYTES and len(self._parsed) > 1:
            _, (_, dropped) = self._parsed.popitem(last=False)
            self._parsed_bytes -= dropped
        return await asyncio.shield(parsing)

    async def _parse_manifest(self, member: _Member, digest: Digest,
                              media_type: str | None) -> Manifest:
        where = f"{self.path}: member {member.name}"
        if member.size > MAX_MANIFEST_SIZE:
            raise ManifestError(f"{where} is {member.size} bytes: it is not a manifest")
        raw = await asyncio.to_thread(_pread_exact, self._data_path, member.offset, member.size)
        manifest = Manifest.parse(raw, media_type or None, where, expected=digest)
        for child in manifest.manifests:
            if child.media_type:
                self._media_types.setdefault(child.digest, child.media_type)
        return manifest

    async def head_manifest(self, ref: Reference) -> Descriptor | None:
        try:
            manifest = await self.get_manifest(ref)
        except NotFound:
            return None
        return manifest.descriptor()

    async def put_manifest(self, ref: Reference, manifest: Manifest) -> None:
        """Store `manifest`; with a tag, name it `ref`.

        Format "oci": the manifest is written as a blob (also for a digest-only `ref`, as the
        platform manifests of an index are), and a tag becomes an `index.json` entry.

        Format "docker": a `docker save` tar has no manifests, only one config + layers per
        image, so manifests are kept in memory until a tag names one. A tagged index resolves
        to one of its platform manifests put before it (digest-only) with all their blobs:
        the one for the store's `platform` (the host's by default) if present, else the only
        one present; several others and none matching is an error. Config and layers must be
        in the archive already.
        """
        writer = self._require_writer()
        if ref.digest is not None and ref.digest != manifest.digest:
            raise ManifestError(
                f"{ref} does not match the manifest given for it, which is {manifest.digest}")
        async with writer.lock:
            self._check_writable(writer)
            if self.format == "oci":
                if manifest.digest not in self._blobs:
                    member = await self._write_member(
                        _blob_name(manifest.digest), len(manifest.raw), _single(manifest.raw))
                    self._blobs[manifest.digest] = member
                self._manifests[manifest.digest] = manifest
                if ref.tag is not None:
                    name = Reference(ref.repository, ref.tag)
                    self._names[name] = manifest.descriptor()
                    self._listed[name] = None
                return
            self._manifests[manifest.digest] = manifest
            if ref.tag is None:
                return
            name = Reference(ref.repository, ref.tag)
            image = self._docker_image_for(name, manifest, writer.platform)
            writer.docker_tags[name] = image.digest
            self._listed[name] = None

    def _docker_image_for(self, name: Reference, manifest: Manifest,
                          platform: Platform) -> Manifest:
        if manifest.is_index:
            candidates = [self._manifests[d.digest] for d in manifest.manifests
                          if d.digest in self._manifests
                          and not self._manifests[d.digest].is_index
                          and self._missing_blobs(self._manifests[d.digest]) == []]
            platforms = {m.digest: d.platform for d in manifest.manifests
                         for m in candidates if m.digest == d.digest}
            preferred = [m for m in candidates if platforms.get(m.digest) == platform]
            if preferred:
                return self._check_docker_image(name, preferred[0])
            if len(candidates) == 1:
                return self._check_docker_image(name, candidates[0])
            if not candidates:
                raise StoreError(
                    f"cannot name {name} in docker archive {self.path}: none of the platform "
                    f"manifests of index {manifest.digest} was stored (with its blobs) first",
                    hint="copy the platform's manifest and blobs before the index")
            found = ", ".join(str(platforms.get(m.digest)) for m in candidates)
            raise StoreError(
                f"cannot name {name} in docker archive {self.path}: it holds one platform per "
                f"image, and index {manifest.digest} has {found} but not {platform}",
                hint="choose one with ArchiveStore.create(..., platform=...) or write an OCI "
                "archive, which keeps every platform")
        return self._check_docker_image(name, manifest)

    def _missing_blobs(self, manifest: Manifest) -> list[Descriptor]:
        return [d for d in manifest.blobs if d.digest not in self._blobs]

    def _check_docker_image(self, name: Reference, manifest: Manifest) -> Manifest:
        config = manifest.config
        assert config is not None
        if config.media_type not in (DOCKER_CONFIG, OCI_CONFIG):
            raise StoreError(
                f"cannot write {name} into docker archive {self.path}: its config is "
                f"{config.media_type!r}, not a container image's",
                hint="write an OCI archive for artifacts that are not container images")
        for layer in manifest.layers:
            if layer.is_foreign or layer.media_type not in (
                    DOCKER_LAYER, DOCKER_LAYER_GZIP, OCI_LAYER, OCI_LAYER_GZIP):
                raise StoreError(
                    f"cannot write {name} into docker archive {self.path}: layer {layer.digest} "
                    f"is {layer.media_type!r}, which `docker load` does not take",
                    hint="write an OCI archive (format 'oci') instead")
        missing = self._missing_blobs(manifest)
        if missing:
            raise StoreError(
                f"cannot name {name} in docker archive {self.path}: blob {missing[0].digest} "
                "of its manifest was not put first", hint="put blobs before their manifest")
        return manifest

    # ---- Store: blobs ------------------------------------------------------------------

    async def _find_blob(self, digest: Digest) -> _Member | None:
        member = self._blobs.get(digest)
        if member is None and self.format == "docker" and self._writer is None:
            await self._synthesise_all()
            member = self._blobs.get(digest)
        return member

    async def head_blob(self, repository: Repository, digest: Digest) -> int | None:
        self._check_open()
        member = await self._find_blob(digest)
        return None if member is None else member.size

    async def open_blob(self, repository: Repository, descriptor: Descriptor,
                        offset: int = 0) -> AsyncIterator[bytes]:
        self._check_open()
        member = await self._find_blob(descriptor.digest)
        if member is None:
            digest = descriptor.digest
            raise NotFound(
                f"{self.path} has no blob {digest} (no member blobs/{digest.algorithm}/"
                f"{digest.hex})", hint="the archive does not hold this image or platform")
        if member.size != descriptor.size:
            raise StoreError(
                f"{self.path}: member {member.name!r} is {member.size} bytes, but blob "
                f"{descriptor.digest} should be {descriptor.size}", hint=_DAMAGED)
        if not 0 <= offset <= member.size:
            raise StoreError(f"offset {offset} is outside blob {descriptor.digest} "
                             f"({member.size} bytes) in {self.path}")
        async for chunk in self._stream(member, offset):
            yield chunk

    async def blob_location(self, digest: Digest) -> tuple[Path, int, int] | None:
        """(file, offset, size) of a blob's bytes in the archive, for `sendfile`; reading only."""
        self._check_open()
        if self._writer is not None:
            return None
        member = await self._find_blob(digest)
        return None if member is None else (self._data_path, member.offset, member.size)

    async def put_blob(self, repository: Repository, descriptor: Descriptor,
                       chunks: AsyncIterator[bytes]) -> None:
        """Write the blob as member `blobs/<alg>/<hex>`; a blob already written is skipped.

        Several puts run at once, each into a region reserved for it (see the module's
        docstring). The digest and size are checked while streaming (unless `chunks` is a
        `VerifiedStream`, which checks itself). If the stream fails, the blob is not in the
        archive: its region is cut off when it is the last one, else kept for the next put of
        the same blob (or, at `close()`, renamed `gapkit/unused/…`).
        """
        writer = self._require_writer()
        key = (descriptor.digest, descriptor.size)
        while True:
            async with writer.lock:
                self._check_writable(writer)
                if descriptor.digest in self._blobs:
                    return
                region = writer.regions.get(key)
                if region is None:
                    region = await self._reserve(writer, descriptor)
                    break
                if not region.busy:
                    region.busy = True
                    region.idle.clear()
                    break
                idle = region.idle
            await idle.wait()
        check = None if isinstance(chunks, VerifiedStream) else descriptor
        try:
            await self._fill(writer, region, chunks, check)
            await self._io(_pwrite, writer.file.fileno(),
                           _header(_blob_name(region.digest), region.size), region.start)
        except BaseException:
            self._release(writer, key, region)
            closer = getattr(chunks, "aclose", None)
            if closer is not None:  # we stopped reading it: let its source go now, not at GC
                with contextlib.suppress(Exception):
                    await closer()
            raise
        del writer.regions[key]
        region.idle.set()
        self._blobs[region.digest] = _Member(_blob_name(region.digest), region.data, region.size)
        writer.unsynced += region.size
        await self._write_back(writer)

    async def _reserve(self, writer: _Writer, descriptor: Descriptor) -> _Region:
        """Room for the blob at the end of the archive, under a pending name (writer.lock held)."""
        header = _header(_pending_name(descriptor.digest), descriptor.size)
        if len(header) != len(_header(_blob_name(descriptor.digest), descriptor.size)):
            raise StoreError(f"cannot write blob {descriptor.digest}: its name is too long")
        region = _Region(descriptor.digest, descriptor.size, writer.position, len(header))
        writer.regions[(descriptor.digest, descriptor.size)] = region
        writer.position = region.end
        try:
            await self._io(_reserve_range, writer.file, region.start, header, region.end)
        except BaseException:
            self._release(writer, (descriptor.digest, descriptor.size), region)
            raise
        return region

    async def _fill(self, writer: _Writer, region: _Region, chunks: AsyncIterator[bytes],
                    check: Descriptor | None) -> None:
        name = _blob_name(region.digest)
        where = f"the stream for {name} in {self.path}"
        hasher = check.digest.hasher() if check is not None else None

        def wrong(detail: str) -> GapkitError:
            return DigestMismatch(str(region.digest), detail, where)

        fd = writer.file.fileno()
        received = 0
        async for chunk in chunks:
            if not chunk:
                continue
            if received + len(chunk) > region.size:
                raise wrong(f"it is longer than the {region.size} bytes its descriptor declares")
            await self._io(_pwrite, fd, chunk, region.data + received, hasher)
            received += len(chunk)
        if received != region.size:
            raise wrong(f"it is {received} bytes where its descriptor declares {region.size}")
        if hasher is not None:
            actual = f"{region.digest.algorithm}:{hasher.hexdigest()}"
            if actual != str(region.digest):
                raise DigestMismatch(str(region.digest), actual, where)

    def _release(self, writer: _Writer, key: tuple[Digest, int], region: _Region) -> None:
        """After a failed fill: cut the region off if it is the last one, else keep it (its
        header still says pending) for the next put of the blob. Synchronous, so a cancelled
        put still runs all of it."""
        region.busy = False
        region.idle.set()
        if region.end == writer.position:
            del writer.regions[key]
            writer.position = region.start
            self._rollback(writer, region.start)

    # ---- Store: names ------------------------------------------------------------------

    async def tags(self, repository: Repository) -> list[str]:
        self._check_open()
        return sorted({ref.tag for ref in self._listed
                       if ref.repository == repository and ref.tag is not None})

    async def images(self) -> list[Reference]:
        """Every named image as `name:tag@digest` (as the layout store lists them), by name.

        For a `docker save` tar this synthesises every manifest, hashing every layer once.
        """
        self._check_open()
        out = []
        for ref in sorted(self._listed, key=str):
            digest = await self._named_digest(ref)
            out.append(ref if digest is None else ref.with_digest(digest))
        return out

    async def _named_digest(self, ref: Reference) -> Digest | None:
        if self._writer is not None and self.format == "docker":
            return self._writer.docker_tags.get(ref)
        if self.format == "docker":
            image = self._docker_names.get(ref)
            return None if image is None else (await self._synthesise(image)).digest
        named = self._names.get(ref)
        return None if named is None else named.digest

    # ---- other members (a bundle's gapkit/ folder) -------------------------------------

    def structural_problems(self) -> list[str]:
        """What an image tool never writes: unsafe paths, links, members written twice.

        Such members are never used to serve content, but a gapkit bundle has none of them,
        so bundle commands refuse an archive that has any.
        """
        assert self._tar is not None, "only for archives opened for reading"
        tar = self._tar
        problems = [f"member {name!r} has an unsafe path (absolute or with '..')"
                    for name in tar.unsafe]
        problems += [f"member {name!r} is a {entry.kind} to {entry.link!r}"
                     for name, entry in sorted(tar.entries.items()) if entry.kind != "file"]
        problems += [f"member {name!r} appears more than once" for name in tar.duplicates]
        return problems

    def member_names(self) -> list[str]:
        """Names of the archive's regular members (and links), as normalised paths."""
        if self._writer is not None:
            return sorted(self._writer.extra_members)
        assert self._tar is not None
        return sorted(self._tar.entries)

    async def member_size(self, name: str) -> int | None:
        member = self._extra_member(name)
        return None if member is None else member.size

    async def open_member(self, name: str) -> AsyncIterator[bytes]:
        """Stream the bytes of member `name` (for example `gapkit/bundle.json`)."""
        member = self._extra_member(name)
        if member is None:
            raise NotFound(f"{self.path} has no member {name!r}")
        async for chunk in self._stream(member):
            yield chunk

    async def _stream(self, member: _Member, offset: int = 0) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self._data_path, os.O_RDONLY)
        try:
            pos, end = member.offset + offset, member.offset + member.size
            while pos < end:
                chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK_SIZE, end - pos), pos)
                if not chunk:
                    raise StoreError(
                        f"{self.path} ended inside member {member.name!r}: the file changed "
                        "or was truncated while open", hint=_DAMAGED)
                pos += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def read_member(self, name: str, limit: int) -> bytes:
        """The bytes of member `name`, refused before reading when it is over `limit` bytes."""
        member = self._extra_member(name)
        if member is None:
            raise NotFound(f"{self.path} has no member {name!r}")
        if member.size > limit:
            raise StoreError(
                f"{self.path}: member {member.name!r} is {member.size} bytes, more than the "
                f"{limit} gapkit reads of it; refusing it", hint="the archive is hostile or broken")
        return await asyncio.to_thread(_pread_exact, self._data_path, member.offset, member.size)

    def member_location(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, size) of member `name`'s bytes, for hashing or sendfile; reading only."""
        if self._writer is not None:
            return None
        member = self._extra_member(name)
        return None if member is None else (self._data_path, member.offset, member.size)

    def _extra_member(self, name: str) -> _Member | None:
        self._check_open()
        normal = _normalise(name)
        if normal is None:
            raise UsageError(f"{name!r} is not a member path gapkit uses (absolute or with '..')")
        if self._writer is not None:
            return self._writer.extra_members.get(normal)
        assert self._tar is not None
        if normal not in self._tar.entries:
            return None
        return self._tar.resolve(normal, f"member {normal!r}")

    async def put_member(self, name: str, size: int, chunks: AsyncIterator[bytes]) -> None:
        """Write a member of gapkit's own (`gapkit/bundle.json`, `gapkit/snaps/…`): `size` bytes.

        The name must be a relative path outside the layout's own names (`blobs/`,
        `index.json`, `oci-layout`, `manifest.json`, `repositories`) and not written before.
        """
        writer = self._require_writer()
        normal = _normalise(name)
        if normal is None or normal in _RESERVED or normal.split("/")[0] == "blobs":
            raise UsageError(f"{name!r} cannot be a member of gapkit's own in an image archive",
                             hint="use a relative path under gapkit/")
        async with writer.lock:
            self._check_writable(writer)
            if normal in writer.extra_members:
                raise StoreError(f"member {normal!r} was already written to {self.path}")
            writer.extra_members[normal] = await self._write_member(normal, size, chunks)

    # ---- writing -----------------------------------------------------------------------

    def _require_writer(self) -> _Writer:
        if self._writer is None:
            raise StoreError(f"archive {self.path} was opened for reading; it cannot be changed",
                             hint="create a new archive with ArchiveStore.create")
        return self._writer

    def _check_writable(self, writer: _Writer) -> None:
        if self._closed:
            raise StoreError(f"archive {self.path} is already closed")
        if writer.broken is not None:
            raise StoreError(f"archive {self.path} cannot be finished: {writer.broken}",
                             hint="abort it and write it again")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"archive {self.path} is closed")

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the writer's one thread: file operations happen in submission order."""
        writer = self._writer
        assert writer is not None
        if self._closed:
            raise StoreError(f"archive {self.path} was closed or aborted while being written")
        try:
            return await asyncio.wrap_future(writer.executor.submit(fn, *args))
        except OSError as exc:  # a full disk, a read-only or vanished folder: the user's to fix
            where = "" if writer.temp.parent == self.path.parent else (
                f" (it is written as {writer.temp} until complete)")
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}{where}",
                             hint="check the free space and the permissions there") from exc

    async def _write_member(self, name: str, size: int, chunks: AsyncIterator[bytes]) -> _Member:
        """Append one member of `size` bytes (manifests, indexes, gapkit's own files; blobs go
        through `put_blob`); on any failure cut the file back to where it was."""
        writer = self._writer
        assert writer is not None
        start = writer.position
        header = _header(name, size)

        def wrong(detail: str) -> GapkitError:
            return StoreError(f"cannot write member {name!r} to {self.path}: {detail}")

        received = 0
        iterator = aiter(chunks)
        try:
            await self._io(_write_at, writer.file, start, header)
            async for chunk in iterator:
                if not chunk:
                    continue
                received += len(chunk)
                if received > size:
                    raise wrong(f"it is longer than the {size} bytes its descriptor declares")
                await self._io(writer.file.write, chunk)
            if received != size:
                raise wrong(f"it is {received} bytes where its descriptor declares {size}")
            await self._io(writer.file.write, b"\0" * (-size % _BLOCK))
            await self._io(writer.file.flush)
        except BaseException:
            self._rollback(writer, start)
            closer = getattr(iterator, "aclose", None)
            if closer is not None:  # we stopped reading it: let its source go now, not at GC
                with contextlib.suppress(Exception):
                    await closer()
            raise
        writer.position = start + len(header) + size + (-size % _BLOCK)
        writer.unsynced += size
        await self._write_back(writer)
        return _Member(name, start + len(header), size)

    async def _write_back(self, writer: _Writer, wait: bool = False) -> None:
        """Start an fdatasync every `WRITE_BACK_STEP` bytes, so the disk writes the archive
        while it is still being fetched and the fsync of `close()` has only the last part left
        to wait for. It runs on a thread of its own: writes go on meanwhile. `wait`: wait for
        the one in flight. A failed one is reported here, at the latest by `close()`."""
        running = writer.write_back
        if running is not None and (wait or running.done()):
            writer.write_back = None
            try:
                await asyncio.wrap_future(running)
            except OSError as exc:
                raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}",
                                 hint="check the free space and the disk there") from exc
        if writer.unsynced >= WRITE_BACK_STEP and writer.write_back is None and not wait:
            writer.unsynced = 0
            writer.write_back = writer.syncer.submit(os.fdatasync, writer.file.fileno())

    def _rollback(self, writer: _Writer, start: int) -> None:
        """Cut the temp file back to `start`. Queued on the writer thread, so it runs after
        any write still in flight (even when the caller was cancelled) and before later ones."""
        def cut() -> None:
            try:
                writer.file.seek(start)
                writer.file.truncate(start)
                writer.file.flush()
            except (OSError, ValueError) as exc:
                writer.broken = f"a failed member could not be removed ({exc})"

        try:
            writer.executor.submit(cut)
        except RuntimeError:  # executor already shut down: the store is being discarded
            writer.broken = "the archive was closed while a blob was being written"

    async def close(self) -> None:
        """Reading: release the archive. Writing: write the index, fsync, rename onto `path`.

        If finishing fails, the temporary file is removed and nothing appears at `path`.
        """
        writer = self._writer
        if writer is None or self._closed:
            self._closed = True
            return
        async with writer.lock:
            if self._closed:
                return
            try:
                while busy := [r.idle for r in writer.regions.values() if r.busy]:
                    await asyncio.wait([asyncio.ensure_future(e.wait()) for e in busy])
                await self._io(_noop)  # everything queued (rollbacks too) has run
                self._check_writable(writer)
                for region in writer.regions.values():  # failed and never put again
                    await self._io(_pwrite, writer.file.fileno(), _header(
                        f"gapkit/unused/{region.start}", region.size), region.start)
                writer.regions.clear()
                for name, data in self._index_members(writer):
                    await self._write_member(name, len(data), _single(data))
                await self._write_back(writer, wait=True)
                await self._io(_finish, writer.file, writer.position, writer.temp, self.path)
            except BaseException:
                await self._discard(writer)
                raise
            writer.finalizer.detach()
            writer.executor.shutdown(wait=True)
            writer.syncer.shutdown(wait=True)
            self._closed = True

    async def abort(self) -> None:
        """Give up writing: remove the temporary file; nothing appears at `path`."""
        writer = self._writer
        if writer is None or self._closed:
            self._closed = True
            return
        await self._discard(writer)

    async def _discard(self, writer: _Writer) -> None:
        self._closed = True
        writer.executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(writer.executor.shutdown, wait=True)
        await asyncio.to_thread(writer.syncer.shutdown, wait=True)
        writer.finalizer()  # closes and removes the temp file, once

    def _index_members(self, writer: _Writer) -> list[tuple[str, bytes]]:
        if self.format == "oci":
            entries = [dict(desc.to_json(), annotations=naming_annotations(ref))
                       for ref, desc in self._names.items()]
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
            return [("index.json", json.dumps(index, separators=(",", ":")).encode())]
        by_image: dict[Digest, list[Reference]] = {}
        for ref, digest in writer.docker_tags.items():
            by_image.setdefault(digest, []).append(ref)
        items: list[dict[str, Any]] = []
        repositories: dict[str, dict[str, str]] = {}
        for digest, refs in by_image.items():
            manifest = self._manifests[digest]
            assert manifest.config is not None
            items.append({
                "Config": _blob_name(manifest.config.digest),
                "RepoTags": [ref.familiar() for ref in refs],
                "Layers": [_blob_name(layer.digest) for layer in manifest.layers],
            })
            for ref in refs:
                assert ref.tag is not None
                repo = ref.with_tag(None).familiar()
                repositories.setdefault(repo, {})[ref.tag] = manifest.config.digest.hex
        return [("manifest.json", json.dumps(items, separators=(",", ":")).encode()),
                ("repositories", json.dumps(repositories, separators=(",", ":")).encode())]

    def _not_found(self, ref: Reference) -> NotFound:
        return NotFound(f"{self.path} has no image {ref}",
                        hint="list what it holds with `gapkit bundle inspect` or "
                        "`skopeo inspect oci-archive:FILE`")


# --------------------------------------------------------------------------------------------
# Tar writing helpers (run on the writer's thread)


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _pending_name(digest: Digest) -> str:
    """A blob's member name while its region is being filled (its header is the same size as
    the final one's: both fit tar's 100-character name field, or both need one pax block)."""
    return f"gapkit/pending/{digest.algorithm}/{digest.hex}"


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0  # reproducible archives: the same images give the same bytes
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % _BLOCK)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _noop() -> None:
    return None


def _write_at(file: Any, position: int, data: bytes) -> None:
    file.seek(position)
    file.write(data)


def _pwrite(fd: int, data: bytes, position: int, hasher: Any = None) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written
    if hasher is not None:
        hasher.update(data)


def _reserve_range(file: Any, start: int, header: bytes, end: int) -> None:
    """Write a blob region's header and make the file reach the region's end (a hole until
    the data is written), so a reader of a partial file can walk past it."""
    file.flush()
    _pwrite(file.fileno(), header, start)
    if os.fstat(file.fileno()).st_size < end:
        os.ftruncate(file.fileno(), end)


def _finish(file: Any, end: int, temp: Path, target: Path) -> None:
    """End-of-archive blocks, padding to a whole record, fsync, rename, fsync the folder.

    Once the rename is done the archive is committed: a failing folder fsync is not reported
    as a failed close (the file is complete; only its name might not survive a power loss).
    A file on another filesystem than the target (a resume point in a cache) is copied next to
    the target first, then renamed.
    """
    trailer = 2 * _BLOCK
    trailer += -(end + trailer) % _RECORD
    file.seek(end)
    file.write(b"\0" * trailer)
    file.truncate()
    file.flush()
    os.fsync(file.fileno())
    try:
        os.replace(temp, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(file, target)
        file.close()
        temp.unlink()
    else:
        file.close()
    with contextlib.suppress(OSError):
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _copy_across(file: Any, target: Path) -> None:
    """Copy the finished archive open as `file` onto `target` of another filesystem: a temp
    file next to it, fsynced and renamed."""
    size = os.fstat(file.fileno()).st_size
    temp = temp_path(target)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        copied = 0
        with contextlib.suppress(OSError):  # refused across some filesystems: copied below
            while copied < size:
                n = os.copy_file_range(file.fileno(), fd, size - copied, copied, copied)
                if n == 0:
                    break
                copied += n
        while copied < size:
            chunk = os.pread(file.fileno(), min(CHUNK_SIZE, size - copied), copied)
            if not chunk:
                raise OSError(errno.EIO, f"{file.name} ended after {copied} of {size} bytes")
            _pwrite(fd, chunk, copied)
            copied += len(chunk)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def _discard_temp(file: Any, temp: Path,
                  executors: tuple[concurrent.futures.ThreadPoolExecutor, ...], keep: bool) -> None:
    for executor in executors:
        executor.shutdown(wait=False, cancel_futures=True)
    with contextlib.suppress(OSError, ValueError):
        file.close()
    if not keep:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
