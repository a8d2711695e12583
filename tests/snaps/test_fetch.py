"""Getting snapd, the base and microk8s into one folder, as the guide's first step does by hand.

`snap` cannot run here (no systemd, no store), so the `snap download` tests use a stand-in
`snap` executable put first on PATH by the `stand_in_snap` fixture (tests/snaps/conftest.py;
TESTBED.md allows it for `snap` only). It records its arguments and writes synthetic snaps with
real-format `.assert` files named `<name>_<revision>.*`, as the real command does. The
`--snaps-from` tests use folders of such files and need no stand-in.
"""

from __future__ import annotations

import hashlib
import shutil
import tracemalloc
from pathlib import Path

import pytest

from gapkit.errors import SnapError, UsageError
from gapkit.snaps import FetchedSnap, fetch_snaps, find_snap, verify_snap
from tests.support.snaps import StandInSnap, flip_byte, make_snap

SNAP_FILES = ["core20.assert", "core20.snap", "microk8s.assert", "microk8s.snap",
              "snapd.assert", "snapd.snap"]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _stamp(folder: Path) -> dict[str, tuple[int, int]]:
    return {name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns)
            for name in _files(folder)}


@pytest.fixture
def store(stand_in_snap: StandInSnap) -> StandInSnap:
    """The stand-in store: microk8s 1.32 and 1.31, core20 and snapd in latest/stable."""
    stand_in_snap.publish("microk8s", "1.32/stable", 7394, size=300_000)
    stand_in_snap.publish("microk8s", "1.31/stable", 7230, size=290_000)
    stand_in_snap.publish("core20", "latest/stable", 2105, size=120_000)
    stand_in_snap.publish("snapd", "latest/stable", 21759, size=80_000)
    return stand_in_snap


# -- through `snap download` ------------------------------------------------------------------------

def test_snap_download_fetches_snapd_base_and_microk8s(tmp_path: Path, store: StandInSnap) -> None:
    dest = tmp_path / "snaps"
    got = fetch_snaps("1.32", "core20", dest)

    work = dest / ".download"
    assert store.argv() == [
        ["download", "snapd", "--channel=latest/stable", f"--target-directory={work}/snapd"],
        ["download", "core20", "--channel=latest/stable", f"--target-directory={work}/core20"],
        ["download", "microk8s", "--channel=1.32/stable",
         f"--target-directory={work}/microk8s"],
    ]
    assert _files(dest) == SNAP_FILES
    assert not work.exists()
    assert [(s.role, s.name, s.revision, s.channel) for s in got] == [
        ("snapd", "snapd", 21759, "latest/stable"), ("base", "core20", 2105, "latest/stable"),
        ("microk8s", "microk8s", 7394, "1.32/stable")]
    for snap in got:
        assert snap.action == "downloaded" and snap.source == "snap download"
        assert snap.path == dest / f"{snap.name}.snap"
        assert snap.assert_path == dest / f"{snap.name}.assert"
        assert snap.sha256 == hashlib.sha256(snap.path.read_bytes()).hexdigest()
        assert verify_snap(snap.path, snap.assert_path).sha3_384 == snap.sha3_384
    record = got[2].to_json()
    assert record["file"] == "microk8s.snap" and record["assertion"] == "microk8s.assert"
    assert {"name", "revision", "channel", "size", "sha256", "sha3_384", "role"} <= set(record)


def test_the_channel_goes_to_snap_download_in_full_form(tmp_path: Path,
                                                        store: StandInSnap) -> None:
    store.publish("microk8s", "1.32-strict/stable", 7400)
    store.publish("core22", "latest/stable", 1380)
    got = fetch_snaps("1.32-strict", "core22", tmp_path / "snaps", include_snapd=False)
    assert [call[1:3] for call in store.argv()] == [
        ["core22", "--channel=latest/stable"], ["microk8s", "--channel=1.32-strict/stable"]]
    assert [s.name for s in got] == ["core22", "microk8s"]
    assert not (tmp_path / "snaps" / "snapd.snap").exists()


