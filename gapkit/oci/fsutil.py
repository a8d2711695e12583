"""Durable, atomic file writes: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: What `temp_path` names: `.NAME.tmp-PID-HEX`.
_TEMP_NAME = re.compile(r"\.(.+)\.tmp-(\d+)-[0-9a-f]{8}")


def temp_path(path: Path) -> Path:
    """Where a writer of `path` puts its bytes first: `.NAME.tmp-PID-HEX` beside it, so that
    `remove_dead_temps` can tell whose it is."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_dead_temps(folder: Path, name: str | None = None) -> None:
    """Remove the `temp_path` files in `folder` (of `name` only, if given) whose writer process
    is gone: what a killed run left, once the next one runs. A live writer's stay."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            match = _TEMP_NAME.fullmatch(entry)
            if (match is not None and (name is None or match[1] == name)
                    and not pid_alive(int(match[2]))):
                with contextlib.suppress(FileNotFoundError):
                    (folder / entry).unlink()


def atomic_write(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix.

    The temp file is created with `mode` from the start (never wider, even for a moment), and
    exclusively, so two writers never share one. `durable=False` skips the fsyncs (a cache
    whose content is checked again when read).
    """
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        # The file is replaced now: a failing folder fsync must not report the write as failed
        # (a caller would then undo or forget what is done); only the new name's durability
        # across a power loss is at risk.
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (read in 1 MiB pieces, so memory stays flat)."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
