"""Sizes as people read them, for messages of every layer (the CLI's and the library's)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units: 512 B, 1.5 KB, 2.3 MB, 1.1 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
