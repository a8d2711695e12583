"""Snaps for an offline MicroK8s install: download or collect them, check them, store them.

- `assertions`: the `.assert` format (`Assertion`, `parse_assertions`, `SnapAssertions`).
- `verify`: a snap against its assertion (`verify_snap` → `SnapInfo`).
- `channel`: snap channels, names and architectures.
- `fetch`: snapd, the base snap and microk8s into one folder (`fetch_snaps` → `FetchedSnap`).
"""

from gapkit.errors import SnapError
from gapkit.snaps.assertions import (
    Assertion,
    HeaderValue,
    SnapAssertions,
    parse_assertions,
    sha3_384_b64,
    sha3_384_hex,
)
from gapkit.snaps.channel import (
    Channel,
    check_snap_name,
    host_architecture,
    parse_channel,
    snap_architecture,
)
from gapkit.snaps.fetch import FetchedSnap, SnapFile, fetch_snaps, find_snap
from gapkit.snaps.verify import (
    Digests,
    SnapInfo,
    check_digests,
    digest_stream,
    snap_name_from_file,
    verify_snap,
)

__all__ = [
    "Assertion",
    "Channel",
    "Digests",
    "FetchedSnap",
    "HeaderValue",
    "SnapAssertions",
    "SnapError",
    "SnapFile",
    "SnapInfo",
    "check_digests",
    "check_snap_name",
    "digest_stream",
    "fetch_snaps",
    "find_snap",
    "host_architecture",
    "parse_assertions",
    "parse_channel",
    "sha3_384_b64",
    "sha3_384_hex",
    "snap_architecture",
    "snap_name_from_file",
    "verify_snap",
]
