"""A fault-injecting reverse proxy in front of a real registry, for retry and resume tests.

`FaultProxy` forwards every request to the registry behind it on a free loopback port, keeping
the `Host` header so that the registry's upload `Location` headers point back at the proxy. It
runs in the test's event loop (`await proxy.start()`), or in a thread of its own with
`running(proxy)`, so that a `gapkit` subprocess can go through it. It records what it saw
(method, path, query, headers) and counts the body bytes it forwarded per path, both ways
(`downloaded`: responses, `uploaded`: request bodies), so tests can tell what was fetched again.

`Fault`s make it misbehave a chosen number of times:

- `reset`: pass `after` body bytes, then drop the connection (RST);
- `stall`: pass `after` body bytes, then send nothing for `seconds`, then drop it;
- `truncate`: send the full `Content-Length`, pass `after` body bytes, then close the
  connection cleanly (FIN), as a proxy that gave up does;
- `trickle`: pass the body in `piece`-byte pieces with `seconds` between them;
- `status`: answer `status` (503, 429, 500…) with `headers` (`Retry-After`) without forwarding;
- `corrupt`: flip the byte at offset `after`;
- `ignore_range`: drop the request's `Range` (answer 200 with the whole body);
- `paginate`: docker-registry 2.8 ignores `n` and `last` on `tags/list`; this slices its full
  answer and adds the `Link` header the way distribution 3, Docker Hub and quay.io do;
- `pause`: counted across the whole proxy, not per request: once `after` body bytes (both ways,
  every path, counted from when the fault was added) have passed, it sets `fault.reached` (a
  `threading.Event`) and holds every connection, so nothing more passes until `release()`.
  A test waits for `reached` and SIGKILLs the client at that byte-exact point. `path` and
  `method` are ignored for `pause`.

Faults whose `method` matches and whose `path` regex matches apply to the body they name: the
response body, or for `reset`, `stall`, `truncate` and `trickle` of a `PUT`/`PATCH`/`POST`, the
request body being uploaded (the connection is dropped, or the body slowed, part-way through the
upload; only bodies longer than `after` match, so a small config blob does not use up a fault
meant for a layer). With `prefix` it serves the registry under a path prefix, as a mirror URL
such as `http://host/cache` does.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

FaultKind = Literal["reset", "status", "stall", "corrupt", "ignore_range", "paginate",
                    "trickle", "truncate", "pause"]
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailers", "transfer-encoding", "upgrade"})
_UPLOAD_METHODS = frozenset({"PUT", "PATCH", "POST"})
_BODY_KINDS = frozenset({"reset", "stall", "truncate", "trickle"})


@dataclass
class Fault:
    """Misbehave on requests whose method matches and whose path matches `path` (a regex)."""

    kind: FaultKind
    method: str = "GET"
    path: str = ""
    #: How many matching requests misbehave; later ones pass through untouched.
    times: int = 1
    #: Body bytes passed on before a reset, stall, truncation, flipped byte or pause.
    after: int = 0
    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    #: How long a stall lasts before the connection is dropped; the gap between trickled pieces.
    seconds: float = 5.0
    #: Bytes per trickled piece.
    piece: int = 16 * 1024
    fired: int = 0
    #: Set when a `pause` fault has let its `after` bytes through.
    reached: threading.Event = field(default_factory=threading.Event)
    #: Proxy-wide body bytes already counted when a `pause` fault was added.
    base: int = 0

    def matches(self, method: str, path: str, body_size: int) -> bool:
        """`body_size`: the request's Content-Length; a fault on an upload (`reset`, `stall`,
        `truncate`, `trickle` of a PUT, PATCH or POST) matches only a body longer than `after`."""
        if self.kind == "pause" or self.fired >= self.times or method != self.method:
            return False
        if (method in _UPLOAD_METHODS and self.kind in _BODY_KINDS
                and body_size <= self.after):
            return False
        return re.search(self.path, path) is not None


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]


class _Dropped(Exception):
    """The proxy dropped the connection on purpose."""


class _Hold:
    """What connections held by a `pause` wait for; `drop` says to close them then."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.drop = False


