"""`gapkit registry serve`: a read-only OCI distribution API over a bundle, image tar or layout.

What it answers (OCI distribution spec, pull side; every answer carries
`Docker-Distribution-API-Version: registry/2.0`):

- `GET /v2/`: 200 `{}`.
- `GET|HEAD /v2/<name>/manifests/<tag|digest>`: the manifest's exact bytes, `Content-Type` its
  media type, `Docker-Content-Digest`, `Content-Length`, `ETag` (and 304 for `If-None-Match`).
- `GET|HEAD /v2/<name>/blobs/<digest>`: the blob, `Content-Type: application/octet-stream`,
  `Docker-Content-Digest`, `Accept-Ranges: bytes`; one `Range` gives 206 with `Content-Range`,
  a range past the end 416 with `Content-Range: bytes */SIZE`; a malformed or multi-part
  `Range` is ignored (200, whole blob), as RFC 9110 allows.
- `GET /v2/<name>/tags/list` and `GET /v2/_catalog`: lexical order, `n` (capped at
  `MAX_PAGE`) and `last`, a `Link: <…>; rel="next"` header while more remain. `_catalog`
  names every repository as `<upstream>/<path>`, which `/v2/<upstream>/<path>/…` serves.
- Errors as OCI error bodies: `NAME_INVALID`, `DIGEST_INVALID` (400), `NAME_UNKNOWN`,
  `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN` (404), `UNAUTHORIZED` (401, with
  `WWW-Authenticate: Basic realm="gapkit"`), `UNSUPPORTED` (405 for every other method: the
  server is read-only), `PAGINATION_NUMBER_INVALID` (400, as distribution names it).

Names: see `gapkit.registry.source.resolve` (`?ns=` from containerd first).

`Accept` (manifests). A client that names manifest media types gets only those; one that names
none (no header, `*/*`, or only other types such as `application/json`) gets what is stored.
When the stored manifest is excluded: requested by tag and an index (OCI or Docker list), the
platform manifest for this server's platform is served instead when its type is accepted (its
own `Content-Type` and `Docker-Content-Digest` say so), as distribution does for Docker
manifest lists; otherwise 404 `MANIFEST_UNKNOWN` whose message names the stored type, as
distribution answers for OCI manifests and indexes. Never a type the client excluded.

Blobs leave with `sendfile(2)` straight from the tar (at the member's offset) or from the
layout's blob file: no copy, no buffer, memory flat however many clients pull. Over TLS
(where sendfile cannot work) they are read with `pread` in a worker thread, 1 MiB at a time.

Before a blob is first served its bytes are hashed (once per server run; concurrent first
requests share one hash; all blobs are also checked in the background from the start). A blob
whose bytes do not match its digest, or whose size differs from what its manifests declare,
is never served: it answers 404 `BLOB_UNKNOWN` with a detail saying the source is damaged,
and the access log says so once, with what it hashes to. A 404 makes containerd try its next
host, where a 5xx would only be retried. Manifests are all checked against their digests when
the server starts; images whose manifests are damaged are reported and not served.

Request limits: aiohttp refuses request lines over 8190 bytes, header fields over 8190 bytes
and more than 100 headers (400); this server answers 414 for a request target over
`MAX_TARGET` bytes and 431 for headers over `MAX_HEADER_BYTES` in total. A connection that
has not sent a whole request `IDLE_TIMEOUT` seconds after it opened (or after its last answer)
is closed, and one that leaves a blob's bytes unacknowledged for `STALL_TIMEOUT` seconds (it
stopped reading) is dropped: slow clients cannot hold the server's file descriptors. A server
out of them anyway answers 503 with `Retry-After` for blobs it cannot open. With
`--htpasswd`, credentials are checked first: every request without them (or with several
Authorization headers) gets the same 401, whatever it asks for. Paths are taken raw (never
percent-decoded): anything outside the spec's grammar, `%2F` and `..` included, is refused
with 400 (or 404 off `/v2/`) before any lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
import traceback
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gapkit.errors import GapkitError, UsageError
from gapkit.oci.model import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, Digest, Manifest, Platform
from gapkit.oci.reference import MAX_NAME_LENGTH, normalise_registry
from gapkit.registry.auth import Htpasswd, challenge
from gapkit.registry.source import (
    BlobLocation,
    RepositoryContent,
    Resolution,
    Source,
    open_blob_fd,
    open_source,
    resolve,
)
from gapkit.registry.tls import TlsFiles, default_state_dir, ensure_auto_tls, server_context

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
#: Entries per page of tags/list and _catalog, at most.
MAX_PAGE = 1000
#: Longest request target (path and query) answered; longer gets 414.
MAX_TARGET = 4096
#: Most header bytes (names and values) answered; more gets 431.
MAX_HEADER_BYTES = 16 * 1024
#: aiohttp's own parser limits (400 beyond them).
PARSER_LIMITS = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}
#: Seconds a connection may go without a whole request (a slow or idle client), counted from
#: its start or the end of its last answer; then it is closed. aiohttp's own default is an
#: hour, which lets slow clients hold every file descriptor the process may open.
IDLE_TIMEOUT = 15.0
#: Seconds a client may leave the bytes sent to it unacknowledged (it stopped reading, or the
#: link is gone) before its connection is dropped (TCP_USER_TIMEOUT, set for blob answers).
STALL_TIMEOUT = 30.0
#: Seconds between two reports that new connections cannot be taken (out of files).
ACCEPT_ERROR_EVERY = 10.0
#: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
SHUTDOWN_GRACE = 5.0
CHUNK = 1024 * 1024
#: errnos that say the process (or the system) is out of a resource for now, not that a file
#: is bad: a blob that cannot be opened for one of them gets a 503, and no verdict.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+"
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?:(?P<kind>manifests|blobs)/(?P<ref>[^/]+)|tags/list)")
_NAME_RE = re.compile(_NAME)
_TAG_RE = re.compile(_TAG)
_DIGEST_RE = re.compile(_DIGEST)
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(?::[0-9]{1,5})?")
_PRINTABLE = re.compile(r"[^\x21-\x7e]")

TlsMode = Literal["auto", "off"]


class _Refusal(Exception):
    """An answer with an OCI error body, raised from anywhere in a handler."""

    def __init__(self, status: int, code: str, message: str, detail: object = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}


@dataclass
class ServeInfo:
    """What a started server serves, for the start-up banner."""

    source: Path
    kind: str
    images: int
    repositories: int
    registries: list[str]
    listen: str
    urls: list[str]
    scheme: str
    tls: TlsFiles | None
    auth: bool
    problems: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.urls[0]

    def hosts_toml(self) -> dict[str, str]:
        """The hosts.toml each node needs for each upstream, pointing at `url`."""
        from gapkit.node.hosts_toml import Mirror, render

        out = {}
        for upstream in self.registries:
            # The CA is copied beside each hosts.toml; containerd reads a relative `ca` there.
            ca = "ca.crt" if self.tls and self.tls.ca else None
            headers = {"Authorization": "Basic <base64 of user:password>"} if self.auth else {}
            out[upstream] = render(upstream, [Mirror(self.url, ca=ca, headers=headers)])
        return out

    def to_json(self) -> dict[str, object]:
        return {"source": str(self.source), "kind": self.kind, "images": self.images,
                "repositories": self.repositories, "registries": self.registries,
                "listen": self.listen, "urls": self.urls,
                "ca": str(self.tls.ca) if self.tls and self.tls.ca else None,
                "auth": self.auth, "problems": self.problems}


def tls_mode(text: str) -> TlsMode:
    if text not in ("auto", "off"):
        raise UsageError(f"--tls {text!r}: write --tls auto or --tls off "
                         "(or give --tls-cert and --tls-key)")
    return "auto" if text == "auto" else "off"


def _error_body(code: str, message: str, detail: object = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT`, `[V6]:PORT` or `:PORT` (every address)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--listen {text!r}: write ADDR:PORT, e.g. 0.0.0.0:5000 or [::]:5000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port_text)


def _accepted(request: web.Request) -> frozenset[str] | None:
    """The manifest media types the client accepts; None when it states no preference."""
    types: set[str] = set()
    for header in request.headers.getall("Accept", []):
        for item in header.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type in ("*/*", "application/*"):
                return None
            if media_type in MANIFEST_MEDIA_TYPES:
                types.add(media_type)
    return frozenset(types) or None


def _clean(text: str, limit: int = 512) -> str:
    """Request text fit for a log line: no spaces, quotes or control characters."""
    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"%{code:02X}" if code < 256 else f"\\u{code:04x}"

    out = _PRINTABLE.sub(escape, text.replace('"', "%22"))
    return out if len(out) <= limit else out[:limit] + "…"


class RegistryServer:
    """The aiohttp application over one indexed `Source`."""

    def __init__(self, source: Source, htpasswd: Htpasswd | None = None,
                 access_log: IO[str] | None = None, verify_ahead: bool = True,
                 platform: Platform | None = None) -> None:
        self.source = source
        self.htpasswd = htpasswd
        self.access_log = access_log
        self.verify_ahead = verify_ahead
        self.platform = platform or Platform.host()
        self._verdicts: dict[Digest, str | None] = {}  # None: good; else what is wrong
        self._pending: dict[Digest, asyncio.Future[str | None]] = {}
        self._warm: asyncio.Task[None] | None = None
        with warnings.catch_warnings():
            # aiohttp 3 deprecates `router=` with 4.0 in view; pyproject pins aiohttp < 4.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.app = web.Application(middlewares=[self._middleware], client_max_size=1024,
                                       router=_OneRoute(self._dispatch))
        self.app.on_response_prepare.append(_api_header)

    # ---- entry --------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        started = time.monotonic()
        request["gapkit.bytes"] = 0
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except _Refusal as refusal:
            response = self._refusal_response(request, refusal)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except (ConnectionError, asyncio.CancelledError):
            status = 499  # the client went away
            raise
        except Exception:
            self._log_line(f"internal error serving {_clean(request.raw_path)}:\n"
                           + traceback.format_exc())
            raise
        finally:
            self._log_access(request, status, time.monotonic() - started)

    def _refusal_response(self, request: web.Request, refusal: _Refusal) -> web.Response:
        body = _error_body(refusal.code, refusal.message, refusal.detail)
        # HEAD: aiohttp sends the headers (Content-Length included) and drops the body.
        response = web.Response(status=refusal.status, headers=refusal.headers,
                                content_type="application/json", body=body)
        if request.method != "HEAD":
            request["gapkit.bytes"] = len(body)
        if refusal.status == 405:
            response.force_close()  # do not read a body nobody will use
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.htpasswd is not None:
            # First, before anything about the request is looked at: without credentials,
            # every request gets the same answer. Several Authorization headers: refused, as
            # a proxy in front may have checked another one than this server would.
            authorization = request.headers.getall("Authorization", [])
            if len(authorization) != 1 or not await self.htpasswd.check(
                    authorization[0], request.remote or ""):
                raise _Refusal(401, "UNAUTHORIZED", "authentication required",
                               headers={"WWW-Authenticate": challenge()})
        target = request.raw_path
        if len(target) > MAX_TARGET:
            raise _Refusal(414, "NAME_INVALID", "the request target is too long")
        if sum(len(k) + len(v) for k, v in request.raw_headers) > MAX_HEADER_BYTES:
            raise _Refusal(431, "UNSUPPORTED", "the request headers are too large")
        if request.method not in ("GET", "HEAD"):
            raise _Refusal(405, "UNSUPPORTED", "this registry is read-only: only GET and HEAD",
                           headers={"Allow": "GET, HEAD"})
        path = target.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            return self._json(request, {})
        if path == "/v2/_catalog":
            return self._catalog(request)
        if not path.startswith("/v2/"):
            raise _Refusal(404, "NAME_UNKNOWN", "not a registry API path")
        match = _ROUTE.fullmatch(path)
        if match is None:
            raise _Refusal(404, "NAME_UNKNOWN", "not a registry API path")
        name = match["name"]
        if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
            raise _Refusal(400, "NAME_INVALID", "invalid repository name",
                           detail={"name": _clean(name, 300)})
        ns = self._ns(request)
        kind, ref = match["kind"], match["ref"]
        if kind is None:
            return self._tags(request, name, ns)
        if kind == "blobs":
            return await self._blob(request, name, ns, _parse_digest(ref))
        if _TAG_RE.fullmatch(ref):
            return self._manifest(request, name, ns, tag=ref)
        return self._manifest(request, name, ns, digest=_parse_digest(ref))

    @staticmethod
    def _ns(request: web.Request) -> str | None:
        values = request.query.getall("ns", [])
        if not values:
            return None
        ns = values[0]
        if len(values) > 1 or len(ns) > 255 or not _HOST_RE.fullmatch(ns):
            raise _Refusal(400, "NAME_INVALID", "invalid ns (the upstream registry)",
                           detail={"ns": _clean(ns, 300)})
        return normalise_registry(ns.lower())

    # ---- names ---------------------------------------------------------------------------

    def _resolve(self, name: str, ns: str | None) -> Resolution:
        found = resolve(self.source, name, ns)
        if not found.repositories:
            raise _Refusal(404, "NAME_UNKNOWN", "repository name not known to registry",
                           detail={"name": name, **({"ns": ns} if ns else {})})
        return found

    def _one(self, name: str, ns: str | None) -> RepositoryContent:
        found = self._resolve(name, ns)
        if found.ambiguous:
            raise _Refusal(404, "NAME_UNKNOWN",
                           f"{name} is in several upstreams; name one: "
                           f"/v2/<upstream>/{name}/… or ?ns=<upstream>",
                           detail={"name": name, "candidates": list(found.ambiguous)})
        return found.repositories[0]

    # ---- manifests -----------------------------------------------------------------------

    def _manifest(self, request: web.Request, name: str, ns: str | None, *,
                  tag: str | None = None, digest: Digest | None = None) -> web.StreamResponse:
        if tag is not None:
            content = self._one(name, ns)
            digest = content.tags.get(tag)
            if digest is None:
                raise _Refusal(404, "MANIFEST_UNKNOWN", "manifest unknown",
                               detail={"name": name, "tag": tag})
        else:
            assert digest is not None
            candidates = self._resolve(name, ns).repositories
            found = [c for c in candidates if digest in c.manifests]
            if not found:
                raise _Refusal(404, "MANIFEST_UNKNOWN", "manifest unknown",
                               detail={"name": name, "digest": str(digest)})
            content = found[0]
        manifest = self.source.manifests[digest]
        manifest = self._negotiate(request, manifest, content, by_tag=tag is not None)
        etag = f'"{manifest.digest}"'
        headers = {"Docker-Content-Digest": str(manifest.digest), "ETag": etag,
                   "Content-Type": manifest.media_type}
        if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
            return web.Response(status=304, headers=headers)
        response = web.Response(status=200, headers=headers, body=manifest.raw)
        if request.method == "GET":
            request["gapkit.bytes"] = len(manifest.raw)
        return response

    def _negotiate(self, request: web.Request, manifest: Manifest, content: RepositoryContent,
                   by_tag: bool) -> Manifest:
        accepted = _accepted(request)
        if accepted is None or manifest.media_type in accepted:
            return manifest
        if manifest.is_index and by_tag:
            for entry in manifest.manifests:
                child = self.source.manifests.get(entry.digest)
                if (child is not None and entry.digest in content.manifests
                        and entry.platform == self.platform and child.media_type in accepted):
                    return child
        kind = "index" if manifest.media_type in INDEX_MEDIA_TYPES else "manifest"
        raise _Refusal(404, "MANIFEST_UNKNOWN",
                       f"{manifest.media_type} {kind} found, but the Accept header does not "
                       "allow it", detail={"mediaType": manifest.media_type,
                                           "accepted": sorted(accepted)})

    # ---- blobs ---------------------------------------------------------------------------

    async def _blob(self, request: web.Request, name: str, ns: str | None,
                    digest: Digest) -> web.StreamResponse:
        candidates = self._resolve(name, ns).repositories
        if not any(digest in c.blobs for c in candidates):
            raise _Refusal(404, "BLOB_UNKNOWN", "blob unknown to registry",
                           detail={"digest": str(digest)})
        location = await self.source.locate(digest)
        with _out_of_resources_is_503():
            problem = await self._check(digest, location)
        if problem is not None or location is None:
            raise _Refusal(404, "BLOB_UNKNOWN", "blob unknown to registry",
                           detail={"digest": str(digest), "reason": problem})
        size = location.size
        start, end, status = 0, size, 200
        headers = {"Docker-Content-Digest": str(digest), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}
        wanted = _parse_range(request.headers.get("Range"), size)
        if wanted == "unsatisfiable":
            raise _Refusal(416, "RANGE_INVALID", "requested range not satisfiable",
                           detail={"size": size}, headers={"Content-Range": f"bytes */{size}"})
        if wanted is not None:
            start, end = wanted
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        if request.method == "HEAD" or end == start:
            await response.prepare(request)
            return response
        with _out_of_resources_is_503():  # opened before the answer starts, so a 503 can
            fd = open_blob_fd(location)   # still be sent; a local open(2): no worker thread
        with os.fdopen(fd, "rb", buffering=0) as f:
            await response.prepare(request)
            try:
                await self._send(request, response, f, location, start, end)
            except TimeoutError as exc:  # ETIMEDOUT: the kernel dropped a stalled client
                raise ConnectionResetError(f"no byte acknowledged for {STALL_TIMEOUT:g} s "
                                           "(the client stopped reading)") from exc
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse, f: IO[bytes],
                    location: BlobLocation, start: int, end: int) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        _drop_when_stalled(transport)
        fd = f.fileno()
        offset, count = location.offset + start, end - start
        if transport.get_extra_info("sslcontext") is None:
            loop = asyncio.get_running_loop()
            try:
                await loop.sendfile(transport, f, offset, count, fallback=False)
                request["gapkit.bytes"] = count
                await response.write_eof()
                return
            except (NotImplementedError, RuntimeError):
                pass  # no native sendfile for this transport: read and write below
        sent = 0
        while sent < count:
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, count - sent),
                                            offset + sent)
            if not chunk:
                raise ConnectionResetError(f"{location.path} ended early")
            await response.write(chunk)
            sent += len(chunk)
            request["gapkit.bytes"] = sent
        await response.write_eof()

    async def _check(self, digest: Digest, location: BlobLocation | None) -> str | None:
        """None when the blob may be served; else what is wrong (reported once)."""
        if digest in self._verdicts:
            return self._verdicts[digest]
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._verify(digest, location))
            self._pending[digest] = pending
        return await asyncio.shield(pending)

    async def _verify(self, digest: Digest, location: BlobLocation | None) -> str | None:
        expected = self.source.blob_sizes.get(digest)
        problem: str | None = None
        if location is None:
            problem = "the source has no such blob (an image of it is incomplete)"
        elif expected is not None and location.size != expected:
            problem = (f"it is {location.size} bytes where its manifest declares {expected}: "
                       "the source is damaged")
        else:
            try:
                actual = await asyncio.to_thread(_hash, location, digest.algorithm)
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pending.pop(digest, None)
                    raise  # out of files or memory for now: no verdict, the next request retries
                problem = f"it cannot be read ({exc})"
            except GapkitError as exc:
                problem = f"it cannot be read ({exc})"
            else:
                if actual != digest.hex:
                    problem = (f"its bytes hash to {digest.algorithm}:{actual}: the source is "
                               "damaged")
        if problem is not None:
            self._log_line(f"error: blob {digest} in {self.source.path} is not served: {problem}"
                           + ("; run `gapkit bundle verify` on it" if self.source.kind == "bundle"
                              else ""))
        self._verdicts[digest] = problem
        self._pending.pop(digest, None)
        return problem

    async def warm_up(self) -> None:
        """Check every blob once, smallest first, so first pulls need not wait for hashing."""
        blobs = sorted(self.source.blob_sizes.items(), key=lambda item: (item[1], item[0]))
        for digest, _ in blobs:
            if digest in self._verdicts:
                continue
            with contextlib.suppress(GapkitError, OSError):
                await self._check(digest, await self.source.locate(digest))

    # ---- listings ------------------------------------------------------------------------

    def _tags(self, request: web.Request, name: str, ns: str | None) -> web.StreamResponse:
        content = self._one(name, ns)
        page, more = _page(sorted(content.tags), request)
        headers = {}
        if more is not None:
            query = {"n": str(len(page)), "last": more, **({"ns": ns} if ns else {})}
            headers["Link"] = f'</v2/{name}/tags/list?{urllib.parse.urlencode(query)}>; rel="next"'
        return self._json(request, {"name": name, "tags": page}, headers)

    def _catalog(self, request: web.Request) -> web.StreamResponse:
        names = sorted(repo.name for repo in self.source.repositories)
        page, more = _page(names, request)
        headers = {}
        if more is not None:
            query = urllib.parse.urlencode({"n": str(len(page)), "last": more})
            headers["Link"] = f'</v2/_catalog?{query}>; rel="next"'
        return self._json(request, {"repositories": page}, headers)

    def _json(self, request: web.Request, doc: object,
              headers: dict[str, str] | None = None) -> web.Response:
        body = json.dumps(doc).encode()
        response = web.Response(status=200, headers=headers, content_type="application/json",
                                body=body)
        if request.method == "GET":
            request["gapkit.bytes"] = len(body)
        return response

    # ---- log -----------------------------------------------------------------------------

    def protocol_logger(self) -> logging.Logger:
        """A logger for aiohttp's own messages (requests it refuses to parse, with a 400):
        one cleaned line each, never a traceback or the hostile bytes themselves."""
        logger = logging.getLogger(f"gapkit.registry.http.{id(self):x}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.handlers = [_ProtocolLog(self)]
        return logger

    def _log_access(self, request: web.Request, status: int, seconds: float) -> None:
        if self.access_log is None:
            return
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        peer = request.remote or "-"
        agent = _clean(request.headers.get("User-Agent", "-"), 120)
        self._write(f'{now} {peer} "{request.method} {_clean(request.raw_path)}" {status} '
                    f'{request.get("gapkit.bytes", 0)} {seconds * 1000:.1f}ms "{agent}"\n')

    def _log_line(self, text: str) -> None:
        stream = self.access_log or sys.stderr
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._write(f"{now} {text}\n", stream)

    def _write(self, line: str, stream: IO[str] | None = None) -> None:
        stream = stream or self.access_log
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            stream.write(line)
            stream.flush()


class _ProtocolLog(logging.Handler):
    def __init__(self, server: RegistryServer) -> None:
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (ConnectionError, asyncio.CancelledError)):
            return  # a client that went away: its access log line says 499
        what = record.getMessage()
        if isinstance(exc, HttpProcessingError):
            what = what.replace("Error handling request from",
                                f"{exc.code} for an unreadable request from")
        if exc is not None:
            message = getattr(exc, "message", None) or str(exc)
            what += f": {type(exc).__name__}: {str(message).strip().splitlines()[0]}"
        self.server._log_line(_clean(what, 300).replace("%20", " "))


def _raise_file_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit, as Go programs
    (docker-registry, containerd) do by themselves: every connection costs one, and a soft
    limit of 1024 is common."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _OneRoute(web.UrlDispatcher):
    """A router that sends every request to one handler, whatever its path or method
    (CONNECT's `host:port`, a `%0a` decoded to a newline): none gets aiohttp's own 404 or 405
    before the credentials are checked. `Expect` goes to `_ignore_expect`."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        super().__init__()
        self._route = web.ResourceRoute("*", handler, web.PlainResource("/"),
                                        expect_handler=_ignore_expect)

    async def resolve(self, request: web.Request) -> web.UrlMappingMatchInfo:
        return web.UrlMappingMatchInfo({}, self._route)


async def _ignore_expect(request: web.Request) -> None:
    """`Expect` is not acted on: this server never reads a request body, so it sends no
    `100 Continue` and refuses no expectation; its final answer comes at once, as RFC 9110
    allows. (aiohttp's own handler runs before any middleware, so before the credentials are
    checked: 417 for an unknown expectation, and a 500 for a non-ASCII one.)"""


LoopErrorHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class _AcceptErrors:
    """The event loop's error handler while serving: a listening socket that cannot accept
    (the process is out of file descriptors) is reported at most once every
    `ACCEPT_ERROR_EVERY` seconds, in one line with a count, instead of asyncio's traceback for
    every try (thousands a second on Python 3.11, whose accept loop retries the same error up
    to the backlog's length). Everything else goes to the previous handler."""

    def __init__(self, server: RegistryServer, previous: LoopErrorHandler | None) -> None:
        self.server = server
        self.previous = previous
        self.count = 0
        self.last = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _EXHAUSTED
                and "accept" in str(context.get("message", ""))):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        now = time.monotonic()
        if now - self.last >= ACCEPT_ERROR_EVERY:
            self.server._log_line(f"error: cannot take new connections: {exc.strerror} "
                                  f"({self.count} tries failed since the last report); slow "
                                  "clients are cut off after "
                                  f"{IDLE_TIMEOUT:g} s (headers) or {STALL_TIMEOUT:g} s (stalled)")
            self.count, self.last = 0, now


