"""Shared pieces of the reliability tests: one small image in a real registry, `FaultProxy`s
in front of it (in a thread, so `gapkit` subprocesses go through them), and checks that a result
is byte-for-byte right (by skopeo, which verifies every blob it reads) or absent."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.faults import FaultProxy, running
from tests.support.images import ImageSpec, Layer, make_layer, write_layout
from tests.support.peers import Registry

#: Above gapkit's 1 MiB monolithic limit, so pushes of it stream through one PATCH.
BIG = 2_000_000
SMALL = 200_000
REPOSITORY = "demo/app"
TAG = "v1"


@dataclass
class Source:
    registry: Registry
    layout: Path
    digest: str
    big: Layer
    small: Layer
    #: digest -> size of every blob of the image (config and layers, not the manifest)
    blobs: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.blobs.values())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """`demo/app:v1` (a config, a 200 kB and a 2 MB layer) in a real docker-registry."""
    folder = tmp_path_factory.mktemp("reliability-source")
    big, small = make_layer(71, BIG), make_layer(72, SMALL)
    layout = folder / "layout"
    digest = write_layout(layout, [ImageSpec("app", [small, big])])["app"]
    doc = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())
    blobs = {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]}
    registry = Registry(folder / "registry").start()
    try:
        registry.push_layout(layout, "app", f"{REPOSITORY}:{TAG}")
        yield Source(registry, layout, digest, big, small, blobs)
    finally:
        registry.stop()


@pytest.fixture
def proxy_for() -> Iterator[Callable[[Registry], FaultProxy]]:
    """Start a `FaultProxy` (in its own thread) in front of a registry; stopped at the end."""
    with ExitStack() as stack:
        yield lambda registry: stack.enter_context(running(FaultProxy(registry.url)))


@pytest.fixture
def proxy(source: Source, proxy_for: Callable[[Registry], FaultProxy]) -> FaultProxy:
    return proxy_for(source.registry)


def manifest_digest(location: str) -> str:
    """The digest of the manifest skopeo reads at `location` (`oci:DIR:REF`, …)."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", location], capture_output=True,
                         check=True).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def skopeo_reads(location: str, folder: Path, *flags: str) -> str:
    """skopeo copies `location` (checking every blob's digest) and returns the manifest digest."""
    subprocess.run(["skopeo", "copy", "--quiet", *flags, location, f"dir:{folder}"],
                   capture_output=True, check=True)
    return "sha256:" + hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def dot_files(folder: Path) -> list[Path]:
    """Every file or folder under `folder` whose name starts with '.' (temp files)."""
    return sorted(p for p in folder.rglob(".*"))


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "--debug" not in stderr, stderr  # the internal-error (bug) message
