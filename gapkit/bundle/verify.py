"""`gapkit bundle verify`: prove a bundle is whole before it is used, naming every problem.

The bundle is read in place. Every blob member is hashed (in worker threads: hashlib releases
the GIL, so all cores hash at once), every named image is walked down to its layers for the
bundle's platforms, every snap is checked against bundle.json and its assertion, and
bundle.json is checked against the layout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from gapkit.bundle.bundle_json import (
    BUNDLE_JSON,
    MAX_ASSERTION_SIZE,
    MAX_BUNDLE_JSON_SIZE,
    BundleJson,
    SnapJson,
    exact_bundle_json,
)
from gapkit.errors import GapkitError, StoreError
from gapkit.oci.copy import MAX_INDEX_DEPTH
from gapkit.oci.model import INDEX_MEDIA_TYPES, Descriptor, Digest, Platform
from gapkit.oci.reference import Reference
from gapkit.oci.stores.archive import ArchiveStore

_BLOB_MEMBER = re.compile(r"^blobs/(sha256|sha512)/([0-9a-f]+)$")
#: Read size for hashing: large reads keep the per-call overhead small next to hashing.
_HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass
class VerifyReport:
    path: Path
    problems: list[Problem] = field(default_factory=list)
    images: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    snaps: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {"bundle": str(self.path), "ok": self.ok,
                "problems": [{"subject": p.subject, "message": p.message} for p in self.problems],
                "images": self.images, "blobs": self.blobs, "blob_bytes": self.blob_bytes,
                "snaps": self.snaps, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _Range:
    offset: int
    size: int


def _hash_range(path: Path, where: _Range, algorithms: tuple[str, ...]) -> tuple[str, ...]:
    hashers = [hashlib.new(a) for a in algorithms]
    buffer = bytearray(min(_HASH_CHUNK, max(where.size, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(where.offset)
        left = where.size
        while left > 0:
            n = f.readinto(view[: min(len(buffer), left)])
            if not n:
                raise StoreError(f"{path} ended early while hashing")
            for h in hashers:
                h.update(view[:n])
            left -= n
    return tuple(h.hexdigest() for h in hashers)


def _sha3_b64(hexdigest: str) -> str:
    return base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).decode().rstrip("=")


async def verify_bundle(path: Path, jobs: int | None = None) -> VerifyReport:
    """Check everything in the bundle at `path`; the report lists every problem found."""
    started = time.monotonic()
    report = VerifyReport(path)
    try:
        store = await ArchiveStore.open(path)
    except GapkitError as exc:
        report.problems.append(Problem(str(path), exc.message.removeprefix(str(path)).lstrip(": ")))
        report.seconds = time.monotonic() - started
        return report
    try:
        for message in store.structural_problems():
            report.problems.append(Problem(str(path), message))
        manifest = await _bundle_manifest(store, report)
        platforms = ({Platform.parse(p) for p in manifest["platforms"]} if manifest else None)
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2,
                                thread_name_prefix="gapkit-verify") as pool:
            # Snaps are hashed first, beside the blobs: they are the biggest members, and
            # sha3-384 runs at about a quarter of sha256's speed. Their problems are still
            # reported after those of the blobs and images.
            snaps = _start_snaps(store, pool, manifest) if manifest is not None else []
            try:
                await _check_blobs(store, pool, report)
                await _check_images(store, platforms, manifest, report)
                await _check_snaps(store, snaps, report)
            finally:
                for snap in snaps:
                    snap.cancel()
    finally:
        await store.close()
    report.seconds = time.monotonic() - started
    return report


async def _bundle_manifest(store: ArchiveStore, report: VerifyReport) -> BundleJson | None:
    if BUNDLE_JSON not in store.member_names():
        report.problems.append(Problem(BUNDLE_JSON, "missing: this is not a gapkit bundle, "
                                       "or it was cut short"))
        return None
    try:
        data = await store.read_member(BUNDLE_JSON, MAX_BUNDLE_JSON_SIZE)
    except GapkitError as exc:
        report.problems.append(Problem(BUNDLE_JSON, exc.message))
        return None
    manifest = exact_bundle_json(data)
    return manifest if manifest is not None else _validated(data, report)


def _validated(data: bytes, report: VerifyReport) -> BundleJson | None:
    """bundle.json other than as gapkit writes it: the models decide, and name the problem."""
    from pydantic import ValidationError

    from gapkit.bundle.model import BundleManifest

    try:
        manifest = BundleManifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        report.problems.append(Problem(BUNDLE_JSON, f"invalid at {where or 'top'}: {first['msg']}"))
        return None
    return cast(BundleJson, manifest.model_dump())


async def _check_blobs(store: ArchiveStore, pool: ThreadPoolExecutor,
                       report: VerifyReport) -> None:
    loop = asyncio.get_running_loop()
    blobs: list[tuple[Digest, Path, _Range]] = []
    for name in store.member_names():
        match = _BLOB_MEMBER.match(name)
        if not match:
            continue
        digest = Digest(match[1], match[2])
        location = await store.blob_location(digest)
        if location is None:
            continue
        file, offset, size = location
        report.blobs += 1
        report.blob_bytes += size
        blobs.append((digest, file, _Range(offset, size)))
    # Biggest first: a big blob that starts last keeps one thread hashing while the others
    # idle (in member order, on bench/'s 1 GB bundle, that tail was ~4% of the time on 2
    # threads and ~17% on 4). Results are still taken, and problems reported, in member order.
    futures: dict[int, asyncio.Future[tuple[str, ...]]] = {}
    for i in sorted(range(len(blobs)), key=lambda i: -blobs[i][2].size):
        digest, file, where = blobs[i]
        futures[i] = loop.run_in_executor(pool, _hash_range, file, where, (digest.algorithm,))
    work = [(digest, futures[i]) for i, (digest, _, _) in enumerate(blobs)]
    for digest, future in work:
        try:
            (actual,) = await future
        except (OSError, GapkitError) as exc:
            report.problems.append(Problem(f"blob {digest}", f"cannot be read: {exc}"))
            continue
        if actual != digest.hex:
            report.problems.append(Problem(
                f"blob {digest}", f"damaged: its content hashes to {digest.algorithm}:{actual}"))


async def _check_images(store: ArchiveStore, platforms: set[Platform] | None,
                        manifest: BundleJson | None, report: VerifyReport) -> None:
    names = await store.images()
    report.images = len(names)
    in_layout = {str(ref.with_digest(None)): ref.digest for ref in names}
    # Each manifest is checked once, however many names and indexes list it: listing one
    # index thousands of times, nested, must not make verify do exponential work.
    seen: set[Digest] = set()
    first_name: dict[Digest | None, tuple[str, int]] = {}
    for ref in names:
        name = str(ref.with_digest(None))
        if ref.digest in first_name:
            first, problems = first_name[ref.digest]
            if problems:
                report.problems.append(Problem(name, f"the same manifest as {first}: see above"))
            continue
        before = len(report.problems)
        await _walk_image(store, ref, platforms, report, seen)
        first_name[ref.digest] = (name, len(report.problems) - before)
    if manifest is None:
        return
    listed = {image["reference"]: image["digest"] for image in manifest["images"]}
    for reference, digest in listed.items():
        if reference not in in_layout:
            report.problems.append(Problem(reference, "listed in bundle.json but not in index.json"))
        elif str(in_layout[reference]) != digest:
            report.problems.append(Problem(
                reference, f"bundle.json says {digest}, index.json says {in_layout[reference]}"))
    for reference in in_layout.keys() - listed.keys():
        report.problems.append(Problem(reference, "in index.json but not listed in bundle.json"))


async def _walk_image(store: ArchiveStore, ref: Reference, platforms: set[Platform] | None,
                      report: VerifyReport, seen: set[Digest], depth: int = 0) -> None:
    name = str(ref.with_digest(None)) if depth == 0 else f"{ref.repository}@{ref.digest}"
    try:
        manifest = await store.get_manifest(ref)
    except GapkitError as exc:
        report.problems.append(Problem(name, exc.message))
        return
    if manifest.is_index:
        if depth >= MAX_INDEX_DEPTH:
            report.problems.append(Problem(name, f"indexes nest more than {MAX_INDEX_DEPTH} deep"))
            return
        if platforms is not None:
            wanted = [*manifest.select(frozenset(platforms)),
                      *(d for d in manifest.manifests if d.media_type in INDEX_MEDIA_TYPES)]
        else:
            # Without bundle.json the platforms carried are unknown: check those present.
            wanted = [d for d in manifest.manifests
                      if await store.blob_location(d.digest) is not None]
        if not wanted:
            report.problems.append(Problem(name, "has no manifest for the bundle's platforms"))
        for child in wanted:
            if child.digest in seen:
                continue
            seen.add(child.digest)
            await _walk_image(store, Reference(ref.repository, None, child.digest), platforms,
                              report, seen, depth + 1)
        return
    await _check_present(store, name, manifest.blobs, report)


async def _check_present(store: ArchiveStore, name: str, blobs: Iterable[Descriptor],
                         report: VerifyReport) -> None:
    for blob in blobs:
        if blob.is_foreign:
            continue
        location = await store.blob_location(blob.digest)
        if location is None:
            report.problems.append(Problem(name, f"blob {blob.digest} is missing"))
        elif location[2] != blob.size:
            report.problems.append(Problem(
                name, f"blob {blob.digest} is {location[2]} bytes, the manifest says {blob.size}"))


@dataclass
class _SnapCheck:
    """One snap of bundle.json: a problem found before hashing, or its hashes under way."""

    snap: SnapJson
    problem: Problem | None = None
    size: int = 0
    sha256: asyncio.Future[tuple[str, ...]] | None = None
    sha3_384: asyncio.Future[tuple[str, ...]] | None = None

    def cancel(self) -> None:
        """Drop hashing not started yet (verify stopped on an error); a finished job's own
        error counts as seen, the one that stopped verify is reported."""
        for future in (self.sha256, self.sha3_384):
            if future is None:
                continue
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()


def _start_snaps(store: ArchiveStore, pool: ThreadPoolExecutor,
                 manifest: BundleJson) -> list[_SnapCheck]:
    """Check each snap's members and size, and start hashing those that pass.

    sha256 and sha3-384 are two jobs, so they run on two cores; sha3-384 jobs go first, the
    biggest snap first, since they take longest.
    """
    loop = asyncio.get_running_loop()
    checks: list[_SnapCheck] = []
    members = store.member_names()
    ranges: list[tuple[_SnapCheck, Path, _Range]] = []
    for snap in manifest["snaps"]:
        missing = [m for m in (snap["file"], snap["assertion"]) if m not in members]
        if missing:
            checks.append(_SnapCheck(snap, Problem(snap["name"],
                                                   f"member {', '.join(missing)} is missing")))
            continue
        location = store.member_location(snap["file"])
        assert location is not None
        file, offset, size = location
        if size != snap["size"]:
            checks.append(_SnapCheck(snap, Problem(
                snap["file"], f"is {size} bytes, bundle.json says {snap['size']}")))
            continue
        check = _SnapCheck(snap, size=size)
        checks.append(check)
        ranges.append((check, file, _Range(offset, size)))
    ranges.sort(key=lambda item: -item[2].size)
    for check, file, where in ranges:
        check.sha3_384 = loop.run_in_executor(pool, _hash_range, file, where, ("sha3_384",))
    for check, file, where in ranges:
        check.sha256 = loop.run_in_executor(pool, _hash_range, file, where, ("sha256",))
    return checks


async def _check_snaps(store: ArchiveStore, checks: list[_SnapCheck], report: VerifyReport) -> None:
    if not checks:
        return
    from gapkit.snaps import SnapAssertions, SnapError

    for check in checks:
        report.snaps += 1
        snap, size = check.snap, check.size
        if check.problem is not None:
            report.problems.append(check.problem)
            continue
        assert check.sha256 is not None and check.sha3_384 is not None
        (sha256,) = await check.sha256
        (sha3,) = await check.sha3_384
        if sha256 != snap["sha256"] or _sha3_b64(sha3) != snap["sha3_384"]:
            report.problems.append(Problem(snap["file"], "damaged: its content does not match "
                                           "the digests bundle.json records"))
            continue
        try:
            text = await store.read_member(snap["assertion"], MAX_ASSERTION_SIZE)
            assertions = SnapAssertions.parse(text, snap["assertion"])
        except (GapkitError, SnapError) as exc:
            report.problems.append(Problem(snap["assertion"], exc.message))
            continue
        if assertions.sha3_384 != _sha3_b64(sha3) or assertions.size != size:
            report.problems.append(Problem(
                snap["file"], f"does not match its assertion {snap['assertion']} "
                "(snap-sha3-384 or snap-size differ)"))
