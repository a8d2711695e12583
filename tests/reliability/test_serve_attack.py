"""`gapkit registry serve --htpasswd` under attack: a wide property-based fuzz of hostile
requests, explicit attempts to get past basic auth, and slow clients.

Two servers run as users run them (`python -m gapkit registry serve … --htpasswd FILE`): one over
an OCI layout folder, one over a tar of it (served from member offsets, as a bundle is). Beside
both sources lies a secret file; the layout also holds a blob file no manifest names and a
symbolic link to the secret under the secret's digest, and the tar holds the same unnamed blob.
None of their bytes may ever leave the server, whoever asks and however.

tests/registry/test_serve.py has the API's corners and a fuzz without auth; this module adds the
attacker's side: every request without valid credentials gets the same 401 (or, when aiohttp
cannot even parse it, its plain 400), and no request gets a 5xx, a hang, or a byte that is not
part of an image the server serves.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.registry.test_serve import Served, serving
from tests.support.images import ImageSpec, make_layer, write_layout

USER, PASSWORD = "gapkit", "s3cret"
#: Every read of an answer is bounded by this; an answer slower than that is a hang.
TIMEOUT = 10.0
IMAGES = {"docker.io/library/nginx:1.27": 1, "quay.io/team/app:1": 2}
MULTI = "registry.k8s.io/pause:3.10"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


GOOD = basic(USER, PASSWORD)
_TOKEN = GOOD.split()[1]

#: Authorization values that carry the right user and password (the scheme is case-insensitive).
VALID = [GOOD, f"basic {_TOKEN}", f"BASIC {_TOKEN}"]
#: Authorization values that must never let anyone in.
INVALID = [
    "",
    "Basic",
    "Basic ",
    basic(USER, "wrong"),
    basic("nobody", PASSWORD),
    basic(USER.upper(), PASSWORD),
    basic(USER, PASSWORD + "\0"),
    basic(USER, PASSWORD.upper()),
    basic(USER, ""),
    basic("", PASSWORD),
    "Basic " + base64.b64encode(f"{USER}{PASSWORD}".encode()).decode(),  # no colon
    "Basic " + _TOKEN.rstrip("="),  # bad padding
    "Basic " + _TOKEN[:-4],
    "Basic !!!!" + _TOKEN,  # not base64
    "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode("utf-16")).decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
    "Basic \u00e9t\u00e9",  # not ASCII
    "Basic " + _TOKEN + "\u00e9",
    "Bearer " + _TOKEN,
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJnYXBraXQifQ.",
    "Digest username=\"gapkit\"",
    _TOKEN,  # no scheme
    "Basic " + "A" * 5000,
    "Basic " + base64.b64encode(f"{USER}:{PASSWORD}:{PASSWORD}".encode()).decode(),
    "Basic" + _TOKEN,  # no space
]


# --------------------------------------------------------------------------------------------
# The site: sources with secrets beside and inside them, two servers with --htpasswd


@dataclass
class Site:
    layout: Served
    archive: Served
    canary: bytes
    #: Every byte string the servers may send in a 2xx body: manifests and blobs, by digest.
    content: dict[str, bytes]
    #: Real paths (so the fuzz reaches real content): manifests by tag and digest, blobs.
    paths: list[str]
    unauthorized: bytes  # the one body of every 401

    @property
    def servers(self) -> tuple[Served, Served]:
        return self.layout, self.archive


def _blob_files(root: Path) -> dict[str, bytes]:
    folder = root / "blobs" / "sha256"
    return {"sha256:" + p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("serve-attack")
    root = folder / "layout"
    specs = [ImageSpec(name, [make_layer(seed, 2000 + seed)]) for name, seed in IMAGES.items()]
    specs.append(ImageSpec(MULTI, [make_layer(9, 700)], others={"linux/arm64/v8": [make_layer(10, 600)]}))
    digests = write_layout(root, specs)
    content = _blob_files(root)  # before the planted files: these are all that may be served
    canary = b"SECRET-" + os.urandom(16).hex().encode()
    secret = folder / "secret.txt"
    secret.write_bytes(canary * 4)
    blobs = root / "blobs" / "sha256"
    (blobs / hashlib.sha256(canary * 4).hexdigest()).symlink_to(secret)
    orphan = canary * 8
    (blobs / hashlib.sha256(orphan).hexdigest()).write_bytes(orphan)
    archive = folder / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(root.rglob("*")):
            if not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    (folder / "bundle.tar.secret").write_bytes(canary * 4)
    htpasswd = folder / "htpasswd"
    htpasswd.write_text(f"{USER}:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode() + "\n")
    paths = ["/v2/", "/v2/_catalog", "/v2/nginx/tags/list"]
    for name, digest in digests.items():
        repo, tag = name.split("/", 1)[1].rsplit(":", 1)
        doc = json.loads(content[digest])
        children = [m["digest"] for m in doc.get("manifests", [])]
        layers = [d["digest"] for child in children or [digest]
                  for d in [json.loads(content[child])["config"], *json.loads(content[child])["layers"]]]
        paths += [f"/v2/{repo}/manifests/{tag}", f"/v2/{repo}/manifests/{digest}",
                  *[f"/v2/{repo}/manifests/{c}" for c in children],
                  *[f"/v2/{repo}/blobs/{d}" for d in layers]]
    args = ("--tls", "off", "--htpasswd", str(htpasswd))
    with serving(root, folder / "serve-layout", *args) as layout, \
            serving(archive, folder / "serve-archive", *args) as tar_server:
        status, body, head = layout.request("/v2/")
        assert status == 401 and head["WWW-Authenticate"] == 'Basic realm="gapkit"'
        # Both servers check their blobs at start; let that finish before the fuzz.
        for served in (layout, tar_server):
            for path in paths:
                served.request(path, headers={"Authorization": GOOD})
        yield Site(layout, tar_server, canary, content, paths, body)
        for served in (layout, tar_server):
            assert "Traceback" not in served.log(), served.log()[-3000:]


# --------------------------------------------------------------------------------------------
# Raw HTTP: exactly the bytes we choose, every read bounded by TIMEOUT


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    seconds: float


def exchange(port: int, request: bytes, head: bool = False, timeout: float = TIMEOUT) -> Answer:
    """Send `request` as is and read one answer (the body by its length, not to EOF)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may answer (and stop reading) before it has read everything: read that.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        response = http.client.HTTPResponse(sock, method="HEAD" if head else "GET")
        response.begin()
        body = response.read()
        return Answer(response.status, response.headers, body, time.monotonic() - started)


