"""Bearer-token auth for tests: a small token server and a real registry that trusts it.

Docker Hub, ghcr.io and quay.io authenticate with the distribution token flow: the registry
answers 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`, the client fetches
a JWT from the realm (with basic credentials, if any) and sends it as `Authorization: Bearer`.
Here the realm is `TokenServer`, an aiohttp app in the test's event loop that signs ES256 JWTs
with a throw-away key, and the checking is done by a real `docker-registry` configured with
`auth.token` (it verifies the signature against the key's certificate, the issuer, the
audience, the expiry and the granted actions). The server records every token request.
It also takes Docker's OAuth2 refresh-token grant (a POST with `grant_type=refresh_token`),
which clients use when the Docker config holds an `identitytoken`.
"""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support.peers import Registry, free_port, wait_for_port

SERVICE = "gapkit-tests-registry"
ISSUER = "gapkit-tests-token-server"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered: who asked (None: anonymous) and for what."""

    user: str | None
    scopes: tuple[str, ...]
    service: str


@dataclass
class TokenServer:
    """Issues JWTs: users get every action they ask for, anonymous clients only `pull` when
    `anonymous_pull` is set."""

    folder: Path
    users: dict[str, str]
    anonymous_pull: bool = False
    #: refresh (identity) token -> the user it stands for.
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    requests: list[TokenRequest] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = self.folder / "token-signer.crt"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def scopes_requested(self) -> list[tuple[str, ...]]:
        return [r.scopes for r in self.requests]

    async def start(self) -> TokenServer:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._refresh)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def issue(self, user: str | None, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(
                      serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + 300,
                  "nbf": now - 30, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    async def _token(self, request: web.Request) -> web.Response:
        user: str | None = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED",
                                                      "message": "wrong user or password"}]},
                                         status=401)
            user = name
        scopes = tuple(request.query.getall("scope", []))
        return self._grant(user, scopes, request.query.get("service", ""))

    async def _refresh(self, request: web.Request) -> web.Response:
        form = await request.post()
        user = self.refresh_tokens.get(str(form.get("refresh_token", "")))
        if form.get("grant_type") != "refresh_token" or user is None:
            return web.json_response({"error": "invalid_grant"}, status=401)
        scopes = tuple(str(form.get("scope", "")).split())
        return self._grant(user, scopes, str(form.get("service", "")))

    def _grant(self, user: str | None, scopes: tuple[str, ...], service: str) -> web.Response:
        self.requests.append(TokenRequest(user, scopes, service))
        access: list[dict[str, object]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            granted = (wanted if user is not None
                       else [a for a in wanted if a == "pull" and self.anonymous_pull])
            access.append({"type": kind, "name": name, "actions": granted})
        token = self.issue(user, access)
        return web.json_response({"token": token, "access_token": token, "expires_in": 300})


@dataclass
class TokenRegistry(Registry):
    """A `docker-registry` that accepts only bearer tokens signed by `token_server`."""

    token_server: TokenServer | None = None

    def start(self) -> TokenRegistry:
        assert self.token_server is not None and self.token_server.port
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.folder / "data")}},
            "http": {"addr": self.host, "secret": "gapkit-tests"},
            "auth": {"token": {"realm": self.token_server.realm, "service": SERVICE,
                               "issuer": ISSUER,
                               "rootcertbundle": str(self.token_server.cert_file)}},
        }
        config_path = self.folder / "config.yml"
        config_path.write_text(json.dumps(config))
        log = open(self.folder / "registry.log", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)], stdout=log, stderr=log,
            start_new_session=True)
        wait_for_port(self.port)
        return self