class FaultProxy:
    """A recording, fault-injecting HTTP reverse proxy on 127.0.0.1 (see the module doc)."""

    def __init__(self, upstream: str, prefix: str = "") -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix.rstrip("/")
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        #: Response body bytes sent to clients, per path (without the prefix and query).
        self.downloaded: Counter[str] = Counter()
        #: Request body bytes passed on to the registry, per path.
        self.uploaded: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: _Hold | None = None
        self._lock = threading.RLock()
        self._active = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}{self.prefix}"

    @property
    def total(self) -> int:
        """Body bytes forwarded so far, both ways, every path."""
        with self._lock:
            return sum(self.downloaded.values()) + sum(self.uploaded.values())

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            if fault.kind == "pause":
                fault.base = self.total
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forget the faults and counts (not the requests seen), and drop the connections a
        `pause` held: after a kill, what the dead client left in their buffers must not pass
        (and be counted) later."""
        with self._lock:
            self.faults.clear()
            self.downloaded.clear()
            self.uploaded.clear()
        self.release(drop=True)

    def release(self, drop: bool = False) -> None:
        """Let connections held by a `pause` go on, or with `drop`, close them (any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._release_now, drop)

    def seen(self, method: str | None = None, path: str = "") -> list[Seen]:
        """Requests with this method (any if None) whose path matches the regex `path`."""
        return [r for r in self.requests
                if (method is None or r.method == method) and re.search(path, r.path)]

    async def start(self) -> FaultProxy:
        self._loop = asyncio.get_running_loop()
        self._released = _Hold()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5, read_bufsize=16 * 1024)
        await self._runner.setup()
        # Small buffers (kernel and aiohttp): what a client uploads faster than the proxy passes
        # it on waits in the client's own send queue, as on a slow link, not in the proxy.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        self._release_now(drop=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _fault_for(self, method: str, path: str, body_size: int) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path, body_size):
                    fault.fired += 1
                    return fault
        return None

    async def _budget(self, size: int) -> int:
        """How many of the next `size` body bytes may pass before an armed `pause`; once one is
        reached, hold (every connection) until `release()`."""
        while True:
            with self._lock:
                armed = [f for f in self.faults if f.kind == "pause" and f.fired == 0]
                total = self.total
                left = min((f.base + f.after - total for f in armed), default=None)
                if left is None:
                    return size
                if left > 0:
                    return min(size, left)
                for fault in armed:
                    if fault.base + fault.after <= total:
                        fault.reached.set()
                released = self._released
            assert released is not None
            await released.event.wait()
            if released.drop:
                raise _Dropped

    def _release_now(self, drop: bool) -> None:
        with self._lock:
            for fault in self.faults:
                if fault.kind == "pause" and fault.reached.is_set():
                    fault.fired = fault.times
        if self._released is not None:
            self._released.drop = drop
            self._released.event.set()
            self._released = _Hold()

    async def _pass(self, data: bytes, counter: Counter[str], path: str) -> AsyncIterator[bytes]:
        """`data` in the pieces a `pause` lets through, counted as they go."""
        while data:
            allowed = await self._budget(len(data))
            piece, data = data[:allowed], data[allowed:]
            with self._lock:
                counter[path] += len(piece)
            yield piece

    async def _upload(self, request: web.Request, path: str,
                      fault: Fault | None) -> AsyncIterator[bytes]:
        try:
            async for piece in self._upload_pieces(request, path, fault):
                yield piece
        except _Dropped:
            if request.transport is not None and not request.transport.is_closing():
                request.transport.abort()
            raise

    async def _upload_pieces(self, request: web.Request, path: str,
                             fault: Fault | None) -> AsyncIterator[bytes]:
        if fault is not None and fault.kind == "trickle":
            # Read no faster than the trickle, so the rest waits in the client's send queue.
            while data := await request.content.read(fault.piece):
                async for piece in self._pass(data, self.uploaded, path):
                    yield piece
                await asyncio.sleep(fault.seconds)
            return
        sent = 0
        async for chunk in request.content.iter_any():
            if fault is not None and fault.kind in ("reset", "stall", "truncate") \
                    and sent + len(chunk) > fault.after:
                async for piece in self._pass(chunk[:fault.after - sent], self.uploaded, path):
                    yield piece
                await _break(request, fault)
                raise _Dropped
            async for piece in self._pass(chunk, self.uploaded, path):
                sent += len(piece)
                yield piece

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Block (a test's thread) until no request is being handled, so that what the registry
        behind holds no longer changes."""
        deadline = time.monotonic() + timeout
        while self._active:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxy still handles {self._active} request(s)")
            time.sleep(0.02)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._active += 1
        try:
            return await self._forward(request)
        finally:
            self._active -= 1

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return web.Response(status=404, text="outside the mirror's prefix")
            path = path[len(self.prefix):]
        self.requests.append(Seen(request.method, path, dict(request.query),
                                  dict(request.headers)))
        length = request.headers.get("Content-Length", "")
        fault = self._fault_for(request.method, path, int(length) if length.isdigit() else 0)
        if fault is not None and fault.kind == "status":
            return web.Response(status=fault.status, headers=dict(fault.headers),
                                text='{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}',
                                content_type="application/json")
        # Every value of a repeated header (skopeo sends one Accept per media type).
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in _HOP_BY_HOP)
        if fault is not None and fault.kind == "paginate":
            return await self._paginate(request, path, headers)
        if fault is not None and fault.kind == "ignore_range":
            headers.popall("Range", None)
        target = URL(self.upstream + path + (f"?{request.query_string}"
                                             if request.query_string else ""), encoded=True)
        assert self._session is not None
        upload_fault = fault if request.method in _UPLOAD_METHODS else None
        data = self._upload(request, path, upload_fault) if request.body_exists else None
        try:
            async with self._session.request(request.method, target, headers=headers, data=data,
                                             allow_redirects=False) as upstream:
                return await self._respond(request, path, upstream,
                                           None if upload_fault else fault)
        except _Dropped:
            return web.Response(status=499)
        except aiohttp.ClientError:
            if upload_fault is not None or request.transport is None \
                    or request.transport.is_closing():  # the upload was cut on purpose
                return web.Response(status=499)
            raise

    async def _respond(self, request: web.Request, path: str, upstream: aiohttp.ClientResponse,
                       fault: Fault | None) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers={
            k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
        await response.prepare(request)
        try:
            return await self._respond_body(request, path, upstream, fault, response)
        except _Dropped:
            assert request.transport is not None
            request.transport.abort()
            return response

    async def _respond_body(self, request: web.Request, path: str,
                            upstream: aiohttp.ClientResponse, fault: Fault | None,
                            response: web.StreamResponse) -> web.StreamResponse:
        sent = 0
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            if fault is not None and fault.kind == "trickle":
                for start in range(0, len(chunk), fault.piece):
                    async for piece in self._pass(chunk[start:start + fault.piece],
                                                  self.downloaded, path):
                        await response.write(piece)
                    await asyncio.sleep(fault.seconds)
                sent += len(chunk)
                continue
            if fault is not None and sent + len(chunk) > fault.after:
                cut = fault.after - sent
                if fault.kind == "corrupt":
                    chunk = chunk[:cut] + bytes([chunk[cut] ^ 0xFF]) + chunk[cut + 1:]
                    fault = None
                elif fault.kind in ("reset", "stall", "truncate"):
                    async for piece in self._pass(chunk[:cut], self.downloaded, path):
                        await response.write(piece)
                    await _break(request, fault)
                    return response
            async for piece in self._pass(chunk, self.downloaded, path):
                await response.write(piece)
            sent += len(chunk)
        await response.write_eof()
        return response

    async def _paginate(self, request: web.Request, path: str,
                        headers: CIMultiDict[str]) -> web.Response:
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


@contextmanager
def running(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """Run `proxy` in a thread with its own event loop (for tests that start `gapkit`
    processes); stop it and the thread on the way out, even when the test fails."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"fault-proxy-{id(proxy)}",
                              daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(timeout=15)
        yield proxy
    finally:
        try:
            asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(timeout=15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=15)
            loop.close()


async def _break(request: web.Request, fault: Fault) -> None:
    """End a connection part-way: a stall first if asked, then FIN (truncate) or RST."""
    if fault.kind == "stall":
        await asyncio.sleep(fault.seconds)
    assert request.transport is not None
    if fault.kind == "truncate":
        request.transport.close()
    else:
        request.transport.abort()
