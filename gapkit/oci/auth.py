"""Registry credentials, found the way Docker finds them.

Order for one registry: explicit credentials (`--creds`, `HostOptions.credentials`) win; then the
Docker config file (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`): a helper named
in `credHelpers` for that registry, else the `credsStore` helper, else the `auths` entry. A
helper is the program `docker-credential-<name>`, run as `docker-credential-<name> get` with the
server URL on stdin; it prints `{"ServerURL", "Username", "Secret"}`.

Docker Hub is spelt many ways in config files (`https://index.docker.io/v1/`, `docker.io`,
`index.docker.io`, `registry-1.docker.io`); all of them name `docker.io` here, and helpers are
asked for `https://index.docker.io/v1/`, the key `docker login` writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gapkit.errors import AuthError, UsageError
from gapkit.oci.reference import DOCKER_HUB

#: The key `docker login` uses for Docker Hub, and the server URL helpers are asked for.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
#: Docker's convention: a helper answering this user name returns an identity (refresh) token.
IDENTITY_TOKEN_USER = "<token>"
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A user name and a password, or an identity token (`username` is `<token>`)."""

    username: str
    secret: str

    @property
    def is_identity_token(self) -> bool:
        """An OAuth2 refresh token, exchanged at the token realm instead of basic auth."""
        return self.username == IDENTITY_TOKEN_USER

    def basic(self) -> str:
        """The value of an `Authorization: Basic` header."""
        pair = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(username={self.username!r}, secret=***)"


def registry_key(text: str) -> str:
    """The registry a Docker config key names: scheme, path and Hub aliases stripped.

    `https://index.docker.io/v1/` → `docker.io`; `http://reg.local:5000/v2/` → `reg.local:5000`.
    """
    host = text.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def helper_server_url(registry: str) -> str:
    """What a credential helper is asked for: Hub's historic URL, else the host itself."""
    return DOCKER_HUB_SERVER if registry_key(registry) == DOCKER_HUB else registry


def docker_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`."""
    env = os.environ if environ is None else environ
    folder = env.get("DOCKER_CONFIG")
    if folder:
        return Path(folder) / "config.json"
    return Path.home() / ".docker" / "config.json"


@dataclass(frozen=True)
class DockerConfig:
    """The credential parts of a Docker `config.json`, keys normalised by `registry_key`."""

    path: Path
    auths: Mapping[str, Credentials]
    cred_helpers: Mapping[str, str]
    creds_store: str | None

    @classmethod
    def load(cls, path: Path) -> DockerConfig:
        """Read `path`; a missing file is an empty config, a malformed one an error."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, {}, {}, None)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(
                f"cannot read the Docker config {path}: {exc}",
                hint="fix or move the file, or point DOCKER_CONFIG at another folder",
            ) from None
        if not isinstance(doc, dict):
            raise UsageError(f"the Docker config {path} is not a JSON object")
        auths: dict[str, Credentials] = {}
        raw_auths = doc.get("auths")
        for key, entry in (raw_auths.items() if isinstance(raw_auths, dict) else ()):
            creds = _auth_entry(entry, key, path)
            if creds is not None:
                auths.setdefault(registry_key(key), creds)
        raw_helpers = doc.get("credHelpers")
        helpers = ({registry_key(k): str(v) for k, v in raw_helpers.items() if v}
                   if isinstance(raw_helpers, dict) else {})
        store = doc.get("credsStore")
        return cls(path, auths, helpers, str(store) if store else None)

    def helper_for(self, registry: str) -> str | None:
        return self.cred_helpers.get(registry_key(registry), self.creds_store)


def _auth_entry(entry: Any, key: str, path: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    if token:
        return Credentials(IDENTITY_TOKEN_USER, str(token))
    encoded = entry.get("auth")
    if encoded:
        try:
            user, sep, password = base64.b64decode(str(encoded), validate=True).decode().partition(
                ":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise UsageError(
                f"the Docker config {path}: the 'auth' of {key!r} is not base64 of USER:PASSWORD",
                hint=f"log in again with docker login {key}",
            )
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


async def run_helper(helper: str, server_url: str) -> Credentials | None:
    """Ask `docker-credential-<helper>` for `server_url`; None when it has nothing stored."""
    program = f"docker-credential-{helper}"
    executable = shutil.which(program)
    if executable is None:
        raise AuthError(
            f"the Docker config names the credential helper {helper!r}, but {program} is not "
            "on PATH",
            hint=f"install {program}, or remove it from credHelpers/credsStore in the Docker "
            "config, or pass --creds REGISTRY=USER:PASSWORD",
        )
    try:
        process = await asyncio.create_subprocess_exec(
            executable, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(server_url.encode()),
                                          HELPER_TIMEOUT)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise AuthError(f"{program} did not answer for {server_url} in {HELPER_TIMEOUT:.0f} s",
                        hint="unlock the keychain it uses, or pass --creds") from None
    except OSError as exc:
        raise AuthError(f"cannot run {program}: {exc}") from None
    text = (out or err).decode(errors="replace").strip()
    if process.returncode != 0:
        if "credentials not found" in text.lower():
            return None
        raise AuthError(f"{program} failed for {server_url}: {text or process.returncode}",
                        hint="run it by hand (echo SERVER | " + program + " get) to see why")
    try:
        doc = json.loads(out)
        username, secret = str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"{program} answered {server_url} with something other than "
                        "{\"Username\", \"Secret\"} JSON") from None
    if not username and not secret:
        return None
    return Credentials(username, secret)


class CredentialSource:
    """Credentials per registry: explicit ones first, then the Docker config (read once)."""

    def __init__(self, explicit: Mapping[str, Credentials] | None = None,
                 docker_config: Path | None = None) -> None:
        self._explicit = {registry_key(k): v for k, v in (explicit or {}).items()}
        self._config_path = docker_config
        self._config: DockerConfig | None = None
        self._cache: dict[str, Credentials | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def config(self) -> DockerConfig:
        if self._config is None:
            self._config = DockerConfig.load(self._config_path or docker_config_path())
        return self._config

    async def lookup(self, registry: str) -> Credentials | None:
        """The credentials for `registry` (a host, `docker.io` for Hub), or None for anonymous."""
        key = registry_key(registry)
        if key in self._explicit:
            return self._explicit[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one helper run per registry, even under concurrent requests
            if key not in self._cache:
                self._cache[key] = await self._from_config(registry, key)
            return self._cache[key]

    async def _from_config(self, registry: str, key: str) -> Credentials | None:
        config = self.config()
        helper = config.helper_for(key)
        if helper is not None:
            creds = await run_helper(helper, helper_server_url(registry))
            if creds is not None:
                return creds
        return config.auths.get(key)


def parse_user_password(text: str, usage: str = "--creds USER:PASSWORD") -> tuple[str, str]:
    """`USER:PASSWORD` as the command line gives it (the password may hold colons)."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise UsageError(f"{usage.split()[0]}: write {usage}")
    return user, password