def test_another_architecture_is_asked_of_the_store(tmp_path: Path, store: StandInSnap) -> None:
    got = fetch_snaps("1.32/stable", "core20", tmp_path / "snaps", architecture="linux/arm64")
    assert {call["UBUNTU_STORE_ARCH"] for call in store.calls()} == {"arm64"}
    assert {s.architecture for s in got} == {"arm64"}


def test_a_second_fetch_keeps_what_is_there(tmp_path: Path, store: StandInSnap) -> None:
    dest = tmp_path / "snaps"
    fetch_snaps("1.32", "core20", dest)
    before, calls = _stamp(dest), len(store.calls())

    again = fetch_snaps("1.32", "core20", dest)
    assert len(store.calls()) == calls  # the store was not asked again
    assert _stamp(dest) == before  # nothing rewritten
    assert [s.action for s in again] == ["kept", "kept", "kept"]
    assert [s.revision for s in again] == [21759, 2105, 7394]

    refreshed = fetch_snaps("1.32", "core20", dest, refresh=True)
    assert len(store.calls()) == calls + 3
    assert [s.action for s in refreshed] == ["downloaded"] * 3


def test_another_channel_downloads_only_microk8s_again(tmp_path: Path,
                                                       store: StandInSnap) -> None:
    dest = tmp_path / "snaps"
    fetch_snaps("1.32", "core20", dest)
    calls = len(store.calls())
    got = fetch_snaps("1.31", "core20", dest)
    assert [call[1:3] for call in store.argv()[calls:]] == [["microk8s", "--channel=1.31/stable"]]
    assert [(s.name, s.action, s.revision) for s in got] == [
        ("snapd", "kept", 21759), ("core20", "kept", 2105), ("microk8s", "downloaded", 7230)]
    assert verify_snap(dest / "microk8s.snap", dest / "microk8s.assert").revision == 7230


def test_a_damaged_stored_snap_is_downloaded_again(tmp_path: Path, store: StandInSnap) -> None:
    dest = tmp_path / "snaps"
    fetch_snaps("1.32", "core20", dest)
    flip_byte(dest / "core20.snap", 100)
    warnings: list[str] = []
    got = fetch_snaps("1.32", "core20", dest, on_warning=warnings.append)
    assert [s.action for s in got] == ["kept", "downloaded", "kept"]
    assert any("replacing" in w and "core20.snap" in w for w in warnings)
    verify_snap(dest / "core20.snap", dest / "core20.assert")


def test_a_download_that_does_not_match_its_assertion_is_refused(tmp_path: Path,
                                                                 store: StandInSnap) -> None:
    store.publish("microk8s", "1.32/stable", 7394, size=300_000, damage=True)
    dest = tmp_path / "snaps"
    with pytest.raises(SnapError) as caught:
        fetch_snaps("1.32", "core20", dest)
    assert "microk8s_7394.snap does not match its assertion" in caught.value.message
    assert "microk8s.snap" not in _files(dest)
    assert not list((dest / ".download" / "microk8s").glob("*.snap"))


def test_snap_download_failing_is_an_error_with_what_snap_said(tmp_path: Path,
                                                               store: StandInSnap) -> None:
    with pytest.raises(SnapError) as caught:
        fetch_snaps("1.99", "core20", tmp_path / "snaps")
    message = caught.value.message
    assert "`snap download microk8s --channel=1.99/stable` failed (exit status 1)" in message
    assert "not available on 1.99/stable" in message
    assert "--snaps-from" in (caught.value.hint or "")


def test_without_snap_or_a_folder_the_error_says_what_to_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SnapError) as caught:
        fetch_snaps("1.32", "core20", tmp_path / "snaps")
    assert "`snap` is not installed" in caught.value.message
    hint = caught.value.hint or ""
    for command in ("snap download snapd", "snap download core20",
                    "snap download microk8s --channel=1.32/stable", "--snaps-from"):
        assert command in hint


