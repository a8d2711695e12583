"""Network probes `gapkit node check` makes with sockets of the machine it runs on.

These cannot go through a `Runner` (they open sockets), so they always run where gapkit runs:
to check a node's view of the network, run `gapkit node check` on that node.

- `probe_tcp` / `probe_udp`: one port of one peer, told apart as connected, refused (nothing
  listens, or a firewall rejects), timed out (a firewall drops: filtered) or unreachable
  (no route). `gapkit node listen` answers both with a banner naming its host.
- `probe_proxy`: an HTTP CONNECT through a proxy to a registry, TLS inside the tunnel, and the
  registry's `/v2/` answer, as containerd does when `HTTPS_PROXY` is set.
- `MirrorProbe`: `/v2/` and manifest HEADs on a registry mirror, as containerd's `hosts.toml`
  makes it ask (`/v2/<name>/manifests/<tag>?ns=<upstream>`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from gapkit.errors import UsageError
from gapkit.oci.model import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from gapkit.oci.reference import DOCKER_HUB

if TYPE_CHECKING:
    import aiohttp

    from gapkit.oci.reference import Reference

#: What `gapkit node listen` sends on every connection (and answers to every datagram),
#: followed by its host name and a newline.
BANNER = b"gapkit-node-listen "
UDP_HELLO = b"gapkit-node-check\n"

PortState = Literal["connected", "refused", "timed out", "unreachable", "no answer", "error"]


@dataclass(frozen=True)
class PortProbe:
    host: str
    port: int
    protocol: Literal["tcp", "udp"]
    state: PortState
    #: The host name `gapkit node listen` gave in its banner, when it answered.
    listener: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "connected"


def _failed_state(exc: OSError) -> tuple[PortState, str]:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "refused", ""
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return "unreachable", exc.strerror or str(exc)
    return "error", exc.strerror or str(exc)


def _listener(banner: bytes) -> str | None:
    if not banner.startswith(BANNER):
        return None
    return banner[len(BANNER):].split(b"\n", 1)[0].decode("utf-8", "replace").strip() or "?"


async def probe_tcp(host: str, port: int, timeout: float, banner_wait: float = 0.3) -> PortProbe:
    """Connect to `host:port`; read a `gapkit node listen` banner if one comes at once."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return PortProbe(host, port, "tcp", "timed out")
    except OSError as exc:
        state, error = _failed_state(exc)
        return PortProbe(host, port, "tcp", state, error=error)
    banner = b""
    try:
        banner = await asyncio.wait_for(reader.read(256), banner_wait)
    except (asyncio.TimeoutError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)
    return PortProbe(host, port, "tcp", "connected", _listener(banner))