def build(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *[f"{name}: {value}" for name, value in headers]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def authorization_lines(request: bytes) -> list[bytes]:
    head = request.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].lower() == b"authorization"]


def authenticated(request: bytes) -> bool:
    """Whether the request carries exactly one Authorization header, with valid credentials."""
    lines = authorization_lines(request)
    return len(lines) == 1 and lines[0].decode("utf-8", "replace") in VALID


def check_answer(site: Site, request: bytes, answer: Answer, head: bool) -> None:
    """What every answer must be, whatever was asked."""
    where = (request[:400], answer.status, answer.body[:300])
    assert answer.status < 500, where
    assert site.canary not in answer.body, where
    assert all(site.canary.decode() not in v for v in answer.headers.values()), where
    if not authenticated(request):
        if answer.status == 400:
            # aiohttp refused to parse it, before the server saw it: a plain text, never JSON.
            assert b'"errors"' not in answer.body, where
            return
        assert answer.status == 401, where
        assert answer.headers["WWW-Authenticate"] == 'Basic realm="gapkit"', where
        assert answer.body == (b"" if head else site.unauthorized), where
        return
    assert answer.status != 401, where
    if answer.status in (200, 206) and not head:
        body = answer.body
        if answer.headers.get("Content-Type") == "application/json":
            assert isinstance(json.loads(body), dict), where
            return
        digest = answer.headers["Docker-Content-Digest"]
        assert body in site.content[digest], where  # a range of it, or all of it
        if answer.status == 200:
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest, where


# --------------------------------------------------------------------------------------------
# The fuzz


