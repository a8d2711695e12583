"""Real filesystems made by a test: a small tmpfs (to run out of space), bind mounts remounted
read-only. Root only (CI runs as root); a test that cannot mount is skipped, never faked.

`Mounts` remembers every mount it made and `close()` unmounts them innermost first, lazily if
a file is still open, so a failing test never leaves a mount behind (use it as a context
manager, or through a fixture that calls `close()` in `finally`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

PAGE = os.sysconf("SC_PAGE_SIZE")


class Mounts:
    def __init__(self) -> None:
        self.made: list[Path] = []

    def _mount(self, *argv: str) -> None:
        result = subprocess.run(["mount", *argv], capture_output=True, text=True)
        if result.returncode != 0:
            if os.geteuid() != 0:
                pytest.skip("mounting a filesystem needs root")
            raise AssertionError(f"mount {' '.join(argv)}: {result.stderr.strip()}")

    def tmpfs(self, folder: Path, size: int) -> Path:
        """A tmpfs of `size` bytes (whole pages) at `folder` (made if missing)."""
        folder.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder))
        self.made.append(folder)
        return folder

    def read_only_bind(self, source: Path, folder: Path) -> Path:
        """`source` seen read-only at `folder` (a bind mount, then remounted ro)."""
        folder.mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(source), str(folder))
        self.made.append(folder)
        self._mount("-o", "remount,bind,ro", str(folder))
        return folder

    def bind(self, source: Path, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(source), str(folder))
        self.made.append(folder)
        return folder

    def close(self) -> None:
        while self.made:
            folder = self.made.pop()
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], capture_output=True)

    def __enter__(self) -> Mounts:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(folder: Path, leave: int) -> Path:
    """A filler file in `folder` that leaves exactly `leave` bytes (whole pages) free."""
    filler = folder / "filler"
    size = free_bytes(folder) - leave
    assert size >= 0, f"{folder} has only {free_bytes(folder)} bytes free, {leave} wanted"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * size)
    assert free_bytes(folder) == leave, (free_bytes(folder), leave)
    return filler