async def probe_udp(host: str, port: int, timeout: float) -> PortProbe:
    """Send a datagram and wait for an answer (only `gapkit node listen` answers one).

    An ICMP port-unreachable comes back as a refused receive; silence means the port is open
    to a service that does not answer, or filtered: UDP cannot tell these apart.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        return PortProbe(host, port, "udp", "error", error=str(exc))
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            state, error = _failed_state(exc)
            return PortProbe(host, port, "udp", state, error=error)
        deadline = time.monotonic() + timeout
        # A datagram can be lost: say hello up to three times within the timeout.
        for attempt in range(3):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await loop.sock_sendall(sock, UDP_HELLO)
                wait = left if attempt == 2 else min(left, timeout / 3)
                data = await asyncio.wait_for(loop.sock_recv(sock, 512), wait)
            except asyncio.TimeoutError:
                continue
            except OSError as exc:
                state, error = _failed_state(exc)
                return PortProbe(host, port, "udp", state, error=error)
            return PortProbe(host, port, "udp", "connected", _listener(data))
        return PortProbe(host, port, "udp", "no answer")
    finally:
        sock.close()


# --- proxy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyURL:
    host: str
    port: int
    credentials: tuple[str, str] | None = None

    @classmethod
    def parse(cls, text: str) -> ProxyURL:
        url = urlsplit(text if "://" in text else f"http://{text}")
        if url.scheme != "http":
            raise UsageError(f"proxy {text!r}: only http:// proxies are supported",
                             hint="write --proxy http://HOST:PORT (CONNECT carries the TLS)")
        try:
            port = url.port or 3128
        except ValueError:
            raise UsageError(f"proxy {text!r}: the port is not a number") from None
        if not url.hostname:
            raise UsageError(f"proxy {text!r} names no host", hint="write --proxy http://HOST:PORT")
        creds = ((unquote(url.username), unquote(url.password or ""))
                 if url.username is not None else None)
        return cls(url.hostname, port, creds)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class RegistryTarget:
    """An upstream registry as a client reaches it: `docker.io` is `registry-1.docker.io:443`."""

    name: str
    scheme: Literal["http", "https"]
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RegistryTarget:
        """`docker.io`, `quay.io`, `HOST:PORT` (HTTPS), or `http://HOST:PORT` (plain HTTP)."""
        scheme: Literal["http", "https"] = "http" if text.startswith("http://") else "https"
        url = urlsplit(text if "://" in text else f"https://{text}")
        if not url.hostname:
            raise UsageError(f"registry {text!r} names no host")
        try:
            port = url.port or (80 if scheme == "http" else 443)
        except ValueError:
            raise UsageError(f"registry {text!r}: the port is not a number") from None
        name = url.netloc
        host = "registry-1.docker.io" if url.hostname in (DOCKER_HUB, "index.docker.io") else url.hostname
        return cls(name, scheme, host, port)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ProxyProbe:
    registry: RegistryTarget
    #: What went wrong, as a short phrase; empty when the registry answered through the proxy.
    problem: str = ""
    #: The proxy's answer to CONNECT ("200 Connection established").
    connect_status: str = ""
    #: The registry's answer to GET /v2/ inside the tunnel.
    v2_status: int | None = None
    #: Where a 401 sends clients for a token (docker.io: auth.docker.io); checked too.
    token_realm: str = ""
    realm_problem: str = ""
    #: Which step failed: "proxy", "connect", "tls", "v2", "realm".
    stage: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem and not self.realm_problem


class _ProxyFailure(Exception):
    def __init__(self, stage: str, problem: str, connect_status: str = "") -> None:
        super().__init__(problem)
        self.stage = stage
        self.problem = problem
        self.connect_status = connect_status


def _read_head(sock: socket.socket | ssl.SSLSocket, limit: int = 64 * 1024) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


def _tunnel(proxy: ProxyURL, authority: str, timeout: float) -> tuple[socket.socket, str]:
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except TimeoutError:
        raise _ProxyFailure("proxy", f"the proxy {proxy} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise _ProxyFailure("proxy", f"cannot reach the proxy {proxy}: {exc.strerror or exc}") from None
    try:
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: gapkit\r\n"
        if proxy.credentials is not None:
            token = base64.b64encode(":".join(proxy.credentials).encode()).decode()
            head += f"Proxy-Authorization: Basic {token}\r\n"
        sock.sendall((head + "\r\n").encode())
        answer = _read_head(sock)
    except TimeoutError:
        sock.close()
        raise _ProxyFailure("connect", f"the proxy did not answer CONNECT {authority} "
                            f"within {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise _ProxyFailure("connect", f"CONNECT {authority} failed: {exc.strerror or exc}") from None
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    code = parts[1] if len(parts) > 1 else ""
    status = " ".join(parts[1:]) or "no answer"
    if not code.startswith("2"):
        sock.close()
        raise _ProxyFailure("connect", f"the proxy answered CONNECT {authority} with {status}", status)
    return sock, status


def _http_get(sock: socket.socket | ssl.SSLSocket, host_header: str,
              path: str) -> tuple[int, Mapping[str, str]]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: gapkit\r\n"
                 "Accept: application/json\r\nConnection: close\r\n\r\n".encode())
    head = _read_head(sock).decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise _ProxyFailure("v2", f"not an HTTP answer to GET {path}: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _registry_through(proxy: ProxyURL, target: RegistryTarget, path: str, timeout: float,
                      context: ssl.SSLContext) -> tuple[str, int, Mapping[str, str]]:
    sock, connect_status = _tunnel(proxy, target.authority, timeout)
    conn: socket.socket | ssl.SSLSocket = sock
    try:
        if target.scheme == "https":
            try:
                conn = context.wrap_socket(sock, server_hostname=target.host)
            except ssl.SSLCertVerificationError as exc:
                raise _ProxyFailure(
                    "tls", f"the certificate {target.host} showed through the tunnel is not "
                    f"trusted ({exc.verify_message})", connect_status) from None
            except (ssl.SSLError, OSError) as exc:
                raise _ProxyFailure("tls", f"TLS with {target.host} through the tunnel failed: "
                                    f"{exc}", connect_status) from None
        default_port = 443 if target.scheme == "https" else 80
        host_header = target.host if target.port == default_port else target.authority
        try:
            status, headers = _http_get(conn, host_header, path)
        except TimeoutError:
            raise _ProxyFailure("v2", f"{target.host} did not answer GET {path} within "
                                f"{timeout:g} s", connect_status) from None
        except OSError as exc:
            raise _ProxyFailure("v2", f"GET {path} failed: {exc}", connect_status) from None
        return connect_status, status, headers
    finally:
        conn.close()


def _realm(headers: Mapping[str, str]) -> str:
    value = headers.get("www-authenticate", "")
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    for part in rest.split(","):
        key, _, val = part.strip().partition("=")
        if key.lower() == "realm":
            return val.strip('"')
    return ""


def probe_proxy_sync(proxy: ProxyURL, target: RegistryTarget, timeout: float,
                     ca_file: str | None = None) -> ProxyProbe:
    """CONNECT through `proxy` to the registry, then `GET /v2/` in the tunnel (TLS for HTTPS).

    A `401` with a Bearer challenge sends clients to a token service on another host
    (docker.io: `auth.docker.io`); that host is tried through the proxy too.
    """
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    try:
        connect_status, status, headers = _registry_through(proxy, target, "/v2/", timeout, context)
    except _ProxyFailure as failure:
        return ProxyProbe(target, failure.problem, failure.connect_status, stage=failure.stage)
    if status not in (200, 401):
        return ProxyProbe(target, f"GET /v2/ answered {status}, not 200 or 401: this is not a "
                          "registry API, or the proxy rewrote the answer", connect_status, status,
                          stage="v2")
    realm = _realm(headers) if status == 401 else ""
    realm_problem = ""
    if realm:
        url = urlsplit(realm)
        realm_target = RegistryTarget(url.netloc, "https" if url.scheme == "https" else "http",
                                      url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        if realm_target.host and realm_target.host != target.host:
            try:
                _registry_through(proxy, realm_target, url.path or "/", timeout, context)
            except _ProxyFailure as failure:
                realm_problem = f"token service {realm_target.host}: {failure.problem}"
    return ProxyProbe(target, "", connect_status, status, realm, realm_problem,
                      stage="realm" if realm_problem else "")


async def probe_proxy(proxy: ProxyURL, target: RegistryTarget, timeout: float,
                      ca_file: str | None = None) -> ProxyProbe:
    return await asyncio.to_thread(probe_proxy_sync, proxy, target, timeout, ca_file)


# --- mirror ---------------------------------------------------------------------------------

MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))


@dataclass(frozen=True)
class MirrorURL:
    """A mirror as `hosts.toml` names it: scheme, host[:port] and an optional path prefix."""

    scheme: Literal["http", "https"]
    authority: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str, plain_http: bool = False) -> MirrorURL:
        if "://" in text and not text.startswith(("http://", "https://")):
            raise UsageError(f"mirror {text!r}: write http://HOST[:PORT] or https://HOST[:PORT]")
        if plain_http and text.startswith("https://"):
            raise UsageError(f"mirror {text!r} says https:// but --plain-http was given",
                             hint="write the URL as http://... or drop --plain-http")
        default = "http" if plain_http else "https"
        url = urlsplit(text if "://" in text else f"{default}://{text}")
        if not url.netloc:
            raise UsageError(f"mirror {text!r} names no host")
        prefix = url.path.strip("/")
        if prefix == "v2" or prefix.startswith("v2/"):
            prefix = prefix[2:].strip("/")  # `.../v2/docker.io` as an override_path host writes it
        return cls("http" if url.scheme == "http" else "https", url.netloc, prefix)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.authority}"

    def __str__(self) -> str:
        return self.base + (f"/{self.prefix}" if self.prefix else "")

    def manifest_url(self, path: str, identifier: str, ns: str | None = None) -> str:
        repo = f"{self.prefix}/{path}" if self.prefix else path
        url = f"{self.base}/v2/{repo}/manifests/{identifier}"
        return f"{url}?ns={ns}" if ns else url


@dataclass(frozen=True)
class MirrorAnswer:
    status: int | None
    digest: str = ""
    error: str = ""
    #: The answer is an error of TLS (certificate, or HTTPS spoken to an HTTP server).
    tls: bool = False


@dataclass(frozen=True)
class ImageOnMirror:
    reference: str
    #: HEAD as containerd asks: /v2/<path>/manifests/<tag>?ns=<upstream>
    ns: MirrorAnswer
    #: HEAD by the flat name, without ns
    flat: MirrorAnswer
    #: HEAD under the upstream prefix (/v2/<upstream>/<path>/...), asked only when the others miss
    prefixed: MirrorAnswer | None = None
    #: The digest the bundle records.
    expected: str = ""

    @property
    def layout(self) -> str | None:
        """How the mirror serves it: "flat", "ns", "flat-only", "upstream-prefix", or None."""
        if self.ns.status == 200 and self.flat.status == 200:
            return "flat"
        if self.ns.status == 200:
            return "ns"
        if self.flat.status == 200:
            return "flat-only"
        if self.prefixed is not None and self.prefixed.status == 200:
            return "upstream-prefix"
        return None

    @property
    def digest(self) -> str:
        for answer in (self.ns, self.prefixed, self.flat):
            if answer is not None and answer.status == 200 and answer.digest:
                return answer.digest
        return ""


class MirrorProbe:
    """A small HTTP client for one mirror, speaking to it as containerd would."""

    def __init__(self, mirror: MirrorURL, ca_file: str | None, credentials: tuple[str, str] | None,
                 timeout: float) -> None:
        self.mirror = mirror
        self.ca_file = ca_file
        self.credentials = credentials
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> MirrorProbe:
        import aiohttp

        ssl_context: ssl.SSLContext | bool = False
        if self.mirror.scheme == "https":
            ssl_context = ssl.create_default_context()
            if self.ca_file:
                ssl_context.load_verify_locations(self.ca_file)
        connector = aiohttp.TCPConnector(ssl=ssl_context, limit=16)
        headers = {"User-Agent": "gapkit"}
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=self.timeout * 2, sock_connect=self.timeout,
                                          sock_read=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(self, method: str, url: str,
                       headers: Mapping[str, str] | None = None) -> MirrorAnswer:
        import aiohttp

        assert self._session is not None
        try:
            async with self._session.request(method, url, headers=headers,
                                             allow_redirects=True) as resp:
                if method == "GET":
                    await resp.content.read(64 * 1024)
                return MirrorAnswer(resp.status, resp.headers.get("Docker-Content-Digest", ""))
        except aiohttp.ClientConnectorCertificateError as exc:
            return MirrorAnswer(None, error=f"certificate not trusted: {exc.certificate_error}",
                                tls=True)
        except aiohttp.ClientConnectorSSLError as exc:
            return MirrorAnswer(None, error=f"TLS failed: {exc}", tls=True)
        except aiohttp.ClientConnectorError as exc:
            return MirrorAnswer(None, error=f"cannot connect: {exc.os_error.strerror or exc}")
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return MirrorAnswer(None, error=f"no answer within {self.timeout:g} s")
        except aiohttp.ClientResponseError as exc:
            return MirrorAnswer(None, error=f"bad answer: {exc.message}")
        except aiohttp.ClientError as exc:
            return MirrorAnswer(None, error=f"{type(exc).__name__}: {exc}")

    async def ping(self) -> MirrorAnswer:
        return await self._request("GET", f"{self.mirror.base}/v2/")

    async def head_manifest(self, path: str, identifier: str, ns: str | None = None) -> MirrorAnswer:
        url = self.mirror.manifest_url(path, identifier, ns)
        return await self._request("HEAD", url, {"Accept": MANIFEST_ACCEPT})

    async def find_image(self, ref: Reference, expected: str = "") -> ImageOnMirror:
        identifier = ref.tag or str(ref.digest)
        ns, flat = await asyncio.gather(self.head_manifest(ref.path, identifier, ref.registry),
                                        self.head_manifest(ref.path, identifier))
        prefixed = None
        if ns.status != 200 and flat.status != 200:
            prefixed = await self.head_manifest(f"{ref.registry}/{ref.path}", identifier,
                                                ref.registry)
        return ImageOnMirror(str(ref), ns, flat, prefixed, expected)