async def _api_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[API_VERSION[0]] = API_VERSION[1]


@contextlib.contextmanager
def _out_of_resources_is_503() -> Iterator[None]:
    """A process out of file descriptors (or memory) for now answers 503 with `Retry-After`
    (containerd then tries again or its next host), never a 500 with a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _EXHAUSTED:
            raise
        raise _Refusal(503, "UNAVAILABLE", "the server is out of resources for now; try again",
                       detail={"reason": exc.strerror}, headers={"Retry-After": "1"}) from None


def _drop_when_stalled(transport: asyncio.BaseTransport) -> None:
    """Let the kernel drop the connection once the client leaves what is sent to it unacknowledged
    for `STALL_TIMEOUT` seconds (a full window included): a send to a client that stopped
    reading would otherwise wait, holding its file descriptor, for ever."""
    sock = transport.get_extra_info("socket")
    timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux
    if sock is not None and timeout is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, timeout, int(STALL_TIMEOUT * 1000))


def _parse_digest(text: str) -> Digest:
    if len(text) > 200 or not _DIGEST_RE.fullmatch(text):
        raise _Refusal(400, "DIGEST_INVALID", "invalid digest", detail={"digest": _clean(text, 210)})
    try:
        return Digest.parse(text)
    except GapkitError:
        raise _Refusal(400, "DIGEST_INVALID", "unsupported digest algorithm or length "
                       "(sha256 and sha512 only)", detail={"digest": text}) from None


def _digits(text: str) -> bool:
    """ASCII digits only: `str.isdigit` also takes `²` (which `int` refuses) and `٩`."""
    return text.isascii() and text.isdigit()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One `bytes=` range as (start, end-exclusive); None to serve everything."""
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not sep or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or len(first) > 19 or len(last) > 19:
        return None
    if not first:
        if not _digits(last):
            return None
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size
    if not _digits(first) or (last and not _digits(last)):
        return None
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


