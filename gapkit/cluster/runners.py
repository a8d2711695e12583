"""Runners for remote nodes (SSH, agentless), and fan-out over many nodes at once.

`SSHRunner` implements `gapkit.node.plan.Runner` over asyncssh, so every node function (check,
configure, install plans) runs on a remote node unchanged. The node needs only `sh` and the
usual POSIX tools (`cat`, `mv`, `mkdir`, `sha256sum`); gapkit never runs there.

- Commands: `argv` is quoted for the node's shell; with `sudo`, `sudo -n --` goes first (no
  password prompt: a sudo that wants one fails at once, and says so). Each command has a
  timeout (`command_timeout`; `run(..., timeout=)`): gapkit stops waiting and closes the
  channel (a command that never reads or writes again may go on running on the node). Every
  result is kept in `history`. At most `MAX_SESSIONS` commands run at once per node, below
  sshd's default `MaxSessions 10`.
- Files: `write_file` streams the content to `sh` on the node, which writes a temp file in the
  same folder, `sync`s it, and renames it over the target (through sudo when set).
- Uploads: `upload()` skips a file already there with the same sha256; otherwise it copies over
  SFTP to a temp name (in the target folder; with sudo, in the user's home, then moved beside
  the target as root), checks the sha256 on the node, and only then renames: a file is never
  left half-uploaded under its real name.
- Host keys: checked against `known_hosts` (default `~/.ssh/known_hosts`). A node not in it is
  refused unless `accept_new_host_keys` is set: then its key is trusted on first connect,
  appended to `known_hosts`, and the fingerprint is reported (`notes`), as OpenSSH's
  `StrictHostKeyChecking=accept-new` does. A key that differs from the known one is always
  refused. The safe default is "refuse": run `ssh-keyscan` and compare fingerprints first, or
  set the option when you trust the network.
- Authentication: the inventory's `key`, else the ssh agent and `~/.ssh/id_*` (asyncssh's
  defaults). Passwords are never asked for.

Errors are `NodeStepError`s naming the node and the step (connect, a command, an upload).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

import asyncssh

from gapkit.cluster.inventory import SSHTarget
from gapkit.errors import GapkitError, NodeStepError
from gapkit.node.plan import CommandResult
from gapkit.oci.fsutil import file_digest

T = TypeVar("T")
K = TypeVar("K")

#: Exit codes of the small scripts below.
_MISSING = 20
_IS_DIR = 21
_READ = 'test -d "$1" && exit 21; test -e "$1" || exit 20; exec cat -- "$1"'
_WRITE = (
    'set -e; d=$(dirname -- "$1"); mkdir -p -- "$d"; '
    't="$d/.$(basename -- "$1").gapkit-$2"; trap \'rm -f -- "$t"\' EXIT; '
    'cat > "$t"; chmod "$3" "$t"; sync "$t" 2>/dev/null || true; mv -f -- "$t" "$1"; trap - EXIT; '
    'sync "$d" 2>/dev/null || true')
_LIST = 'test -d "$1" || exit 20; cd -- "$1" && ls -A1'
_MODE = 'test -e "$1" || exit 20; exec stat -c %a -- "$1"'
#: $1 uploaded file, $2 temp name beside the target, $3 target, $4 mode, $5 expected sha256.
_FINISH = (
    'set -e; mkdir -p -- "$(dirname -- "$3")"; '
    'if [ "$1" != "$2" ]; then mv -f -- "$1" "$2"; fi; '
    'if [ "$(id -u)" = 0 ]; then chown 0:0 "$2"; fi; chmod "$4" "$2"; '
    'sum=$(sha256sum -- "$2" | cut -d" " -f1); '
    'if [ "$sum" != "$5" ]; then rm -f -- "$2"; echo "sha256 on the node is $sum" >&2; exit 3; fi; '
    'sync "$2" 2>/dev/null || true; mv -f -- "$2" "$3"')
_SHA256 = 'test -f "$1" || exit 20; sha256sum -- "$1" | cut -d" " -f1'
#: Commands at once over one connection: sshd's default MaxSessions is 10, SFTP takes one.
MAX_SESSIONS = 8


def known_hosts_name(address: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: `addr`, or `[addr]:port` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


@dataclass
class UploadResult:
    remote: PurePosixPath
    sha256: str
    size: int
    skipped: bool


class SSHRunner:
    """One node over SSH; use as `async with SSHRunner(target) as runner:`."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self.name = target.name
        self.history: list[CommandResult] = []
        #: What the operator should know (a host key accepted on first connect...).
        self.notes: list[str] = []
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        # sshd allows 10 sessions per connection (MaxSessions); the SFTP client holds one.
        self._sessions = asyncio.Semaphore(MAX_SESSIONS)

    # --- connection ---------------------------------------------------------------------------

    async def __aenter__(self) -> SSHRunner:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, step: str, message: str, hint: str | None = None,
               output: str = "") -> NodeStepError:
        return NodeStepError(self.name, step, message, hint, output)

    def _host_known(self) -> bool:
        t = self.target
        if not t.known_hosts.is_file():
            return False
        try:
            known = asyncssh.read_known_hosts(str(t.known_hosts))
        except (OSError, ValueError, asyncssh.Error):
            return False
        host_keys, ca_keys, revoked, *_ = known.match(t.address, t.address, t.port)
        return bool(host_keys or ca_keys or revoked)

    async def connect(self) -> None:
        if self._conn is not None:
            return
        t = self.target
        where = f"{t.user}@{t.address}:{t.port}"
        known = self._host_known()
        accept_new = t.accept_new_host_keys and not known
        if not accept_new and not t.known_hosts.is_file():
            raise self._error("connect", f"no known_hosts file {t.known_hosts} to check the host "
                              "key of " + where,
                              hint="add the node's key (`ssh-keyscan -p PORT ADDR >> FILE`, then "
                              "compare fingerprints), or set `accept_new_host_keys: true`")
        # A key named in the inventory is the only one tried; without one, asyncssh's defaults:
        # the agent (SSH_AUTH_SOCK), then ~/.ssh/id_*.
        auth: dict[str, object] = (
            {"client_keys": [str(t.key)], "agent_path": None} if t.key is not None else {})
        try:
            conn = await asyncio.wait_for(asyncssh.connect(
                t.address, t.port, username=t.user,
                known_hosts=None if accept_new else str(t.known_hosts),
                password=None, kbdint_auth=False, gss_auth=False, **auth,
                connect_timeout=t.connect_timeout, login_timeout=t.connect_timeout,
                keepalive_interval=15, keepalive_count_max=4,
            ), t.connect_timeout + 5)
        except asyncssh.HostKeyNotVerifiable as exc:
            if not known:
                raise self._error("connect", f"the host key of {where} is unknown: it is not in "
                                  f"{t.known_hosts}",
                                  hint=f"add it (`ssh-keyscan -p {t.port} {t.address} >> "
                                  f"{t.known_hosts}`, then compare the fingerprint with the "
                                  "node's `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), "
                                  "or set `accept_new_host_keys: true` to trust it on first "
                                  "connect") from None
            raise self._error("connect", f"the host key of {where} is not the one in "
                              f"{t.known_hosts} ({exc.reason})",
                              hint="if the node was reinstalled, remove its old key with "
                              f"`ssh-keygen -f {t.known_hosts} -R '{known_hosts_name(t.address, t.port)}'`"
                              " and compare the new fingerprint; otherwise someone may be in between"
                              ) from None
        except asyncssh.PermissionDenied:
            key = f"key {t.key}" if t.key else "the ssh agent's and ~/.ssh's keys"
            raise self._error("connect", f"{where} refused {key}",
                              hint=f"add the public key to ~{t.user}/.ssh/authorized_keys on the "
                              "node, or set `key:` / `user:` in the inventory") from None
        except (asyncio.TimeoutError, asyncssh.misc.ConnectionLost) as exc:
            raise self._error("connect", f"{where} did not answer within {t.connect_timeout:g} s"
                              + (f" ({exc})" if str(exc) else ""),
                              hint="check the address and port, that sshd runs on the node, and "
                              "that no firewall drops SSH") from None
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise self._error("connect", f"cannot reach {where}: {why}",
                              hint="check the address and port, and that sshd runs on the node"
                              ) from None
        except (asyncssh.Error, ValueError) as exc:
            raise self._error("connect", f"{where}: {exc}") from None
        if accept_new:
            key_obj = conn.get_server_host_key()
            if key_obj is not None:
                line = key_obj.export_public_key("openssh").decode().split()
                entry = f"{known_hosts_name(t.address, t.port)} {line[0]} {line[1]}\n"
                try:
                    t.known_hosts.parent.mkdir(parents=True, exist_ok=True)
                    with open(t.known_hosts, "a", encoding="ascii") as f:
                        f.write(entry)
                except OSError as exc:
                    conn.close()
                    raise self._error("connect", f"cannot add the host key to {t.known_hosts}: "
                                      f"{exc.strerror}") from None
                self.notes.append(f"accepted the new host key of {where} "
                                  f"({key_obj.get_fingerprint()}) into {t.known_hosts}")
        self._conn = conn

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise self._error("connect", "not connected")
        return self._conn

    # --- commands -----------------------------------------------------------------------------

    def command_line(self, argv: Sequence[str], sudo: bool | None = None) -> str:
        line = shlex.join(argv)
        use_sudo = self.target.sudo if sudo is None else sudo
        return f"sudo -n -- {line}" if use_sudo else line

    async def _exec(self, argv: Sequence[str], stdin: bytes | Path | None, timeout: float | None,
                    step: str | None, sudo: bool | None = None) -> tuple[int, bytes, bytes]:
        line = self.command_line(argv, sudo)
        shown = shlex.join(argv)
        step = step or f"`{shown[:200]}`"
        limit = timeout if timeout is not None else self.target.command_timeout
        await self.connect()
        try:
            if isinstance(stdin, Path) and not stdin.is_file():
                raise self._error(step, f"cannot read {stdin}: no such file")
            async with self._sessions:
                if isinstance(stdin, Path):
                    result = await self.conn.run(line, stdin=stdin, encoding=None, check=False,
                                                 timeout=limit)
                elif stdin:
                    result = await self.conn.run(line, input=stdin, encoding=None, check=False,
                                                 timeout=limit)
                else:  # asyncssh never closes an empty `input`: the command would wait for it
                    result = await self.conn.run(line, stdin=asyncssh.DEVNULL, encoding=None,
                                                 check=False, timeout=limit)
        except asyncssh.TimeoutError as exc:
            printed = _text(exc.stdout) + _text(exc.stderr)
            raise self._error(step, f"no answer within {limit:g} s; stopped", output=printed,
                              hint="the node is slow or the command hangs; see its output "
                              "above, raise `command_timeout` if it only needs longer") from None
        except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost, asyncssh.DisconnectError,
                BrokenPipeError, ConnectionError) as exc:
            self._conn = None
            self._sftp = None
            raise self._error(step, f"the connection was lost ({exc})",
                              hint="check that the node and its sshd are up, then run again: "
                              "finished steps are not done twice") from None
        code = result.exit_status if result.exit_status is not None else 255
        if result.exit_signal:
            code = 128 + 9
        out = bytes(result.stdout) if isinstance(result.stdout, (bytes, bytearray)) else b""
        err = bytes(result.stderr) if isinstance(result.stderr, (bytes, bytearray)) else b""
        if self.target.sudo and (sudo is None or sudo) and code == 1 \
                and b"sudo: a password is required" in err:
            raise self._error(step, f"sudo wants a password for {self.target.user}",
                              hint="allow the user passwordless sudo (NOPASSWD) on the node, "
                              "or connect as root (`user: root`, `sudo: false`)",
                              output=_text(err))
        self.history.append(CommandResult(tuple(argv), code, _text(out), _text(err)))
        return code, out, err

    async def run(self, argv: Sequence[str], stdin: bytes | Path | None = None,
                  timeout: float | None = None, step: str | None = None) -> CommandResult:
        """Run `argv` on the node (through sudo when set); a failing command is no error here."""
        code, out, err = await self._exec(argv, stdin, timeout, step)
        return CommandResult(tuple(argv), code, _text(out), _text(err))

    async def check(self, argv: Sequence[str], stdin: bytes | Path | None = None,
                    timeout: float | None = None, step: str | None = None) -> CommandResult:
        """`run`, and a NodeStepError (with the output) when the command fails."""
        result = await self.run(argv, stdin, timeout, step)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise self._error(step or f"`{shlex.join(argv)[:200]}`",
                              f"failed with exit code {result.returncode}" +
                              (f": {output[-500:]}" if output else ""), output=output)
        return result

    # --- files --------------------------------------------------------------------------------

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        code, out, err = await self._exec(["sh", "-c", _READ, "sh", str(path)], None, None,
                                          f"read {path}")
        if code == _MISSING:
            return None
        if code == _IS_DIR:
            raise self._error(f"read {path}", "it is a folder, not a file")
        if code != 0:
            raise self._error(f"read {path}", f"cannot read it: {_text(err).strip()}")
        return out

    async def write_file(self, path: PurePosixPath, content: bytes, mode: int) -> None:
        code, _, err = await self._exec(
            ["sh", "-c", _WRITE, "sh", str(path), secrets.token_hex(4), f"{mode:o}"], content,
            None, f"write {path}")
        if code != 0:
            raise self._error(f"write {path}", f"cannot write it: {_text(err).strip()}",
                              hint="check the folder is writable (set `sudo: true`?)")

    async def remove_file(self, path: PurePosixPath) -> None:
        code, _, err = await self._exec(["rm", "-f", "--", str(path)], None, None,
                                        f"remove {path}")
        if code != 0:
            raise self._error(f"remove {path}", f"cannot remove it: {_text(err).strip()}")

    async def file_mode(self, path: PurePosixPath) -> int | None:
        code, out, err = await self._exec(["sh", "-c", _MODE, "sh", str(path)], None, None,
                                          f"mode of {path}")
        if code == _MISSING:
            return None
        try:
            if code != 0:
                raise ValueError
            return int(_text(out).strip(), 8)
        except ValueError:
            raise self._error(f"mode of {path}", f"stat failed: {_text(err).strip()}") from None

    async def list_dir(self, path: PurePosixPath) -> list[str] | None:
        code, out, err = await self._exec(["sh", "-c", _LIST, "sh", str(path)], None, None,
                                          f"list {path}")
        if code == _MISSING:
            return None
        if code != 0:
            raise self._error(f"list {path}", f"cannot list it: {_text(err).strip()}")
        return sorted(name for name in _text(out).splitlines() if name)

    async def sha256(self, path: PurePosixPath) -> str | None:
        """The sha256 of a file on the node, None when there is none."""
        code, out, err = await self._exec(["sh", "-c", _SHA256, "sh", str(path)], None, None,
                                          f"sha256 of {path}")
        if code == _MISSING:
            return None
        if code != 0:
            raise self._error(f"sha256 of {path}", f"sha256sum failed: {_text(err).strip()}")
        return _text(out).strip() or None

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        await self.connect()
        if self._sftp is None:
            try:
                self._sftp = await self.conn.start_sftp_client()
            except (asyncssh.Error, OSError) as exc:
                raise self._error("sftp", f"cannot start SFTP: {exc}",
                                  hint="the node's sshd needs the sftp subsystem") from None
        return self._sftp

    async def upload(self, local: Path, remote: PurePosixPath, mode: int = 0o644,
                     progress: Callable[[int, int], None] | None = None) -> UploadResult:
        """Put `local` at `remote` unless the same bytes (sha256) are there already."""
        step = f"upload {local.name} to {remote}"
        try:
            size = local.stat().st_size
        except OSError as exc:
            raise self._error(step, f"cannot read {local}: {exc.strerror}") from None
        digest = await asyncio.to_thread(file_digest, local)
        if await self.sha256(remote) == digest:
            return UploadResult(remote, digest, size, True)
        token = secrets.token_hex(4)
        beside = remote.with_name(f".{remote.name}.gapkit-{token}")
        sftp = await self._sftp_client()
        if self.target.sudo:
            # The user cannot write root's folders: upload to its home, then move as root.
            staged = PurePosixPath(f".gapkit-upload-{remote.name}-{token}")
        else:
            staged = beside
            await self._exec(["mkdir", "-p", "--", str(remote.parent)], None, None, step)

        def handler(_src: bytes, _dst: bytes, done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)

        try:
            await sftp.put(str(local), str(staged), progress_handler=handler)
        except (asyncssh.SFTPError, asyncssh.Error, OSError) as exc:
            with contextlib.suppress(Exception):
                await sftp.remove(str(staged))
            lost = isinstance(exc, (asyncssh.ConnectionLost, asyncssh.SFTPConnectionLost,
                                    ConnectionError))
            if lost:
                self._conn = None
                self._sftp = None
            raise self._error(step, f"SFTP failed: {exc}",
                              hint="nothing was left under the real name; run again") from None
        code, _, err = await self._exec(
            ["sh", "-c", _FINISH, "sh", str(staged), str(beside), str(remote), f"{mode:o}", digest],
            None, None, step)
        if code != 0:
            with contextlib.suppress(GapkitError):
                await self._exec(["rm", "-f", "--", str(staged), str(beside)], None, None, step)
            raise self._error(step, f"the file did not arrive whole: {_text(err).strip()}"
                              if code == 3 else f"cannot put it in place: {_text(err).strip()}",
                              hint="nothing was left under the real name; run again")
        return UploadResult(remote, digest, size, False)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


