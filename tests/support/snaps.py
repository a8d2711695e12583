"""Synthetic snaps with real-format assertions, and a stand-in `snap` executable.

No snap can be downloaded on these machines and snapd cannot run (PID 1 is not systemd), so
`snap` is one of the two programs tests may stand in for (TESTBED.md). The stand-in answers
`snap download` as the real one does: it writes `<name>_<revision>.snap` (random bytes; gapkit
never looks inside a snap, so no squashfs is needed) and `<name>_<revision>.assert` into
`--target-directory` (or the working folder), prints what the real command prints, and records
its arguments. The `.assert` files hold the stanzas `snap download` writes (the store's
`account-key`, the publisher's `account`, `snap-declaration`, `snap-revision`) in snapd's exact
encoding, with the right `snap-sha3-384` and `snap-size` and placeholder signatures.

Everything here is independent of gapkit's own code, so a bug there cannot hide itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Snap ids as the store gives them (32 characters); other names get a made-up one.
SNAP_IDS = {
    "microk8s": "EaXqgt1lyCaxKaQCU349mlodBkDCXRcg",
    "core18": "CSO04Jhav2yK0uz97cr0ipQRyqg0qQL6",
    "core20": "DLqre5XGLbDqg9jPtiAhRRjDuPVa5X1q",
    "core22": "amcUKQILKXHHTlmSa7NMdnXSx02dNeeT",
    "snapd": "PMrrV4ml8uWuEUDBT8dSGnKUYbevVhc4",
}
#: The store's signing key and the root key that signs it (key ids as in real assertions).
STORE_KEY = "BWDEoaqyr25nF5SNCvEv2v7QnM9QsfCc0PBMYD_i2NGSQ32EF2d4D0hqUel3m8ul"
ROOT_KEY = "-CvQKAwRQ5h3Ffn10FILJoEZUXOv6km9FwA80-Rcj-f-6jadQ89VRswHNiEB9Lxk"
CHUNK = 1024 * 1024
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def snap_id_for(name: str) -> str:
    if name in SNAP_IDS:
        return SNAP_IDS[name]
    digest = hashlib.sha256(name.encode()).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest)[:32]


def b64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class SyntheticSnap:
    name: str
    revision: int
    snap_id: str
    size: int
    #: base64url without padding, as in `snap-sha3-384`
    sha3_384: str
    sha256: str
    snap_path: Path
    assert_path: Path


def write_snap_content(path: Path, size: int, seed: int, sparse: bool = False) -> tuple[str, str]:
    """Write `size` bytes (random, or 4 KiB random then a hole of zeros) streaming; return
    (sha3-384 base64url, sha256 hex). Memory stays at one chunk whatever the size."""
    sha3, sha256 = hashlib.sha3_384(), hashlib.sha256()
    rng = random.Random(seed)
    with open(path, "wb") as f:
        if sparse:
            head = rng.randbytes(min(size, 4096))
            f.write(head)
            sha3.update(head)
            sha256.update(head)
            f.truncate(size)
            zeros = bytes(CHUNK)
            left = size - len(head)
            while left:
                part = zeros[:min(left, CHUNK)]
                sha3.update(part)
                sha256.update(part)
                left -= len(part)
        else:
            left = size
            while left:
                part = rng.randbytes(min(left, CHUNK))
                f.write(part)
                sha3.update(part)
                sha256.update(part)
                left -= len(part)
    return b64url(sha3.digest()), sha256.hexdigest()


def _wrapped(data: bytes, width: int = 76) -> str:
    text = base64.b64encode(data).decode()
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))


def _signature(seed: str) -> str:
    """A placeholder signature shaped like the store's (an OpenPGP packet, base64, 76 wide)."""
    rng = random.Random(seed)
    return _wrapped(bytes.fromhex("01c2c1520400010a00060502") + rng.randbytes(840))


def _encode(headers: list[tuple[str, str]], body: str = "") -> str:
    lines = [f"{name}: {value}" for name, value in headers]
    content = "\n".join(lines) + (f"\n\n{body}" if body else "")
    return f"{content}\n\n{_signature(content)}\n"


def assertion_text(name: str, revision: int, size: int, sha3_384: str, *,
                   snap_id: str | None = None, publisher: str = "canonical",
                   declared_name: str | None = None) -> str:
    """The `.assert` stream `snap download` writes for one snap, with placeholder signatures.

    `declared_name` makes the snap-declaration name another snap (to test mismatches).
    """
    snap_id = snap_id or snap_id_for(name)
    key_body = _wrapped(random.Random("store-key").randbytes(531))
    assert len(key_body) == 717, len(key_body)  # as the real store account-key's body
    stanzas = [
        _encode([("type", "account-key"), ("authority-id", "canonical"), ("revision", "2"),
                 ("public-key-sha3-384", STORE_KEY), ("account-id", "canonical"),
                 ("name", "store"), ("since", "2016-04-01T00:00:00.0Z"),
                 ("body-length", str(len(key_body))), ("sign-key-sha3-384", ROOT_KEY)],
                key_body),
        _encode([("type", "account"), ("authority-id", "canonical"),
                 ("account-id", publisher), ("display-name", publisher.capitalize()),
                 ("timestamp", "2016-04-01T00:00:00.0Z"), ("username", publisher),
                 ("validation", "verified"), ("sign-key-sha3-384", ROOT_KEY)]),
        _encode([("type", "snap-declaration"), ("authority-id", "canonical"),
                 ("revision", "5"), ("series", "16"), ("snap-id", snap_id),
                 ("publisher-id", publisher), ("snap-name", declared_name or name),
                 ("timestamp", "2018-11-20T09:12:48.553415Z"),
                 ("sign-key-sha3-384", STORE_KEY)]),
        _encode([("type", "snap-revision"), ("authority-id", "canonical"),
                 ("snap-sha3-384", sha3_384), ("developer-id", publisher),
                 ("snap-id", snap_id), ("snap-revision", str(revision)),
                 ("snap-size", str(size)), ("timestamp", "2025-01-14T16:31:02.120539Z"),
                 ("sign-key-sha3-384", STORE_KEY)]),
    ]
    return "\n".join(stanzas)