def _page(items: list[str], request: web.Request) -> tuple[list[str], str | None]:
    """`n`/`last` pagination: the page, and the `last` of the next page while more remain."""
    n_text = request.query.get("n")
    last = request.query.get("last")
    if last is not None:
        items = [i for i in items if i > last]
    limit = MAX_PAGE
    if n_text is not None:
        if not _digits(n_text) or len(n_text) > 9:
            raise _Refusal(400, "PAGINATION_NUMBER_INVALID", "n must be a non-negative integer",
                           detail={"n": _clean(n_text, 20)})
        limit = min(int(n_text), MAX_PAGE)
    page = items[:limit]
    more = page[-1] if len(items) > limit and page else None
    return page, more


def _hash(location: BlobLocation, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    fd = open_blob_fd(location)
    try:
        pos, end = location.offset, location.offset + location.size
        while pos < end:
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk:
                raise OSError(f"{location.path} ended early")
            hasher.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return hasher.hexdigest()


# --------------------------------------------------------------------------------------------
# The whole thing: open, listen, serve until a signal


def _urls(scheme: str, host: str, port: int, names: tuple[str, ...]) -> list[str]:
    from gapkit.registry.tls import local_addresses

    def fmt(address: str) -> str:
        return f"{scheme}://[{address}]:{port}" if ":" in address else f"{scheme}://{address}:{port}"

    if host not in ("0.0.0.0", "::", ""):
        return [fmt(host)]
    addresses = [a for a in local_addresses() if ":" not in a or host == "::"]
    outside = [a for a in addresses if not a.startswith("127.") and a != "::1"]
    return [fmt(a) for a in [*outside, *names, "127.0.0.1"]]


async def serve(
    source: Path,
    listen: str = "0.0.0.0:5000",
    tls: TlsMode = "auto",
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    htpasswd: Path | None = None,
    state_dir: Path | None = None,
    names: tuple[str, ...] = (),
    access_log: IO[str] | None = None,
    on_ready: Callable[[ServeInfo], None] | None = None,
    stop: asyncio.Event | None = None,
    verify_ahead: bool = True,
) -> None:
    """Serve `source` read-only until SIGINT/SIGTERM (or `stop` is set).

    `tls="auto"` makes (once) a CA and a server certificate under `state_dir` (see
    `gapkit.registry.tls`); `tls_cert`/`tls_key` serve the site's own instead; `tls="off"`
    serves plain HTTP. `htpasswd` turns on basic auth (bcrypt hashes only). One access log
    line per request goes to `access_log` (the caller's stderr, typically). `on_ready` gets a
    `ServeInfo` once the port is open.
    """
    host, port = parse_listen(listen)
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_cert is not None and tls == "off":
        raise UsageError("--tls off contradicts --tls-cert/--tls-key")
    users = Htpasswd.load(htpasswd) if htpasswd is not None else None
    files: TlsFiles | None = None
    if tls_cert is not None and tls_key is not None:
        files = TlsFiles(tls_cert, tls_key, None)
    elif tls == "auto":
        files = await asyncio.to_thread(ensure_auto_tls, state_dir or default_state_dir(), host,
                                        names)
    context = server_context(files) if files is not None else None
    opened = await open_source(source)
    server = RegistryServer(opened, users, access_log, verify_ahead)
    runner = web.AppRunner(server.app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE, logger=server.protocol_logger(),
                           keepalive_timeout=IDLE_TIMEOUT,
                           **PARSER_LIMITS)  # type: ignore[arg-type]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    warm: asyncio.Task[None] | None = None
    _raise_file_limit()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(_AcceptErrors(server, previous_handler))
    try:
        await runner.setup()
        site = web.TCPSite(runner, host if host not in ("", "0.0.0.0") else "0.0.0.0", port,
                           ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}",
                             hint="choose another address or port with --listen") from None
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
        scheme = "https" if context is not None else "http"
        if on_ready is not None:
            on_ready(ServeInfo(
                source=source, kind=opened.kind, images=opened.image_count,
                repositories=len(opened.repositories), registries=opened.registries,
                listen=f"{host}:{port}", urls=_urls(scheme, host, port, names), scheme=scheme,
                tls=files, auth=users is not None, problems=list(opened.problems)))
        if verify_ahead:
            warm = asyncio.create_task(server.warm_up())
        await stop.wait()
    finally:
        loop.set_exception_handler(previous_handler)
        for signum in installed:
            loop.remove_signal_handler(signum)
        if warm is not None:
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await warm
        await runner.cleanup()
        await opened.close()