# --- many nodes at once --------------------------------------------------------------------------


@dataclass
class NodeResult(Generic[T]):
    """What one node's coroutine gave: a value, or the error it raised."""

    node: str
    value: T | None = None
    error: GapkitError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class FanOut(Generic[T]):
    results: list[NodeResult[T]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def errors(self) -> list[NodeResult[T]]:
        return [r for r in self.results if not r.ok]

    def values(self) -> dict[str, T]:
        return {r.node: r.value for r in self.results if r.ok and r.value is not None}

    def raise_first(self) -> None:
        """Raise a NodeStepError listing every node that failed (the first one's hint)."""
        failed = self.errors
        if not failed:
            return
        first = failed[0].error
        assert first is not None
        if len(failed) == 1:
            raise first
        lines = "\n".join(f"  {r.error}" for r in failed)
        raise NodeStepError(", ".join(r.node for r in failed), "several nodes",
                           f"{len(failed)} nodes failed:\n{lines}", first.hint)


async def fan_out(items: Iterable[K], fn: Callable[[K], Awaitable[T]], limit: int = 10,
                  name: Callable[[K], str] = str) -> FanOut[T]:
    """Run `fn(item)` for every item, at most `limit` at once; every node's result or error.

    One node failing does not stop the others: a `GapkitError` becomes that node's error.
    Any other exception is a bug and propagates (after the others finish).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    gate = asyncio.Semaphore(limit)

    async def one(item: K) -> NodeResult[T]:
        async with gate:
            try:
                return NodeResult(name(item), await fn(item))
            except GapkitError as exc:
                return NodeResult(name(item), error=exc)

    results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return FanOut([r for r in results if isinstance(r, NodeResult)])


@contextlib.asynccontextmanager
async def connected(targets: Sequence[SSHTarget], limit: int = 10
                    ) -> AsyncIterator[tuple[dict[str, SSHRunner], dict[str, GapkitError]]]:
    """Connect to every target at once: the runners that connected, and the others' errors.

    Every runner is closed on the way out.
    """
    runners = {t.name: SSHRunner(t) for t in targets}

    async def connect(runner: SSHRunner) -> SSHRunner:
        await runner.connect()
        return runner

    try:
        done = await fan_out(runners.values(), connect, limit, name=lambda r: r.name)
        errors = {r.node: r.error for r in done.errors if r.error is not None}
        yield {n: r for n, r in runners.items() if n not in errors}, errors
    finally:
        await asyncio.gather(*(r.close() for r in runners.values()), return_exceptions=True)
