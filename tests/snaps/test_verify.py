"""A snap against its assertion: exact size and SHA3-384, the declared name, flat memory.

Snaps here are synthetic (random bytes, no squashfs: gapkit never looks inside one) with
assertions in the real format, written by tests/support/snaps.py; no stand-in is run.
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path

import pytest

from gapkit.errors import SnapError
from gapkit.snaps import digest_stream, snap_name_from_file, verify_snap
from tests.support.snaps import flip_byte, make_snap


def test_a_snap_matching_its_assertion_verifies(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "microk8s", 7394, size=3 * 1024 * 1024 + 17)
    info = verify_snap(snap.snap_path, snap.assert_path)
    assert (info.name, info.revision, info.snap_id, info.size) == (
        "microk8s", 7394, snap.snap_id, snap.size)
    assert info.sha3_384 == snap.sha3_384
    assert info.sha256 == hashlib.sha256(snap.snap_path.read_bytes()).hexdigest() == snap.sha256
    assert info.sha3_384_hex == hashlib.sha3_384(snap.snap_path.read_bytes()).hexdigest()
    assert info.publisher_id == "canonical"
    assert (info.file_name, info.assert_name) == ("microk8s_7394.snap", "microk8s_7394.assert")
    assert info.assert_sha256 == hashlib.sha256(snap.assert_path.read_bytes()).hexdigest()
    assert info.assert_size == snap.assert_path.stat().st_size
    assert info.to_json()["sha3_384"] == snap.sha3_384


def test_guide_names_verify_too(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "core20", 2105, basename="core20")
    assert verify_snap(snap.snap_path, snap.assert_path).name == "core20"


def test_a_flipped_byte_is_an_error_naming_the_file(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "microk8s", 7394, size=2 * 1024 * 1024)
    flip_byte(snap.snap_path, 1024 * 1024 + 5)
    with pytest.raises(SnapError) as caught:
        verify_snap(snap.snap_path, snap.assert_path)
    message = caught.value.message
    assert str(snap.snap_path) in message and str(snap.assert_path) in message
    assert "SHA3-384" in message and snap.sha3_384 in message and "damaged" in message
    assert "snap download microk8s" in (caught.value.hint or "")


@pytest.mark.parametrize("change", ["appended", "truncated"])
def test_a_wrong_size_is_an_error_before_hashing(tmp_path: Path, change: str) -> None:
    snap = make_snap(tmp_path, "core20", 2105, size=10_000)
    with open(snap.snap_path, "r+b") as f:
        if change == "appended":
            f.seek(0, 2)
            f.write(b"\0")
        else:
            f.truncate(9_000)
    with pytest.raises(SnapError) as caught:
        verify_snap(snap.snap_path, snap.assert_path)
    message = caught.value.message
    assert str(snap.snap_path) in message and "snap-size 10000" in message
    assert ("truncated" in message) == (change == "truncated")


def test_the_assertion_of_another_snap_is_refused(tmp_path: Path) -> None:
    core = make_snap(tmp_path, "core20", 2105, basename="core20")
    microk8s = make_snap(tmp_path, "microk8s", 7394, basename="microk8s")
    with pytest.raises(SnapError) as caught:
        verify_snap(core.snap_path, microk8s.assert_path)
    assert "is the assertion of snap 'microk8s', not of 'core20'" in caught.value.message
    assert str(core.snap_path) in caught.value.message


def test_the_declared_name_must_be_the_snap_meant(tmp_path: Path) -> None:
    """Content and revision agree, but the declaration names another snap."""
    snap = make_snap(tmp_path, "microk8s", 7394, declared_name="microk8s-fork")
    with pytest.raises(SnapError, match="'microk8s-fork', not of 'microk8s'"):
        verify_snap(snap.snap_path, snap.assert_path)
    assert verify_snap(snap.snap_path, snap.assert_path, name="microk8s-fork").name == \
        "microk8s-fork"


def test_a_missing_snap_is_an_error(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "microk8s", 7394)
    snap.snap_path.unlink()
    with pytest.raises(SnapError, match="does not exist"):
        verify_snap(snap.snap_path, snap.assert_path)


def test_names_from_files() -> None:
    assert snap_name_from_file("microk8s_7394.snap") == "microk8s"
    assert snap_name_from_file(Path("/x/core20.snap")) == "core20"
    assert snap_name_from_file("gapkit/snaps/snapd.snap") == "snapd"


def test_digest_stream_copies_what_it_hashes() -> None:
    data = bytes(range(256)) * 9000  # > 2 chunks
    sink = io.BytesIO()
    digests = digest_stream(io.BytesIO(data), sink)
    assert sink.getvalue() == data
    assert digests.size == len(data)
    assert digests.sha256 == hashlib.sha256(data).hexdigest()
    empty = digest_stream(io.BytesIO(b""))
    assert (empty.size, empty.sha256) == (0, hashlib.sha256(b"").hexdigest())


@pytest.mark.slow
def test_memory_stays_flat_for_a_200_mb_snap(tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    snap = make_snap(tmp_path, "microk8s", 7394, size=size, sparse=True)
    tracemalloc.start()
    try:
        info = verify_snap(snap.snap_path, snap.assert_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.size, info.sha3_384, info.sha256) == (size, snap.sha3_384, snap.sha256)
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while verifying {size} bytes"
