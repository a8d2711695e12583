"""One gapkit process copying many images, through gapkit's library API.

This times gapkit's copy engine on the whole workload in one run, without the CLI (it was
written when `gapkit copy` took one registry image per invocation; `gapkit copy SRC... DST`
now takes many, and the benchmark times that form too, beside this one):

    python -m bench.multi_copy --src 'docker://127.0.0.1:PORT/{repo}' --dst 'oci:DIR:{name}' \
        [--plain-http 127.0.0.1:PORT] [--jobs N] [--cprofile FILE] NAME...

`{name}` is the image's full name (`docker.io/calico/cni:v3.28.1`), `{repo}` the same without
the registry host (`calico/cni:v3.28.1`). Every platform is copied (as `--all-platforms`).
It uses the same pieces as `gapkit copy`: `Location.parse`, `open_store` and one `copy()` call
with one `CopyRequest` per image, so blobs shared between images are fetched once.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import json
import sys
from typing import Any

from gapkit.oci.copy import CopyRequest, copy
from gapkit.oci.stores.base import Store
from gapkit.oci.stores.options import DEFAULT_JOBS
from gapkit.oci.transports import Location, open_store, registry_settings_from_flags


async def _maybe_await(value: Any) -> Any:
    """`open_store` became a coroutine function during development; take either form."""
    if inspect.isawaitable(value):
        return await value
    return value


def _expand(template: str, name: str) -> str:
    return template.format(name=name, repo=name.split("/", 1)[1])


async def copy_many(src: str, dst: str, names: list[str], plain_http: list[str], jobs: int) -> dict[str, int]:
    settings = registry_settings_from_flags(plain_http)
    sources = [Location.parse(_expand(src, n)) for n in names]
    destinations = [Location.parse(_expand(dst, n)) for n in names]
    requests = []
    for s, d in zip(sources, destinations, strict=True):
        assert s.reference is not None and d.reference is not None
        requests.append(CopyRequest(s.reference, d.reference))
    source_store: Store = await _maybe_await(open_store(sources[0], "source", settings))
    destination_store: Store = await _maybe_await(open_store(destinations[0], "destination", settings))
    try:
        report = await copy(source_store, destination_store, requests, None, jobs)
    finally:
        await destination_store.close()
        await source_store.close()
    return {"images": len(report.images), "blobs_copied": report.blobs_copied,
            "bytes_copied": report.bytes_copied, "blobs_present": report.blobs_present,
            "blobs_mounted": report.blobs_mounted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multi_copy")
    parser.add_argument("--src", required=True, help="location template with {name} or {repo}")
    parser.add_argument("--dst", required=True, help="location template with {name} or {repo}")
    parser.add_argument("--plain-http", action="append", default=[])
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    parser.add_argument("--cprofile", help="write cProfile stats of the run to this file")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    run = copy_many(args.src, args.dst, args.names, args.plain_http, args.jobs)
    if args.cprofile:
        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, run)
        profiler.dump_stats(args.cprofile)
    else:
        result = asyncio.run(run)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
