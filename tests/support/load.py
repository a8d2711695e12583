"""Many concurrent clients pulling manifests and blobs from a registry for a fixed time, in a
process of their own (the serve load test and `python -m bench load`).

    python -m tests.support.load '{"base": "http://127.0.0.1:PORT", "clients": 64,
        "seconds": 5, "authorization": "Basic ...",
        "targets": [{"path": "/v2/REPO/manifests/TAG?ns=docker.io", "digest": "sha256:...",
                     "accept": "application/vnd.oci.image.manifest.v1+json"}, ...]}'

Client i walks the targets from target i on, again and again, until the time is up (requests
in flight then finish): a GET each (with `Accept` when the target gives one, and
`Authorization` when the spec does), over keep-alive connections (one per client at most).
Each answer must be 200 with exactly the target's bytes (their sha256 is the target's digest);
anything else counts as an error, and the first few are kept as samples. Prints JSON:
requests, errors, error_samples, bytes, seconds, rps, p50_ms, p99_ms, max_ms.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from typing import Any

import aiohttp

MAX_SAMPLES = 10


class Totals:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.samples: list[str] = []
        self.bytes = 0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(what)


async def client(session: aiohttp.ClientSession, base: str, targets: list[dict[str, str]],
                 first: int, deadline: float, headers: dict[str, str], totals: Totals) -> None:
    i = first
    while time.perf_counter() < deadline:
        target = targets[i % len(targets)]
        i += 1
        wanted = dict(headers)
        if target.get("accept"):
            wanted["Accept"] = target["accept"]
        started = time.perf_counter()
        try:
            async with session.get(base + target["path"], headers=wanted) as response:
                body = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            totals.error(f"{target['path']}: {type(exc).__name__}: {exc}")
            continue
        totals.latencies.append(time.perf_counter() - started)
        if response.status != 200:
            totals.error(f"{target['path']}: {response.status} {body[:200]!r}")
        elif "sha256:" + hashlib.sha256(body).hexdigest() != target["digest"]:
            totals.error(f"{target['path']}: {len(body)} bytes that are not {target['digest']}")
        else:
            totals.bytes += len(body)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    base = str(spec["base"])
    targets: list[dict[str, str]] = spec["targets"]
    clients = int(spec["clients"])
    headers = {"Authorization": spec["authorization"]} if spec.get("authorization") else {}
    totals = Totals()
    timeout = aiohttp.ClientTimeout(total=float(spec.get("timeout", 30)))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:
        started = time.perf_counter()
        deadline = started + float(spec["seconds"])
        await asyncio.gather(*(client(session, base, targets, i, deadline, headers, totals)
                               for i in range(clients)))
        seconds = time.perf_counter() - started
    ms = [s * 1000 for s in totals.latencies]
    return {"requests": len(ms), "errors": totals.errors, "error_samples": totals.samples,
            "bytes": totals.bytes, "seconds": seconds, "rps": len(ms) / seconds,
            "p50_ms": percentile(ms, 0.50), "p99_ms": percentile(ms, 0.99),
            "max_ms": max(ms, default=0.0)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