_METHODS = st.one_of(st.sampled_from(["GET", "HEAD"]), st.sampled_from([
    "GET", "HEAD", "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    "PROPFIND", "MKCOL", "LOCK", "SEARCH", "M-SEARCH", "BREW", "get", "Head", "GET\x00", "X" * 300,
]))
_PREFIXES = st.sampled_from([
    "/v2/", "/v2/", "/v2/", "//v2/", "/v2//", "/v2/../v2/", "/v2/./", "/./v2/", "/V2/", "/v2;/",
    "/v2%2F", "/%76%32/", "/v2/%2e%2e/v2/", "/v2/..%2f", "http://127.0.0.1/v2/", "http://evil/v2/",
    "/", "", "*", "/v1/", "/v2/%00/", "/v2/\\..\\",
])
_SEGMENTS = [
    "", ".", "..", "%2e%2e", "%2E%2e", "%2F", "%2f", "..%2F..", "%252e%252e", "%00", "%0a", "%0d%0a",
    "nginx", "library", "team", "app", "pause", "quay.io", "docker.io", "registry.k8s.io",
    "manifests", "blobs", "tags", "list", "_catalog", "uploads", "1.27", "1", "3.10", "latest",
    "sha256:../../secret.txt", "../../../secret.txt", "secret.txt", "bundle.tar", "layout",
    "index.json", "oci-layout", "blobs/sha256", "/etc/passwd", "a" * 256, "a" * 129, "-" * 10,
    "\u00e9", "\u202e", "%ff", "%c0%af", "a;b", "a?b", "a#b", "sha256:" + "0" * 64,
    "sha512:" + "0" * 128, "md5:" + "0" * 32, "sha256:" + "A" * 64, "Nginx",
    "/".join(["a"] * 200), "a" * 5000,
]
#: Text a parser takes (printable ASCII): most values are this or a chosen trick, so most
#: requests reach the server's own checks; raw text (controls, non-ASCII) is the minority.
_PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
_URL_TEXT = st.text(st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/?"),
    max_size=40)
_QUERY_KEYS = st.sampled_from(["ns", "ns", "NS", "ns[]", "ns%00", "n", "last", "", "x", "%6es"])
_QUERY_TRICKS = st.sampled_from([
    "docker.io", "quay.io", "registry.k8s.io", "DOCKER.IO", "index.docker.io", "", "..", "%2F",
    "%00", "docker.io%00", "docker.io/../quay.io", "127.0.0.1:5000", "a" * 300, "-1", "0",
    "99999999999999999999", "%C2%B2", "nginx", "%ff%fe", "1e3", "0x10",
])
#: Values a parser takes; raw ones (controls, non-ASCII: mostly refused by aiohttp) are rarer.
_SAFE_VALUES = st.one_of(_QUERY_TRICKS, _URL_TEXT)
_RAW_VALUES = st.one_of(st.sampled_from(["\u00b2", "\u0669", "\u00e9"]), _PRINTABLE,
                        st.text(max_size=12))


def _queries(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(_QUERY_KEYS, values), max_size=4)
    return st.tuples(pairs, st.sampled_from(["&", ";"])).map(
        lambda p: ("?" + p[1].join(f"{k}={v}" for k, v in p[0])) if p[0] else "")


_QUERY = st.one_of(_queries(_SAFE_VALUES), _queries(_SAFE_VALUES), _queries(_SAFE_VALUES),
                   _queries(st.one_of(_SAFE_VALUES, _RAW_VALUES)))
_RANGES = st.sampled_from([
    "bytes=0-", "bytes=0-0", "bytes=1-1", "bytes=-1", "bytes=-0", "bytes=--1",
    "bytes=-99999999999999999999999",
    "bytes=18446744073709551615-", "bytes=0-18446744073709551616", "bytes=9223372036854775807-",
    "bytes=5-1", "bytes=0-0,1-1", "bytes=0-1, 2-3", ",".join(["bytes=0-1"] * 300),
    "bytes=" + ",".join(["0-1"] * 500), "bytes=0x10-", "bytes= 1 - 2", "bytes=+1-2", "bytes=1_0-20",
    "items=0-1", "bytes", "bytes=", "=0-1", "bytes=\u00b2-", "bytes=1-\u00b2", "bytes=-\u00b2",
    "bytes=\u0669-", "bytes=1e3-", "bytes=-1-2", "bytes=1--2", "bytes=" + "9" * 500 + "-",
])
_INJECTED = st.sampled_from([
    "x\r\nAuthorization: " + GOOD, "x\r\nAuthorization: Bearer x", "x\nAuthorization: " + GOOD,
    "x\rAuthorization: " + GOOD, "x\r\n\r\nGET /v2/_catalog HTTP/1.1", "x\r\nContent-Length: 5",
    "x\x00y", "x\x7fy", "\u00e9", "\udcff", " leading", "trailing ", "\tx", "y" * 9000, "y" * 20000,
])
_VALUES = st.sampled_from([
    "*/*", "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "100-continue", "chunked", "-1", "99999999999999999999", "keep-alive, Upgrade", "close",
    "evil.example", "", "0", "5"])
_NAMES = st.sampled_from([
    "Accept", "If-None-Match", "User-Agent", "X-Forwarded-For", "X-Original-URL", "X-Rewrite-URL",
    "Expect", "Transfer-Encoding", "Content-Length", "Connection", "Host", "Cookie", "Via",
    "X-Injected", "Range"])
