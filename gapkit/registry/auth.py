"""Basic auth from an htpasswd file, as CNCF distribution takes it: bcrypt hashes only.

`htpasswd -B` writes `$2y$`, Python's bcrypt `$2b$`; both (and the older `$2a$`) are accepted.
Any other kind (`$apr1$` MD5, `{SHA}`, crypt, plain text) is refused when the server starts,
naming the line, because distribution refuses it too and a silently ignored user is worse.

A bcrypt check costs tens of milliseconds and containerd sends the header with every request,
so each accepted user:password pair is remembered (as a keyed hash, in memory, for this run);
checks run in a worker thread so the server keeps serving meanwhile. Unknown users are checked
against a dummy hash, so answers take as long for them as for known users.

A client (by address) whose credentials failed `MAX_FAILURES` times within `FAILURE_WINDOW`
seconds has any new credentials refused without a bcrypt check until the window has passed, so
a password-guessing flood cannot take the server's CPU. The refusal is the same 401 as any
other (it tells a guesser nothing), and credentials already accepted this run still pass at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from gapkit.errors import UsageError

REALM = "gapkit"
_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
#: Remembered good credentials; more than any site has users and passwords.
_CACHE_LIMIT = 1024
#: A user line or Authorization header longer than this is not real.
MAX_CREDENTIALS = 4096
#: Failed checks from one address within `FAILURE_WINDOW` seconds before it must wait.
MAX_FAILURES = 10
FAILURE_WINDOW = 10.0
#: Addresses whose failures are remembered; past this the oldest are forgotten.
_TRACKED_CLIENTS = 4096


def _bcrypt() -> object:
    try:
        import bcrypt
    except ImportError:
        raise UsageError("--htpasswd needs the Python package bcrypt",
                         hint="install it: pip install bcrypt") from None
    return bcrypt


def _kind(hashed: str) -> str:
    if hashed.startswith("$apr1$"):
        return "an Apache MD5 ($apr1$) hash"
    if hashed.startswith("{SHA}"):
        return "a SHA-1 ({SHA}) hash"
    if hashed.startswith(("$1$", "$5$", "$6$")):
        return "a crypt(3) hash"
    return "not a bcrypt hash"


@dataclass
class Htpasswd:
    """Users and their bcrypt hashes; `check(header)` answers an Authorization header."""

    path: Path
    users: dict[str, bytes]
    _good: set[bytes] = field(default_factory=set)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _dummy: bytes = b""
    #: client address -> times of its recent failed checks (oldest first)
    _failures: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Htpasswd:
        bcrypt = _bcrypt()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read htpasswd file {path}: {exc}") from None
        users: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not user or len(line) > MAX_CREDENTIALS:
                raise UsageError(f"{path}, line {number}: not a `user:hash` line")
            if not hashed.startswith(_BCRYPT_PREFIXES):
                raise UsageError(
                    f"{path}, line {number}: the hash of user {user!r} is {_kind(hashed)}; "
                    "only bcrypt hashes are accepted (as by CNCF distribution)",
                    hint="write the file with `htpasswd -B` (or `htpasswd -Bbc FILE USER PASS`)")
            users[user] = hashed.encode()
        if not users:
            raise UsageError(f"htpasswd file {path} has no users",
                             hint="add one with `htpasswd -B FILE USER`")
        dummy = bcrypt.hashpw(secrets.token_bytes(16).hex().encode(),  # type: ignore[attr-defined]
                              next(iter(users.values()))[:29])
        return cls(path, users, _dummy=dummy)

    async def check(self, header: str | None, client: str = "") -> bool:
        """Whether `header` (the Authorization header) carries a known user and password;
        `client` is the sender's address (see the module doc on failures)."""
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if token in self._good:
            return True
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, ()) if now - t < FAILURE_WINDOW]
        if len(recent) >= MAX_FAILURES:
            return False
        hashed = self.users.get(user)
        ok = await asyncio.to_thread(_checkpw, password.encode(), hashed or self._dummy)
        ok = ok and hashed is not None
        if ok:
            if len(self._good) >= _CACHE_LIMIT:
                self._good.clear()
            self._good.add(token)
        else:
            self._failed(client, recent, now)
        return ok

    def _failed(self, client: str, recent: list[float], now: float) -> None:
        self._failures.pop(client, None)
        if len(self._failures) >= _TRACKED_CLIENTS:
            del self._failures[next(iter(self._failures))]  # the least recently failed
        self._failures[client] = [*recent[-MAX_FAILURES:], now]


def _checkpw(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:
        return False


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or len(header) > MAX_CREDENTIALS:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 once decoded
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


def challenge() -> str:
    return f'Basic realm="{REALM}"'
