"""Fixtures of the reliability tests: one small image in a real registry, and `FaultProxy`s
in front of it (in a thread, so `gapkit` subprocesses go through them). The checks they share
are in tests/support/reliability.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.support.faults import FaultProxy, running
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.peers import Registry
from tests.support.reliability import BIG, REPOSITORY, SMALL, TAG, Source


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
