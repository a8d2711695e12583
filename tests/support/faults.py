"""A fault-injecting reverse proxy in front of a real registry, for retry and resume tests.

`FaultProxy` runs in the test's event loop on a free loopback port and forwards every request
to the registry behind it, keeping the `Host` header so that the registry's upload `Location`
headers point back at the proxy. It records what it saw (method, path, query, headers), and
`Fault`s make it misbehave a chosen number of times: reset the connection part-way through a
body, answer a status (503 with `Retry-After`, 429) without forwarding, stall, flip a byte,
ignore `Range` (answer 200 with the whole body), or paginate a tag list. docker-registry 2.8
ignores `n` and `last` on `tags/list`; "paginate" slices its full answer and adds the `Link`
header the way distribution 3, Docker Hub and quay.io do. With `prefix` it serves the registry
under a path prefix, as a mirror URL such as `http://host/cache` does.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web
from yarl import URL

from tests.support.peers import free_port

FaultKind = Literal["reset", "status", "stall", "corrupt", "ignore_range", "paginate"]
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailers", "transfer-encoding", "upgrade"})


@dataclass
class Fault:
    """Misbehave on requests whose method matches and whose path matches `path` (a regex)."""

    kind: FaultKind
    method: str = "GET"
    path: str = ""
    #: How many matching requests misbehave; later ones pass through untouched.
    times: int = 1
    #: Body bytes passed on before a reset, stall or flipped byte.
    after: int = 0
    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    #: How long a stall lasts before the connection is dropped.
    seconds: float = 5.0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.fired < self.times and method == self.method
                and re.search(self.path, path) is not None)


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]


class FaultProxy:
    """A recording, fault-injecting HTTP reverse proxy on 127.0.0.1 (see the module doc)."""

    def __init__(self, upstream: str, prefix: str = "") -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix.rstrip("/")
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}{self.prefix}"

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def seen(self, method: str | None = None, path: str = "") -> list[Seen]:
        """Requests with this method (any if None) whose path matches the regex `path`."""
        return [r for r in self.requests
                if (method is None or r.method == method) and re.search(path, r.path)]

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _fault_for(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.fired += 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return web.Response(status=404, text="outside the mirror's prefix")
            path = path[len(self.prefix):]
        self.requests.append(Seen(request.method, path, dict(request.query),
                                  dict(request.headers)))
        fault = self._fault_for(request.method, path)
        if fault is not None and fault.kind == "status":
            return web.Response(status=fault.status, headers=dict(fault.headers),
                                text='{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}',
                                content_type="application/json")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if fault is not None and fault.kind == "paginate":
            return await self._paginate(request, path, headers)
        if fault is not None and fault.kind == "ignore_range":
            headers.pop("Range", None)
        target = URL(self.upstream + path + (f"?{request.query_string}"
                                             if request.query_string else ""), encoded=True)
        assert self._session is not None
        data = request.content if request.body_exists else None
        async with self._session.request(request.method, target, headers=headers, data=data,
                                         allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
            await response.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if fault is not None and sent + len(chunk) > fault.after:
                    cut = fault.after - sent
                    if fault.kind == "corrupt":
                        chunk = chunk[:cut] + bytes([chunk[cut] ^ 0xFF]) + chunk[cut + 1:]
                        fault = None
                    elif fault.kind in ("reset", "stall"):
                        await response.write(chunk[:cut])
                        if fault.kind == "stall":
                            await asyncio.sleep(fault.seconds)
                        assert request.transport is not None
                        request.transport.abort()
                        return response
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response

    async def _paginate(self, request: web.Request, path: str,
                        headers: dict[str, str]) -> web.Response:
        assert self._session is not None
        async with self._session.get(URL(self.upstream + path, encoded=True),
                                     headers=headers) as upstream:
            doc = await upstream.json(content_type=None)
        tags = sorted(doc.get("tags") or [])
        size = int(request.query.get("n", "100"))
        last = request.query.get("last")
        rest = [t for t in tags if last is None or t > last]
        page = rest[:size]
        response = web.Response(text=json.dumps({"name": doc.get("name"), "tags": page}),
                                content_type="application/json")
        if len(rest) > size:
            response.headers["Link"] = f'<{path}?last={page[-1]}&n={size}>; rel="next"'
        return response