@pytest.mark.parametrize(("channel", "base"), [("1.32/stabel", "core20"), ("", "core20"),
                                               ("1.32", "core20.snap"), ("1.32", "")])
def test_a_bad_channel_or_base_is_a_usage_error(tmp_path: Path, store: StandInSnap,
                                                channel: str, base: str) -> None:
    with pytest.raises(UsageError):
        fetch_snaps(channel, base, tmp_path / "snaps")
    assert store.calls() == []


# -- from a folder (--snaps-from) -------------------------------------------------------------------

@pytest.mark.parametrize("naming", ["snap download", "guide"])
def test_snaps_from_a_folder_in_either_naming(tmp_path: Path, store: StandInSnap,
                                              naming: str) -> None:
    source = tmp_path / "from"
    made = {}
    for name, revision in (("snapd", 21759), ("core20", 2105), ("microk8s", 7394)):
        basename = name if naming == "guide" else None
        made[name] = make_snap(source, name, revision, basename=basename)
    dest = tmp_path / "snaps"
    got = fetch_snaps("1.32", "core20", dest, snaps_from=source)

    assert store.calls() == []  # a folder wins over `snap download`
    assert _files(dest) == SNAP_FILES
    for snap in got:
        original = made[snap.name]
        assert snap.action == "copied" and snap.source == str(original.snap_path)
        assert snap.path.read_bytes() == original.snap_path.read_bytes()
        assert snap.assert_path.read_bytes() == original.assert_path.read_bytes()
        assert (snap.sha3_384, snap.sha256) == (original.sha3_384, original.sha256)
        assert snap.architecture is None
    assert [s.channel for s in got] == ["latest/stable", "latest/stable", "1.32/stable"]


def _folder(tmp_path: Path, *, snapd: bool = True) -> Path:
    source = tmp_path / "from"
    if snapd:
        make_snap(source, "snapd", 21759)
    make_snap(source, "core20", 2105)
    make_snap(source, "microk8s", 7394)
    return source


def test_the_highest_revision_is_picked_and_said(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    make_snap(source, "microk8s", 7230)
    make_snap(source, "microk8s", 7401)
    make_snap(source, "microk8s", 7400, basename="microk8s")
    warnings: list[str] = []
    got = fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=source,
                      on_warning=warnings.append)
    assert got[-1].revision == 7401
    assert got[-1].source == str(source / "microk8s_7401.snap")
    assert any("7230, 7394, 7400, 7401" in w and "7401" in w for w in warnings)


def test_find_snap_reports_nothing_when_nothing_is_there(tmp_path: Path) -> None:
    source = _folder(tmp_path, snapd=False)
    assert find_snap(source, "snapd") is None
    found = find_snap(source, "core20")
    assert found is not None and (found.name, found.revision) == ("core20", 2105)


@pytest.mark.parametrize("missing", ["microk8s_7394.assert", "microk8s_7394.snap"])
def test_a_missing_half_is_an_error_naming_it(tmp_path: Path, missing: str) -> None:
    source = _folder(tmp_path)
    (source / missing).unlink()
    with pytest.raises(SnapError) as caught:
        fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=source)
    assert missing in caught.value.message and str(source) in caught.value.message
    assert "snap download microk8s --channel=1.32/stable" in (caught.value.hint or "")


def test_a_missing_guide_named_assert_is_an_error(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    for path in source.glob("microk8s_*"):
        path.unlink()
    make_snap(source, "microk8s", 7394, basename="microk8s")
    (source / "microk8s.assert").unlink()
    with pytest.raises(SnapError, match=r"microk8s\.snap is in .* but microk8s\.assert is not"):
        fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=source)


def test_an_older_orphan_is_ignored_with_a_warning(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    make_snap(source, "microk8s", 7000)
    (source / "microk8s_7000.assert").unlink()
    warnings: list[str] = []
    got = fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=source,
                      on_warning=warnings.append)
    assert got[-1].revision == 7394
    assert any("microk8s_7000.snap" in w for w in warnings)


