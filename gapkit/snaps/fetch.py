"""Get the snaps a MicroK8s node installs offline: snapd, the base snap and microk8s.

The seed guide downloads `microk8s` for a channel and its base (`core18`, `core20` or `core22`)
with their `.assert` files. gapkit also carries the `snapd` snap by default, as upstream's airgap
CI installs it first: core20 and core22 can need a newer snapd than the node's distribution ships
("assumes unsupported features: snapd2.61").

Snaps come either from `snap download` (when `snap` is installed; it needs the store, not the
snapd daemon) or from a folder (`snaps_from`) holding them as `snap download` names them
(`microk8s_7394.snap` + `microk8s_7394.assert`) or as the guide renames them (`microk8s.snap` +
`microk8s.assert`). Either way each snap is checked against its assertion and stored in `dest`
as `<name>.snap` + `<name>.assert` (atomically: temporary name, fsync, rename), ready for
`snap ack <name>.assert && snap install ./<name>.snap`.

A run that finds the same snap already stored and intact in `dest` keeps it: for a folder source
when the folder's assertion names the same content, for `snap download` when the stored snap was
downloaded for the same channel and architecture (pass `refresh=True` to ask the store again).
Interrupted downloads resume: `snap download` keeps its `.partial` file in `dest/.download/`.

This module is synchronous (subprocess and hashing); async callers run it with
`asyncio.to_thread`. Hashing releases the GIL, so it overlaps with the caller's other work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gapkit.errors import SnapError, UsageError
from gapkit.oci.fsutil import atomic_write, fsync_dir
from gapkit.snaps.assertions import SnapAssertions
from gapkit.snaps.channel import (
    DEFAULT_TRACK,
    check_snap_name,
    host_architecture,
    parse_channel,
    snap_architecture,
)
from gapkit.snaps.verify import (
    DOWNLOAD_HINT_START,
    Digests,
    SnapInfo,
    check_digests,
    check_name,
    check_size,
    digest_stream,
    download_hint,
    snap_info,
    store_verified,
)

log = logging.getLogger(__name__)

Role = Literal["snapd", "base", "microk8s"]
Action = Literal["downloaded", "copied", "kept"]
WarningHandler = Callable[[str], None]

#: The channel `snap download <name>` uses without `--channel`; bases and snapd come from it.
STABLE = f"{DEFAULT_TRACK}/stable"
#: Where `snap download` works (and leaves `.partial` files to resume), inside `dest`.
DOWNLOAD_FOLDER = ".download"
#: Which channel and architecture each stored snap was downloaded for, inside `dest`.
STATE_FILE = ".gapkit-snaps.json"


@dataclass(frozen=True, kw_only=True)
class FetchedSnap(SnapInfo):
    """A snap stored in `dest`, checked against its assertion, and where it came from."""

    #: Its part in an install: `snapd`, then `base`, then `microk8s`.
    role: Role
    #: The channel asked for (`1.32/stable`; `latest/stable` for the base and snapd). For
    #: snaps taken from a folder this is what the caller asked for: the files do not say.
    channel: str
    #: The snap architecture asked of the store (`amd64`, `arm64`, …); None when the snap came
    #: from a folder (the assertion does not say) or the host's could not be told.
    architecture: str | None
    #: `snap download` or the file it was copied from.
    source: str
    action: Action

    def to_json(self) -> dict[str, object]:
        return {"role": self.role, **super().to_json(), "channel": self.channel,
                "architecture": self.architecture, "source": self.source, "action": self.action}


@dataclass(frozen=True)
class SnapFile:
    """A `.snap` and its `.assert` found in a folder, with the assertions parsed."""

    name: str
    snap_path: Path
    assert_path: Path
    assertions: SnapAssertions

    @property
    def revision(self) -> int:
        return self.assertions.revision


def fetch_snaps(
    channel: str,
    base: str,
    dest: Path,
    snaps_from: Path | None = None,
    include_snapd: bool = True,
    *,
    architecture: str | None = None,
    refresh: bool = False,
    on_warning: WarningHandler | None = None,
) -> list[FetchedSnap]:
    """Store snapd (optional), `base` and microk8s from `channel` in `dest`, each verified.

    Returns them in install order (snapd, base, microk8s). `architecture` (a snap architecture
    such as `arm64`, or an OCI platform such as `linux/arm64`) asks `snap download` for another
    architecture than the host's. A bad channel, base or architecture is a `UsageError`; a
    missing, damaged or mismatched snap is a `SnapError`. Without `snaps_from` a missing snapd
    snap is an error like any other; with it, snapd is skipped with a warning.

    A snap already stored intact in `dest` is kept (`action="kept"`, nothing rewritten): from a
    folder when the folder's assertion names the same content; from `snap download` when it was
    downloaded for the same channel and architecture, unless `refresh` asks the store again.
    `on_warning` receives what the caller should show (several revisions found and which one
    was used, snapd missing from the folder, a damaged stored snap replaced); by default these
    are logged. `architecture` does not apply to `snaps_from`: an assertion does not name one.
    """
    warn = on_warning or log.warning
    microk8s_channel = str(parse_channel(channel))
    check_snap_name(base, "base snap")
    if base in ("microk8s", "snapd"):
        raise UsageError(f"{base!r} is not a base snap", hint="MicroK8s uses core18, core20 or core22")
    arch = snap_architecture(architecture) if architecture else None
    wanted: list[tuple[Role, str, str]] = []
    if include_snapd:
        wanted.append(("snapd", "snapd", STABLE))
    wanted += [("base", base, STABLE), ("microk8s", "microk8s", microk8s_channel)]

    if snaps_from is not None:
        if not snaps_from.is_dir():
            raise UsageError(f"--snaps-from {snaps_from} is not a folder",
                             hint="give the folder that holds the .snap and .assert files")
        snap = None
    else:
        snap = shutil.which("snap")
        if snap is None:
            raise SnapError(
                "`snap` is not installed here, so the snaps cannot be downloaded",
                hint="install snapd, or on a connected machine run " + _commands(wanted)
                     + " and pass the folder with --snaps-from")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SnapError(f"cannot make the snaps folder {dest}: {exc.strerror}") from exc
    fetched: list[FetchedSnap] = []
    for role, name, snap_channel in wanted:
        try:
            if snap is None:
                assert snaps_from is not None
                got = _from_folder(role, name, snap_channel, snaps_from, dest, warn)
            else:
                got = _download(snap, role, name, snap_channel, arch, dest, refresh, warn)
        except SnapError as exc:
            if exc.hint and exc.hint.startswith(DOWNLOAD_HINT_START):  # say which channel
                exc.hint = download_hint(name, None if snap_channel == STABLE else snap_channel)
            raise
        except OSError as exc:
            where = exc.filename or dest
            raise SnapError(f"cannot store the {name} snap: {where}: {exc.strerror}",
                            hint=f"check that {dest} is writable and has room") from exc
        if got is not None:
            fetched.append(got)
    return fetched


def _commands(wanted: list[tuple[Role, str, str]]) -> str:
    return "; ".join(f"`{_download_command(name, channel)}`" for _, name, channel in wanted)


def _download_command(name: str, channel: str) -> str:
    flag = "" if channel == STABLE else f" --channel={channel}"
    return f"snap download {name}{flag}"


# -- from a folder ----------------------------------------------------------------------------------

def find_snap(folder: Path, name: str, channel: str = STABLE,
              on_warning: WarningHandler | None = None) -> SnapFile | None:
    """Find `name`'s snap and assertion in `folder`; None when neither is there at all.

    Files named as `snap download` names them (`<name>_<revision>.snap`/`.assert`) and as the
    guide renames them (`<name>.snap`/`.assert`) are both found; when several revisions are
    there the highest is used, and `on_warning` says so. A snap without its assertion (or the
    reverse) is a `SnapError` naming the missing file.
    """
    warn = on_warning or log.warning
    pattern = re.compile(rf"{re.escape(name)}(?:_([0-9]+))?\.(snap|assert)")
    pairs: dict[str, dict[str, Path]] = {}
    for entry in sorted(folder.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            key = f"{name}_{match[1]}" if match[1] else name
            pairs.setdefault(key, {})[match[2]] = entry
    if not pairs:
        return None

    complete: list[SnapFile] = []
    incomplete: list[tuple[int | None, Path, Path]] = []  # (revision by file name, have, missing)
    for key, files in pairs.items():
        number = key.rpartition("_")[2] if "_" in key else None
        revision = int(number) if number else None
        if "snap" in files and "assert" in files:
            assertions = SnapAssertions.read(files["assert"])
            complete.append(SnapFile(name, files["snap"], files["assert"], assertions))
        else:
            have = files.get("snap") or files["assert"]
            missing = folder / f"{key}.{'assert' if 'snap' in files else 'snap'}"
            incomplete.append((revision, have, missing))

    best = max(complete, key=lambda f: (f.revision, "_" in f.snap_path.name), default=None)
    for revision, have, missing in incomplete:
        # an orphan matters unless a complete pair is known to be newer
        if best is None or revision is None or revision > best.revision:
            raise SnapError(
                f"{have.name} is in {folder} but {missing.name} is not",
                hint=f"on a connected machine run `{_download_command(name, channel)}` and copy "
                     f"both files it writes ({name}_<revision>.snap and .assert) into {folder}")
        warn(f"ignoring {have} (no {missing.name} beside it; revision {best.revision} is newer)")
    assert best is not None
    revisions = sorted({f.revision for f in complete})
    if len(revisions) > 1:
        warn(f"{folder} holds {name} revisions {', '.join(map(str, revisions))}; "
             f"using the highest, {best.revision} ({best.snap_path.name})")
    return best


def _from_folder(role: Role, name: str, channel: str, folder: Path, dest: Path,
                 warn: WarningHandler) -> FetchedSnap | None:
    found = find_snap(folder, name, channel, warn)
    if found is None:
        if role == "snapd":
            warn(f"no snapd snap in {folder}, so snapd is not carried: each node's own snapd "
                 "must be new enough for the base snap (core20 and core22 can need a newer one "
                 f"than the distribution ships; add it with `{_download_command('snapd', STABLE)}`)")
            return None
        raise SnapError(
            f"no {name} snap in {folder} (looked for {name}_<revision>.snap or {name}.snap, "
            "each with its .assert)",
            hint=f"on a connected machine run `{_download_command(name, channel)}` and copy the "
                 f".snap and .assert it writes into {folder}")
    check_name(found.assertions, name, found.snap_path)
    snap_target, assert_target = dest / f"{name}.snap", dest / f"{name}.assert"
    raw_assert = found.assert_path.read_bytes()
    kept = _intact(dest, name, found.assertions, warn)
    if kept is not None:
        digests = kept[1]
        action: Action = "kept"
        if not assert_target.exists() or assert_target.read_bytes() != raw_assert:
            atomic_write(assert_target, raw_assert)
    else:
        digests = store_verified(found.snap_path, found.assertions, snap_target)
        atomic_write(assert_target, raw_assert)
        action = "copied"
    _forget(dest, name)
    return _result(role, channel, None, str(found.snap_path), action, found.assertions, digests,
                   snap_target, assert_target)


def _intact(dest: Path, name: str, expected: SnapAssertions | None,
            warn: WarningHandler) -> tuple[SnapAssertions, Digests] | None:
    """The snap already stored in `dest`, if it is whole and (given `expected`) the same one."""
    snap, assertion = dest / f"{name}.snap", dest / f"{name}.assert"
    if not (snap.is_file() and assertion.is_file()):
        return None
    try:
        stored = SnapAssertions.read(assertion)
        check_name(stored, name, snap)
        if expected is not None and (stored.sha3_384, stored.size) != (expected.sha3_384,
                                                                       expected.size):
            return None  # a different revision: replaced below, no need to read it
        with open(snap, "rb") as f:
            check_size(stored, os.fstat(f.fileno()).st_size, snap)
            digests = digest_stream(f)
        check_digests(stored, digests, snap)
    except SnapError as exc:
        warn(f"replacing {snap}: {exc.message}")
        return None
    return stored, digests


def _result(role: Role, channel: str, arch: str | None, source: str, action: Action,
            assertions: SnapAssertions, digests: Digests, snap: Path,
            assertion: Path) -> FetchedSnap:
    info = snap_info(assertions, digests, snap, assertion)
    return FetchedSnap(
        role=role, channel=channel, architecture=arch, source=source, action=action,
        name=info.name, revision=info.revision, snap_id=info.snap_id,
        publisher_id=info.publisher_id, size=info.size, sha3_384=info.sha3_384,
        sha256=info.sha256, path=info.path, assert_path=info.assert_path,
        assert_size=info.assert_size, assert_sha256=info.assert_sha256)


# -- through `snap download` ------------------------------------------------------------------------

def _download(snap: str, role: Role, name: str, channel: str, arch: str | None, dest: Path,
              refresh: bool, warn: WarningHandler) -> FetchedSnap:
    effective_arch = arch or host_architecture()
    state = _load_state(dest)
    previous = state.get(name)
    if not refresh and isinstance(previous, dict) and previous.get("channel") == channel \
            and previous.get("architecture") == effective_arch:
        kept = _intact(dest, name, None, warn)
        if kept is not None and kept[0].sha3_384 == previous.get("sha3_384"):
            return _result(role, channel, effective_arch, "snap download", "kept", kept[0],
                           kept[1], dest / f"{name}.snap", dest / f"{name}.assert")

    work = dest / DOWNLOAD_FOLDER / name
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.iterdir():  # keep `.partial` files: snap download resumes them
        if not stale.name.endswith(".partial") and stale.is_file():
            stale.unlink()
    command = [snap, "download", name, f"--channel={channel}", f"--target-directory={work}"]
    env = dict(os.environ)
    if arch:
        env["UBUNTU_STORE_ARCH"] = arch
    shown = _download_command(name, channel) + (f" (UBUNTU_STORE_ARCH={arch})" if arch else "")
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                              errors="replace", check=False)
    except OSError as exc:
        raise SnapError(f"cannot run `{shown}`: {exc.strerror}") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-5:]
        detail = ": " + " / ".join(said) if said else ""
        raise SnapError(
            f"`{shown}` failed (exit status {done.returncode}){detail}",
            hint=f"check that {name} exists in channel {channel} for this architecture and that "
                 "this machine reaches the Snap Store (api.snapcraft.io), or use --snaps-from")
    found = find_snap(work, name, channel, warn)
    if found is None:
        raise SnapError(f"`{shown}` succeeded but wrote no {name}_<revision>.snap and .assert "
                        f"in {work}")
    snap_target, assert_target = dest / f"{name}.snap", dest / f"{name}.assert"
    try:
        check_name(found.assertions, name, found.snap_path)
        with open(found.snap_path, "rb") as f:
            check_size(found.assertions, os.fstat(f.fileno()).st_size, found.snap_path)
            digests = digest_stream(f)
            check_digests(found.assertions, digests, found.snap_path)
            os.fsync(f.fileno())
        with open(found.assert_path, "rb") as f:
            os.fsync(f.fileno())
    except SnapError:
        for path in (found.snap_path, found.assert_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    os.replace(found.snap_path, snap_target)
    os.replace(found.assert_path, assert_target)
    fsync_dir(dest)
    stored = found.assertions
    with contextlib.suppress(OSError):
        shutil.rmtree(work)
        (dest / DOWNLOAD_FOLDER).rmdir()
    state[name] = {"channel": channel, "architecture": effective_arch,
                   "revision": stored.revision, "sha3_384": stored.sha3_384}
    _save_state(dest, state)
    return _result(role, channel, effective_arch, "snap download", "downloaded",
                   SnapAssertions.read(assert_target), digests, snap_target, assert_target)


def _load_state(dest: Path) -> dict[str, object]:
    try:
        data = json.loads((dest / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    snaps = data.get("snaps") if isinstance(data, dict) else None
    return dict(snaps) if isinstance(snaps, dict) else {}


def _save_state(dest: Path, snaps: dict[str, object]) -> None:
    text = json.dumps({"version": 1, "snaps": snaps}, indent=2, sort_keys=True) + "\n"
    atomic_write(dest / STATE_FILE, text.encode())


def _forget(dest: Path, name: str) -> None:
    state = _load_state(dest)
    if name in state:
        del state[name]
        _save_state(dest, state)