_HEADER = st.one_of(
    st.tuples(st.just("Range"), _RANGES),
    st.tuples(_NAMES, st.one_of(_VALUES, _PRINTABLE, _VALUES, _INJECTED, st.text(max_size=20))),
    st.tuples(st.just("Range"), _RANGES),
    st.tuples(_NAMES, _VALUES),
    st.tuples(st.sampled_from(["X" * 300, "Authorization ", " Authorization", "Auth\u00e9",
                               "Accept\x00"]), st.just("x")),
)
#: Mostly the right credentials (so the fuzz reaches past auth), else none, wrong or several.
_AUTH = st.one_of(st.just([GOOD]), st.just([GOOD]), st.lists(st.sampled_from(VALID + INVALID),
                                                             max_size=2))


@settings(max_examples=3000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(server=st.sampled_from([0, 1]), method=_METHODS, prefix=_PREFIXES,
       segments=st.lists(st.sampled_from(_SEGMENTS), max_size=5), real=st.integers(-3, 40),
       trick=st.booleans(),
       query=_QUERY, headers=st.lists(_HEADER, max_size=3), auth=_AUTH,
       filler=st.sampled_from([0] * 10 + [20, 90, 150]),
       body=st.sampled_from([b"", b"", b"x" * 64]))
def test_hostile_requests_with_auth_get_401_or_content_never_a_5xx_a_hang_or_a_secret(
        site: Site, server: int, method: str, prefix: str, segments: list[str], real: int,
        trick: bool, query: str, headers: list[tuple[str, str]], auth: list[str], filler: int,
        body: bytes) -> None:
    if 0 <= real < len(site.paths):  # a real path, perhaps with tricks after it
        target = site.paths[real] + ("/".join(segments) if trick else "")
    else:
        target = prefix + "/".join(segments)
    all_headers = [*headers, *[("Authorization", a) for a in auth],
                   *[(f"X-Filler-{i}", "v") for i in range(filler)]]
    if body:
        all_headers.append(("Content-Length", str(len(body))))
    request = build(method, target + query, all_headers, body)
    answer = exchange(site.servers[server].port, request, head=method == "HEAD")
    event(f"{'authenticated' if authenticated(request) else 'not authenticated'}: "
          f"{method if method in ('GET', 'HEAD') else 'other method'} {answer.status}")
    assert answer.seconds < TIMEOUT
    check_answer(site, request, answer, head=method == "HEAD")


# --------------------------------------------------------------------------------------------
# Getting past auth


BYPASS_PATHS = [
    "/v2/", "/v2", "/v2/_catalog", "/v2/nginx/manifests/1.27", "/v2/nginx/manifests/1.27?ns=docker.io",
    "/v2/no/such/manifests/1", "/v2/nginx/tags/list", "/v2/no/such/tags/list",
    "/v2/../v2/", "//v2/", "/v2;/", "/V2/", "/v2/%2e%2e/v2/", "/v2/./nginx/manifests/1.27",
    "/v2/nginx/manifests/1.27;", "/v2/nginx/manifests/1.27%00", "/v2/NGINX/manifests/1.27",
    "/v2/docker.io/library/nginx/manifests/1.27", "http://127.0.0.1/v2/", "/v2/nginx/blobs/uploads/",
    "/v2/nginx/manifests/1?" + "x" * 5000, "/%76%32/",
]


def test_every_way_past_basic_auth_gets_the_same_401(site: Site) -> None:
    blob = next(p for p in site.paths if "/blobs/" in p)
    manifest = next(p for p in site.paths if "/manifests/sha256:" in p)
    attempts: list[list[str]] = [[], *[[a] for a in INVALID], [GOOD, basic(USER, "wrong")],
                                 [basic(USER, "wrong"), GOOD], [GOOD, GOOD], [GOOD, "Bearer x"]]
    for served in site.servers:
        for path in [*BYPASS_PATHS, blob, manifest]:
            for method in ("GET", "HEAD", "DELETE", "PUT"):
                for attempt in attempts:
                    request = build(method, path, [("Authorization", a) for a in attempt])
                    answer = exchange(served.port, request, head=method == "HEAD")
                    if answer.status == 400 and "\u00e9" in "".join(attempt):
                        continue  # aiohttp may refuse a non-ASCII header before the server sees it
                    where = (method, path, attempt)
                    assert answer.status == 401, (*where, answer.status, answer.body[:200])
                    assert answer.headers["WWW-Authenticate"] == 'Basic realm="gapkit"', where
                    assert answer.body == (b"" if method == "HEAD" else site.unauthorized), where
        # The right credentials do open it (so the 401s above are about credentials).
        for path in ("/v2/", "/v2/nginx/manifests/1.27", blob, manifest):
            for value in VALID:
                answer = exchange(served.port, build("GET", path, [("Authorization", value)]))
                assert answer.status == 200, (path, value, answer.body[:200])
                check_answer(site, build("GET", path, [("Authorization", value)]), answer, False)


# --------------------------------------------------------------------------------------------
# Slow clients


class SlowClients:
    """`count` connections that send a request line and then one header byte now and then,
    never finishing their headers (slowloris). Closed on `stop()`."""

    def __init__(self, port: int, count: int, every: float = 0.5) -> None:
        self.sockets: list[socket.socket] = []
        self.every = every
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /v2/nginx/manifests/1.27 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        alive = list(self.sockets)
        while alive and not self._stop.wait(self.every):
            for sock in list(alive):
                try:
                    sock.sendall(b"a")
                except OSError:
                    alive.remove(sock)

    def dropped(self) -> int:
        """How many of the connections the server has closed."""
        count = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                count += sock.recv(1024) == b""
            except BlockingIOError:
                pass
            except OSError:
                count += 1
        return count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()


def skopeo_pull(served: Served, folder: Path, timeout: float) -> str:
    """A real client's pull (skopeo checks every digest); the manifest digest it got."""
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--src-creds",
                    f"{USER}:{PASSWORD}", f"docker://{served.host}/nginx:1.27", f"dir:{folder}"],
                   capture_output=True, check=True, timeout=timeout)
    return "sha256:" + hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def test_slow_clients_do_not_block_a_pull(site: Site, tmp_path: Path) -> None:
    expected = site.layout.request("/v2/nginx/manifests/1.27", method="HEAD",
                                   headers={"Authorization": GOOD})[2]["Docker-Content-Digest"]
    for served in site.servers:
        slow = SlowClients(served.port, 200)
        try:
            started = time.monotonic()
            assert skopeo_pull(served, tmp_path / str(served.port), timeout=30) == expected
            assert time.monotonic() - started < 10
        finally:
            slow.stop()