def test_a_missing_base_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    with pytest.raises(SnapError) as caught:
        fetch_snaps("1.35", "core22", tmp_path / "snaps", snaps_from=source)
    assert "no core22 snap in" in caught.value.message and str(source) in caught.value.message
    assert "snap download core22" in (caught.value.hint or "")


def test_snapd_missing_from_the_folder_is_skipped_with_a_warning(tmp_path: Path) -> None:
    source = _folder(tmp_path, snapd=False)
    warnings: list[str] = []
    got = fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=source,
                      on_warning=warnings.append)
    assert [s.name for s in got] == ["core20", "microk8s"]
    assert len(warnings) == 1 and "no snapd snap" in warnings[0]
    assert "snap download snapd" in warnings[0]

    warnings.clear()
    got = fetch_snaps("1.32", "core20", tmp_path / "snaps2", snaps_from=source,
                      include_snapd=False, on_warning=warnings.append)
    assert [s.name for s in got] == ["core20", "microk8s"] and warnings == []


def test_a_damaged_snap_in_the_folder_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    flip_byte(source / "microk8s_7394.snap", 1000)
    dest = tmp_path / "snaps"
    with pytest.raises(SnapError) as caught:
        fetch_snaps("1.32", "core20", dest, snaps_from=source)
    assert str(source / "microk8s_7394.snap") in caught.value.message
    assert "does not match its assertion" in caught.value.message
    assert "snap download microk8s --channel=1.32/stable" in (caught.value.hint or "")
    assert sorted(p.name for p in dest.iterdir()) == [
        "core20.assert", "core20.snap", "snapd.assert", "snapd.snap"]  # no temp files left


def test_an_assert_of_another_snap_in_the_folder_is_refused(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    shutil.copyfile(source / "snapd_21759.assert", source / "core20_2105.assert")
    with pytest.raises(SnapError, match="is the assertion of snap 'snapd', not of 'core20'"):
        fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=source)


def test_a_second_fetch_from_the_folder_keeps_identical_files(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    dest = tmp_path / "snaps"
    fetch_snaps("1.32", "core20", dest, snaps_from=source)
    before = _stamp(dest)
    again = fetch_snaps("1.32", "core20", dest, snaps_from=source)
    assert [s.action for s in again] == ["kept", "kept", "kept"]
    assert _stamp(dest) == before

    make_snap(source, "microk8s", 7401)  # a newer revision arrives
    newer = fetch_snaps("1.32", "core20", dest, snaps_from=source)
    assert [(s.action, s.revision) for s in newer][-1] == ("copied", 7401)
    assert _stamp(dest)["core20.snap"] == before["core20.snap"]
    assert verify_snap(dest / "microk8s.snap", dest / "microk8s.assert").revision == 7401


def test_a_folder_that_is_not_there_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a folder"):
        fetch_snaps("1.32", "core20", tmp_path / "snaps", snaps_from=tmp_path / "nope")


@pytest.mark.slow
def test_memory_stays_flat_copying_a_200_mb_snap(tmp_path: Path) -> None:
    source = tmp_path / "from"
    make_snap(source, "core20", 2105)
    big = make_snap(source, "microk8s", 7394, size=200 * 1024 * 1024, sparse=True)
    tracemalloc.start()
    try:
        got: list[FetchedSnap] = fetch_snaps("1.32", "core20", tmp_path / "snaps",
                                             snaps_from=source, include_snapd=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (got[-1].size, got[-1].sha3_384) == (big.size, big.sha3_384)
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while copying {big.size} bytes"


def test_a_dest_that_cannot_be_written_is_a_snap_error(tmp_path: Path) -> None:
    source = _folder(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(SnapError, match="cannot make the snaps folder"):
        fetch_snaps("1.32", "core20", blocked / "snaps", snaps_from=source)
    dest = tmp_path / "snaps"
    (dest / "core20.snap").mkdir(parents=True)  # in the way of the rename
    with pytest.raises(SnapError, match="cannot store the core20 snap"):
        fetch_snaps("1.32", "core20", dest, snaps_from=source)
