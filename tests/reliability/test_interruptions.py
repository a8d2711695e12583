"""`gapkit copy`, `bundle create` and `registry push` killed (SIGKILL) at byte-exact points.

A `pause` fault in the `FaultProxy` between gapkit and a real docker-registry lets exactly 10%,
50% or 90% of the image's bytes through, then holds every connection; the test kills gapkit
there and runs the same command again through the proxy. The rerun must finish, its result must
verify (skopeo, `bundle verify`), no temp file may survive it, and what it transfers again must
be at most the blobs that were in flight at the kill: a blob that was complete is not fetched
or uploaded again, and at most `--jobs` blobs were in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import gapkit
from tests.support.faults import Fault, FaultProxy
from tests.support.images import ImageSpec, make_layer, partial_bundle_blobs, write_layout
from tests.support.peers import Registry
from tests.support.reliability import Source, dot_files, one_image_bundle, skopeo_reads

REPOSITORY = "demo/many"
TAG = "v1"
IMAGE = f"docker.io/{REPOSITORY}:{TAG}"
JOBS = 2
#: Distinct sizes, so an upload session's Content-Length names its blob; the first streams.
LAYER_SIZES = (1_200_000, 500_000, 400_000, 300_000, 200_000)
FRACTIONS = (0.1, 0.5, 0.9)


@dataclass
class Many:
    digest: str
    #: digest -> size of the config and every layer
    blobs: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.blobs.values())

    def by_size(self) -> dict[int, str]:
        return {size: digest for digest, size in self.blobs.items()}


@pytest.fixture(scope="module")
def many(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Many:
    """`demo/many:v1`, five layers, in the module's source registry."""
    layout = tmp_path_factory.mktemp("many") / "layout"
    layers = [make_layer(300 + i, size) for i, size in enumerate(LAYER_SIZES)]
    digest = write_layout(layout, [ImageSpec("many", layers)])["many"]
    source.registry.push_layout(layout, "many", f"{REPOSITORY}:{TAG}")
    doc = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())
    blobs = {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]}
    assert len(set(blobs.values())) == len(blobs)
    return Many(digest, blobs)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gapkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_at(proxy: FaultProxy, fraction: float, many: Many, args: list[str]) -> None:
    """Run gapkit until `fraction` of the image's blob bytes went through, then SIGKILL it."""
    pause = proxy.add(Fault("pause", after=int(fraction * many.total)))
    process = start(*args)
    try:
        assert pause.reached.wait(60), "gapkit never got that far"
        assert process.poll() is None, "gapkit finished before the kill point"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def per_blob(proxy: FaultProxy, many: Many) -> Counter[str]:
    """Body bytes the proxy passed for each blob: downloads by path, uploads by the size their
    session announced (Content-Length of its PUT or PATCH)."""
    out: Counter[str] = Counter()
    for path, count in proxy.downloaded.items():
        digest = path.rsplit("/", 1)[-1]
        if digest in many.blobs:
            out[digest] += count
    sizes = many.by_size()
    session_blob = {r.path: sizes[int(r.headers["Content-Length"])] for r in proxy.requests
                    if r.method in ("PUT", "PATCH") and "/blobs/uploads/" in r.path
                    and int(r.headers.get("Content-Length", "0")) in sizes}
    for path, count in proxy.uploaded.items():
        if path in session_blob:
            out[session_blob[path]] += count
        else:
            assert count == 0 or "/manifests/" in path, f"unknown upload {path}: {count} bytes"
    return out


def check_refetch(first: Counter[str], again: Counter[str], complete: set[str],
                  many: Many) -> int:
    """What the rerun moved again is at most the blobs in flight at the kill; returns how many
    were in flight."""
    assert not complete & set(again), f"complete blobs sent again: {complete & set(again)}"
    started = {d for d, n in first.items() if n > 0}
    in_flight = started - complete
    assert len(in_flight) <= JOBS, f"{len(in_flight)} blobs in flight with --jobs {JOBS}"
    again_of_started = sum(n for d, n in again.items() if d in started)
    assert again_of_started <= sum(many.blobs[d] for d in in_flight), (first, again)
    missing = set(many.blobs) - complete
    assert set(again) == missing, "the rerun must move every missing blob, and only those"
    assert all(again[d] == many.blobs[d] for d in missing), again
    return len(in_flight)


def layout_blobs(root: Path) -> set[str]:
    folder = root / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in folder.iterdir() if not p.name.startswith(".")} \
        if folder.is_dir() else set()


@pytest.fixture
def proxy_for_many(source: Source, many: Many,
                   proxy_for: Callable[[Registry], FaultProxy]) -> FaultProxy:
    return proxy_for(source.registry)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_copy_killed_at_a_byte_resumes_and_fetches_again_only_what_was_in_flight(
        fraction: float, many: Many, proxy_for_many: FaultProxy, tmp_path: Path) -> None:
    proxy = proxy_for_many
    layout = tmp_path / "layout"
    ref = f"{proxy.host}/{REPOSITORY}:{TAG}"
    args = ["copy", "--jobs", str(JOBS), "--plain-http", proxy.host, f"docker://{ref}",
            f"oci:{layout}", "--json"]
    kill_at(proxy, fraction, many, args)
    first = per_blob(proxy, many)
    complete = layout_blobs(layout) & set(many.blobs)
    proxy.clear()

    report = json.loads(gapkit(*args).stdout)
    again = per_blob(proxy, many)
    check_refetch(first, again, complete, many)
    assert report["blobs_present"] == len(complete)
    assert report["bytes_copied"] == sum(again.values())
    assert skopeo_reads(f"oci:{layout}:{ref}", tmp_path / "read") == many.digest
    assert dot_files(tmp_path) == []


