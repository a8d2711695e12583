"""Fixtures for snap tests: a stand-in `snap` first on PATH (see tests/support/snaps.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.snaps import StandInSnap


@pytest.fixture
def stand_in_snap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInSnap:
    """A stand-in for snapd's `snap` (snapd cannot run here), first on PATH for this test."""
    snap = StandInSnap(tmp_path / "stand-in-snap").install()
    monkeypatch.setenv("PATH", f"{snap.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return snap