def make_snap(folder: Path, name: str, revision: int, *, size: int = 64 * 1024,
              seed: int | None = None, basename: str | None = None, sparse: bool = False,
              declared_name: str | None = None) -> SyntheticSnap:
    """Write `<basename>.snap` and `.assert` (default basename `<name>_<revision>`)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = basename or f"{name}_{revision}"
    snap_path, assert_path = folder / f"{stem}.snap", folder / f"{stem}.assert"
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(f"{name}/{revision}".encode()).digest()[:8], "big")
    sha3, sha256 = write_snap_content(snap_path, size, seed, sparse)
    assert_path.write_text(assertion_text(name, revision, size, sha3,
                                          declared_name=declared_name))
    return SyntheticSnap(name, revision, snap_id_for(name), size, sha3, sha256, snap_path,
                         assert_path)


def flip_byte(path: Path, offset: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- the stand-in `snap` ------------------------------------------------------------------------------

_RISKS = ("stable", "candidate", "beta", "edge")


def _full_channel(channel: str) -> str:
    if "/" in channel:
        first = channel.split("/")[0]
        return f"latest/{channel}" if first in _RISKS else channel
    return f"latest/{channel}" if channel in _RISKS else f"{channel}/stable"


class StandInSnap:
    """A `snap` executable in `<root>/bin` that serves `snap download` from a published list."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin_dir = root / "bin"
        self.store_file = root / "store.json"
        self.calls_file = root / "calls.jsonl"

    def install(self) -> StandInSnap:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        if not self.store_file.exists():
            self.store_file.write_text("{}")
        script = self.bin_dir / "snap"
        script.write_text(
            f"#!{sys.executable}\n"
            "# stand-in for snapd's `snap` (tests only): see tests/support/snaps.py\n"
            "import sys\n"
            f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            "from tests.support.snaps import stand_in_main\n"
            f"sys.exit(stand_in_main({str(self.root)!r}, sys.argv[1:]))\n")
        script.chmod(0o755)
        return self

    def publish(self, name: str, channel: str = "latest/stable", revision: int = 1, *,
                size: int = 64 * 1024, seed: int | None = None, sparse: bool = False,
                damage: bool = False) -> None:
        """Make `snap download name --channel=channel` serve `revision`.

        `damage` flips a byte of the written snap (as a disk or copy error would), so the
        files disagree with each other although `snap download` succeeds.
        """
        store = json.loads(self.store_file.read_text())
        store.setdefault(name, {})[_full_channel(channel)] = {
            "revision": revision, "size": size, "seed": seed, "sparse": sparse, "damage": damage}
        self.store_file.write_text(json.dumps(store))

    def calls(self) -> list[dict[str, object]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def argv(self) -> list[list[str]]:
        return [list(call["argv"]) for call in self.calls()]  # type: ignore[call-overload]


def stand_in_main(root: str, argv: list[str]) -> int:
    """The stand-in's behaviour, run as `snap ARGS...`."""
    state = StandInSnap(Path(root))
    with open(state.calls_file, "a") as log:
        log.write(json.dumps({"argv": argv, "cwd": os.getcwd(),
                              "UBUNTU_STORE_ARCH": os.environ.get("UBUNTU_STORE_ARCH")}) + "\n")
    if not argv or argv[0] != "download":
        print("error: this stand-in `snap` only answers `snap download`", file=sys.stderr)
        return 64
    options: dict[str, str] = {}
    positional: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key in _RISKS:
                options["channel"] = key
                continue
            if key not in ("channel", "target-directory", "basename", "revision", "cohort"):
                print(f"error: unknown flag `{key}'", file=sys.stderr)
                return 1
            options[key] = value if eq else next(args, "")
        else:
            positional.append(arg)
    if len(positional) != 1:
        print("error: the required argument `<snap>` was not provided", file=sys.stderr)
        return 1
    name = positional[0]
    channel = _full_channel(options.get("channel", "stable"))
    store = json.loads(state.store_file.read_text())
    if name not in store:
        print(f'error: snap "{name}" not found', file=sys.stderr)
        return 1
    entry = store[name].get(channel)
    if entry is None:
        print(f'error: snap "{name}" is not available on {channel}', file=sys.stderr)
        return 1
    target = Path(options.get("target-directory") or os.getcwd())
    revision = int(entry["revision"])
    stem = options.get("basename") or f"{name}_{revision}"
    print(f'Fetching snap "{name}"')
    made = make_snap(target, name, revision, size=int(entry["size"]), seed=entry["seed"],
                     basename=stem, sparse=bool(entry["sparse"]))
    if entry["damage"]:
        flip_byte(made.snap_path, made.size // 2)
    print(f'Fetching assertions for "{name}"')
    print(f"Install the snap with:\n   snap ack {stem}.assert\n   snap install {stem}.snap")
    return 0
