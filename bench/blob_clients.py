"""N concurrent HTTP clients GETting registry blobs for a fixed time (the registry benchmark).

    python -m bench.blob_clients '{"base": "http://127.0.0.1:PORT", "clients": 32,
                                   "seconds": 5, "targets": [["/v2/REPO/blobs/DIGEST", SIZE]]}'

Client i fetches target i % len(targets) again and again, reading each body in 1 MiB chunks
and dropping it, until the time is up (a request in flight then finishes). Every body must
have the target's size. Prints JSON: bytes, seconds, requests, errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def client(session: aiohttp.ClientSession, url: str, size: int, deadline: float,
                 totals: dict[str, int]) -> None:
    while time.perf_counter() < deadline:
        try:
            async with session.get(url) as response:
                got = 0
                while chunk := await response.content.read(1 << 20):
                    got += len(chunk)
                if response.status != 200 or got != size:
                    totals["errors"] += 1
                    continue
        except aiohttp.ClientError:
            totals["errors"] += 1
            continue
        totals["bytes"] += got
        totals["requests"] += 1


async def main(spec: dict[str, object]) -> dict[str, float]:
    base = str(spec["base"])
    targets = [(base + str(path), int(size)) for path, size in spec["targets"]]  # type: ignore[attr-defined]
    clients = int(spec["clients"])  # type: ignore[call-overload]
    totals = {"bytes": 0, "requests": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        start = time.perf_counter()
        deadline = start + float(spec["seconds"])  # type: ignore[arg-type]
        await asyncio.gather(*(client(session, *targets[i % len(targets)], deadline, totals)
                               for i in range(clients)))
        seconds = time.perf_counter() - start
    return {**totals, "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