def test_copy_into_an_archive_killed_midway_leaves_no_temp_file_after_the_rerun(
        many: Many, proxy_for_many: FaultProxy, tmp_path: Path) -> None:
    """An archive is written in one go: the rerun starts it again (nothing of the killed run's
    temp file is reused), and sweeps that temp file."""
    proxy = proxy_for_many
    archive = tmp_path / "out" / "images.tar"
    archive.parent.mkdir()
    ref = f"{proxy.host}/{REPOSITORY}:{TAG}"
    args = ["copy", "--jobs", str(JOBS), "--plain-http", proxy.host, f"docker://{ref}",
            f"oci-archive:{archive}", "--json"]
    kill_at(proxy, 0.5, many, args)
    assert not archive.exists() and len(dot_files(archive.parent)) == 1
    proxy.clear()

    gapkit(*args)
    assert skopeo_reads(f"oci-archive:{archive}:{ref}", tmp_path / "read") == many.digest
    assert dot_files(tmp_path) == []


def bundle_args(proxy: FaultProxy, cache: Path, output: Path) -> list[str]:
    """`gapkit bundle create` of the image through the proxy, as docker.io's mirror."""
    return ["bundle", "create", "--no-snaps", f"--image={IMAGE}", "--platform=linux/amd64",
            f"--mirror=docker.io=http://{proxy.host}", "--jobs", str(JOBS),
            "--cache", str(cache), "-o", str(output), "--json"]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_bundle_create_killed_at_a_byte_resumes_from_its_cache(
        fraction: float, many: Many, proxy_for_many: FaultProxy, tmp_path: Path) -> None:
    proxy = proxy_for_many
    output, cache = tmp_path / "out" / "bundle.tar", tmp_path / "cache"
    args = bundle_args(proxy, cache, output)
    kill_at(proxy, fraction, many, args)
    first = per_blob(proxy, many)
    complete = set(partial_bundle_blobs(cache)) & set(many.blobs)
    assert not output.exists()
    proxy.clear()

    report = json.loads(gapkit(*args).stdout)
    again = per_blob(proxy, many)
    check_refetch(first, again, complete, many)
    assert report["fetched"]["blobs_present"] == len(complete)
    assert report["manifest"]["images"][0]["digest"] == many.digest
    gapkit("bundle", "verify", str(output))
    assert skopeo_reads(f"oci-archive:{output}:{IMAGE}", tmp_path / "read") == many.digest
    assert dot_files(tmp_path) == []
    assert list((cache / "partial").iterdir()) == []  # the killed run's partial is used up


def test_bundle_create_stopped_by_ctrl_c_says_where_its_blobs_are_and_the_rerun_takes_them(
        many: Many, proxy_for_many: FaultProxy, tmp_path: Path) -> None:
    """SIGINT halfway: exit 130 with the partial bundle named and the interrupted message (typer
    turned Ctrl-C into a silent exit 130), no traceback; the rerun fetches only the rest."""
    proxy = proxy_for_many
    output, cache = tmp_path / "out" / "bundle.tar", tmp_path / "cache"
    args = bundle_args(proxy, cache, output)
    pause = proxy.add(Fault("pause", after=many.total // 2))
    process = start(*args)
    try:
        assert pause.reached.wait(60), "gapkit never got that far"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    kept = list((cache / "partial").iterdir())
    assert len(kept) == 1 and f"is kept in {kept[0]}: run the same command again" in stderr
    assert stderr.rstrip().endswith(
        "error: interrupted; what was complete is kept, run the command again to finish")
    assert not output.exists()
    complete = set(partial_bundle_blobs(cache)) & set(many.blobs)
    first = per_blob(proxy, many)
    proxy.clear()

    report = json.loads(gapkit(*args).stdout)
    check_refetch(first, per_blob(proxy, many), complete, many)
    assert report["fetched"]["blobs_reused"] == len(complete) >= 1
    gapkit("bundle", "verify", str(output))
    assert list((cache / "partial").iterdir()) == []


@pytest.fixture(scope="module")
def many_bundle(source: Source, many: Many, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_image_bundle(source, IMAGE, tmp_path_factory.mktemp("many-bundle"))


@pytest.fixture
def push_proxy(registry: Registry, proxy_for: Callable[[Registry], FaultProxy]) -> FaultProxy:
    return proxy_for(registry)


def registry_blobs(registry: Registry, many: Many) -> set[str]:
    return {d for d in many.blobs
            if registry.request(f"/v2/{REPOSITORY}/blobs/{d}", method="HEAD")[0] == 200}


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_registry_push_killed_at_a_byte_resumes_and_uploads_again_only_what_was_in_flight(
        fraction: float, many: Many, many_bundle: Path, registry: Registry,
        push_proxy: FaultProxy, tmp_path: Path) -> None:
    proxy = push_proxy
    args = ["registry", "push", str(many_bundle), "--to", proxy.host, "--plain-http",
            "--jobs", str(JOBS), "--json"]
    kill_at(proxy, fraction, many, args)
    first = per_blob(proxy, many)
    proxy.clear()
    proxy.wait_idle()
    complete = registry_blobs(registry, many)

    report = json.loads(gapkit(*args).stdout)
    again = per_blob(proxy, many)
    check_refetch(first, again, complete, many)
    assert report["blobs_present"] == len(complete)
    assert report["bytes_copied"] == sum(again.values())
    pushed = f"docker://{registry.host}/{REPOSITORY}:{TAG}"
    assert skopeo_reads(pushed, tmp_path / "read", "--src-tls-verify=false") == many.digest
    assert dot_files(many_bundle.parent) == []
