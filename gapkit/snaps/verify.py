"""Check a snap file against its assertion: `snap-size` and `snap-sha3-384`.

What gapkit checks is the content: the `.snap` must be exactly the bytes the `snap-revision`
assertion names (its size and SHA3-384), and the assertion's `snap-declaration` must be for the
snap we mean. What gapkit does not check is who signed the assertions: snapd verifies their
signatures against its trusted root keys when a node runs `snap ack <name>.assert`, and refuses
`snap install` of a snap whose assertion it has not acknowledged. Together the two give the chain
store → assertion → file, with gapkit catching a wrong or damaged file before it crosses the gap.

Files are read once, in 1 MiB chunks into two reused buffers, so memory stays flat whatever the
snap's size; SHA3-384 (the slow one, about 360 MB/s here) runs in a helper thread while SHA-256
and the I/O run in the caller's, and hashlib releases the GIL for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gapkit.errors import SnapError
from gapkit.oci.fsutil import fsync_dir
from gapkit.snaps.assertions import SnapAssertions, sha3_384_b64, sha3_384_hex

CHUNK_SIZE = 1024 * 1024


class Readable(Protocol):
    def readinto(self, buffer: bytearray, /) -> int | None: ...


class Writable(Protocol):
    def write(self, data: memoryview, /) -> int: ...


@dataclass(frozen=True)
class Digests:
    size: int
    #: base64url without padding, as `snap-sha3-384` writes it
    sha3_384: str
    #: hex
    sha256: str


@dataclass(frozen=True, kw_only=True)
class SnapInfo:
    """A snap file checked against its assertion; what a `bundle.json` records about it."""

    name: str
    revision: int
    snap_id: str
    publisher_id: str
    #: Bytes of the .snap file (equal to the assertion's `snap-size`).
    size: int
    #: SHA3-384 of the .snap, base64url without padding, exactly as `snap-sha3-384` says.
    sha3_384: str
    #: SHA-256 of the .snap, hex.
    sha256: str
    path: Path
    assert_path: Path
    assert_size: int
    #: SHA-256 of the .assert file, hex.
    assert_sha256: str

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def assert_name(self) -> str:
        return self.assert_path.name

    @property
    def sha3_384_hex(self) -> str:
        return sha3_384_hex(self.sha3_384)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "revision": self.revision, "snap_id": self.snap_id,
            "publisher_id": self.publisher_id, "file": self.file_name, "size": self.size,
            "sha256": self.sha256, "sha3_384": self.sha3_384, "assertion": self.assert_name,
            "assertion_size": self.assert_size, "assertion_sha256": self.assert_sha256,
        }


def verify_snap(snap_path: Path, assert_path: Path, *, name: str | None = None) -> SnapInfo:
    """Check `snap_path` against the assertions in `assert_path`; return what was checked.

    `name` is the snap we expect (default: the file's name without `_<revision>.snap`); the
    assertion's snap-declaration must declare it. The snap's size must equal `snap-size` and
    its SHA3-384 `snap-sha3-384`. The file is read once (memory stays flat), also giving its
    SHA-256. Assertion signatures are not checked here: snapd checks them at `snap ack` on the
    node (see the module docstring). Any mismatch is a `SnapError` naming the file.
    """
    assertions = SnapAssertions.read(assert_path)
    expected = name or snap_name_from_file(snap_path)
    check_name(assertions, expected, snap_path)
    try:
        with open(snap_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            check_size(assertions, size, snap_path)
            digests = digest_stream(f)
    except FileNotFoundError:
        raise SnapError(f"{snap_path} does not exist", hint=download_hint(expected)) from None
    except IsADirectoryError:
        raise SnapError(f"{snap_path} is a folder, not a snap") from None
    except PermissionError as exc:
        raise SnapError(f"cannot read {snap_path}: {exc.strerror}") from None
    check_digests(assertions, digests, snap_path)
    return snap_info(assertions, digests, snap_path, assert_path)


def snap_info(assertions: SnapAssertions, digests: Digests, snap_path: Path,
              assert_path: Path) -> SnapInfo:
    raw = assert_path.read_bytes()
    return SnapInfo(
        name=assertions.name, revision=assertions.revision, snap_id=assertions.snap_id,
        publisher_id=assertions.publisher_id, size=digests.size, sha3_384=digests.sha3_384,
        sha256=digests.sha256, path=snap_path, assert_path=assert_path, assert_size=len(raw),
        assert_sha256=hashlib.sha256(raw).hexdigest())


def check_name(assertions: SnapAssertions, expected: str, snap: Path | str) -> None:
    if assertions.name != expected:
        raise SnapError(
            f"{assertions.source} is the assertion of snap {assertions.name!r}, not of "
            f"{expected!r} ({snap} needs the .assert that `snap download {expected}` wrote "
            "beside it)", hint=download_hint(expected))


def check_size(assertions: SnapAssertions, size: int, snap: Path | str) -> None:
    if size != assertions.size:
        state = "truncated, or " if size < assertions.size else ""
        raise SnapError(
            f"{snap} is {size} bytes but its assertion {assertions.source} says snap-size "
            f"{assertions.size} ({assertions.name} revision {assertions.revision}); the file is "
            f"{state}not the snap this assertion is for", hint=download_hint(assertions.name))


def check_digests(assertions: SnapAssertions, digests: Digests, snap: Path | str) -> None:
    """Raise `SnapError` unless `digests` match the assertion's `snap-size` and `snap-sha3-384`."""
    check_size(assertions, digests.size, snap)
    if digests.sha3_384 != assertions.sha3_384:
        raise SnapError(
            f"{snap} does not match its assertion {assertions.source}: its SHA3-384 is "
            f"{digests.sha3_384}, the snap-revision assertion ({assertions.name} revision "
            f"{assertions.revision}) says {assertions.sha3_384}; the file is damaged",
            hint=download_hint(assertions.name))


DOWNLOAD_HINT_START = "download it again on a connected machine"


def download_hint(name: str, channel: str | None = None) -> str:
    flag = f" --channel={channel}" if channel else ""
    return (f"{DOWNLOAD_HINT_START} (`snap download {name}{flag}`) and keep the .snap and the "
            ".assert of that one download together")


_REVISION_SUFFIX = re.compile(r"_[0-9]+$")


def snap_name_from_file(path: Path | str) -> str:
    """`microk8s_7394.snap` → `microk8s`; `core20.snap` → `core20`."""
    stem = Path(path).name.removesuffix(".snap")
    return _REVISION_SUFFIX.sub("", stem)


def digest_stream(reader: Readable, sink: Writable | None = None) -> Digests:
    """Read `reader` to its end once: SHA3-384, SHA-256 and size, copying to `sink` if given."""
    sha3 = hashlib.sha3_384()
    sha256 = hashlib.sha256()
    size = 0
    buffers = (bytearray(CHUNK_SIZE), bytearray(CHUNK_SIZE))
    pending: Future[None] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="gapkit-sha3") as pool:
        try:
            for turn in itertools.count():
                buffer = buffers[turn & 1]
                # this buffer's previous chunk is two turns back: its SHA3 was awaited last turn
                n = reader.readinto(buffer)
                if not n:
                    break
                view = memoryview(buffer)[:n]
                if pending is not None:
                    pending.result()
                pending = pool.submit(sha3.update, view)
                sha256.update(view)
                if sink is not None:
                    sink.write(view)
                size += n
        finally:
            if pending is not None:
                pending.result()
    return Digests(size, sha3_384_b64(sha3.digest()), sha256.hexdigest())


def store_verified(source: Path, assertions: SnapAssertions, target: Path) -> Digests:
    """Copy `source` to `target` atomically, checking it against `assertions` on the way.

    Written to a temporary name beside `target`, fsynced, and renamed only when its size and
    SHA3-384 match; on any failure nothing is left behind and `target` is unchanged.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(source, "rb") as src:
            check_size(assertions, os.fstat(src.fileno()).st_size, source)
            with open(tmp, "wb") as out:
                digests = digest_stream(src, out)
                out.flush()
                check_digests(assertions, digests, source)
                os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return digests