# --------------------------------------------------------------------------------------------
# Absurd ranges and page sizes, with the right credentials


ABSURD_RANGES = {
    # answered with the whole blob (RFC 9110 lets a server ignore a Range it does not take)
    200: ["bytes=0-0,1-1", "bytes=" + ",".join(["0-1"] * 500), "bytes=-99999999999999999999999",
          "bytes=--1", "bytes=+1-2", "bytes=5-1", "bytes=1_0-20", "bytes=0x10-", "items=0-1",
          "bytes=\u00b2-", "bytes=1-\u00b2", "bytes=-\u00b2", "bytes=\u0669-", "bytes=1e3-",
          "bytes=" + "9" * 500 + "-", "bytes=0-" + "9" * 500, "bytes=0-18446744073709551616",
          "bytes=18446744073709551615-", "bytes"],
    206: ["bytes=0-0", "bytes=-1", "bytes=1-9999999999999999999"],
    416: ["bytes=9223372036854775807-", "bytes=-0"],
}


def test_absurd_ranges_and_page_sizes_get_4xx_or_the_right_bytes(site: Site) -> None:
    path = next(p for p in site.paths if "/blobs/" in p)
    whole = site.content[path.rsplit("/", 1)[1]]
    for served in site.servers:
        for expected, ranges in ABSURD_RANGES.items():
            for value in ranges:
                request = build("GET", path, [("Authorization", GOOD), ("Range", value)])
                answer = exchange(served.port, request)
                assert answer.status == expected, (value, answer.status, answer.body[:200])
                check_answer(site, request, answer, head=False)
                if expected == 200:
                    assert answer.body == whole, value
                if expected == 206:
                    assert whole.startswith(answer.body) or whole.endswith(answer.body), value
        for query in ("n=\u00b2", "n=%C2%B2", "n=\u0669", "n=-1", "n=99999999999999999999",
                      "n=1&n=2", "last=%ff%fe", "n=1e3", "n=0x10", "n= 1"):
            for listing in ("/v2/_catalog", "/v2/nginx/tags/list"):
                request = build("GET", f"{listing}?{query}", [("Authorization", GOOD)])
                answer = exchange(served.port, request)
                assert answer.status in (200, 400), (listing, query, answer.body[:200])
                check_answer(site, request, answer, head=False)
