"""Run the real `gapkit` command line the way a user does: a new process, its exit code, its
output."""

from __future__ import annotations

import subprocess
import sys


def gapkit(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m gapkit ARGS...`; with `check`, a non-zero exit fails the test with stderr."""
    result = subprocess.run([sys.executable, "-m", "gapkit", *args], capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"gapkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
