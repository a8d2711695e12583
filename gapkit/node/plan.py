"""Plans: what a change to a node will write and run, shown before it is applied.

As in pyinfra and Terraform, node functions read the current state (through a `Runner`) and
return a `Plan`; nothing is changed while planning. A plan prints as a unified diff
(`--dry-run`), and `apply()` carries it out through the same runner: each file is written
atomically (temp file, fsync, rename) after its previous content is backed up (beside it, as
`NAME.gapkit-backup-STAMP`; a backup is never replaced), and commands
marked `only_if_changed` run only when a file really changed (or, with `when_changed`, only
when one of the named files changed), so applying a plan twice changes nothing the second time
and says so. If a write fails, the files already written are put back as they were (and their
backups removed, and the folders made for them), so a failed apply leaves every file as it
found it. A killed apply cannot put anything back: the files before the kill are new, each with
its backup, the rest are old, and running the command again finishes the job (removing the temp
file a kill in the middle of a write leaves). A `when_changed` command is noted as pending
(`pending_path`) before its files are written and until it succeeds, so a command that a kill or
a failure kept from running runs on the next apply (`resume_pending`, called by the planner)
even though its files are then already as wanted.

Runners: `LocalRunner` here (with `root`, every path is under that folder: for tests and for
preparing an image); the SSH runner lives in `gapkit.cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import difflib
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from gapkit.errors import NodeError
from gapkit.oci.fsutil import atomic_write, remove_dead_temps

BACKUP_SUFFIX = ".gapkit-backup-"
#: Beside a command's first `when_changed` file while the command is still to run.
PENDING_SUFFIX = ".gapkit-pending"


@dataclass(frozen=True)
class FileWrite:
    """Write `content` to `path` (a path on the node); `old` is what is there now (None: absent)."""

    path: PurePosixPath
    content: bytes
    old: bytes | None
    mode: int = 0o644
    why: str = ""
    #: Secrets in the content (a password, a token) shown as `***` in the diff.
    redact: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.old != self.content

    def _shown(self, data: bytes) -> str:
        text = data.decode("utf-8", "replace")
        for secret in self.redact:
            if secret:
                text = text.replace(secret, "***")
        return text

    def diff(self) -> str:
        if not self.changed:
            return ""
        old = self._shown(self.old or b"").splitlines(keepends=True)
        new = self._shown(self.content).splitlines(keepends=True)
        fromfile = str(self.path) if self.old is not None else "/dev/null"
        lines = difflib.unified_diff(old, new, fromfile=fromfile, tofile=str(self.path))
        text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        return text


@dataclass(frozen=True)
class Command:
    """A command to run on the node, and why."""

    argv: tuple[str, ...]
    why: str = ""
    #: Run only when a file of the plan changed (a restart after a config edit).
    only_if_changed: bool = True
    #: With `only_if_changed`: run only when one of these files changed (not just any file).
    when_changed: tuple[PurePosixPath, ...] = ()

    def __str__(self) -> str:
        return " ".join(self.argv)


@dataclass
class Plan:
    node: str
    writes: list[FileWrite] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    #: Things the operator should know that the plan does not change (left-alone files...).
    notes: list[str] = field(default_factory=list)
    #: What planning found wrong and left alone (an unreadable file...): the plan does the rest,
    #: and the command reports failure at the end.
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(w.changed for w in self.writes) or any(
            not c.only_if_changed for c in self.commands)

    def commands_to_run(self) -> list[Command]:
        changed = {w.path for w in self.writes if w.changed}
        return [c for c in self.commands if not c.only_if_changed
                or (changed and not c.when_changed) or changed.intersection(c.when_changed)]

    def render(self) -> str:
        """The plan as a person reads it: diffs, then commands, then notes."""
        out = [f"# node {self.node}"]
        changed = [w for w in self.writes if w.changed]
        unchanged = [w for w in self.writes if not w.changed]
        for write in changed:
            if write.why:
                out.append(f"# {write.why}")
            out.append(write.diff().rstrip("\n"))
        for write in unchanged:
            out.append(f"# {write.path}: already as wanted")
        for command in self.commands_to_run():
            out.append(f"$ {command}" + (f"    # {command.why}" if command.why else ""))
        out += [f"# note: {note}" for note in self.notes]
        out += [f"# problem: {problem}" for problem in self.problems]
        if not self.changed:
            out.append("# nothing to change")
        return "\n".join(out) + "\n"

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "changed": self.changed,
            "writes": [{"path": str(w.path), "changed": w.changed, "created": w.old is None,
                        "why": w.why, "diff": w.diff()} for w in self.writes],
            "commands": [{"argv": list(c.argv), "why": c.why} for c in self.commands_to_run()],
            "notes": list(self.notes),
            "problems": list(self.problems),
        }


@dataclass
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Reads and changes one node: the local machine, or a node over SSH."""

    name: str

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        """The file's content, or None when it does not exist."""
        ...

    async def write_file(self, path: PurePosixPath, content: bytes, mode: int) -> None:
        """Replace the file atomically (temp file in the same folder, fsync, rename)."""
        ...

    async def remove_file(self, path: PurePosixPath) -> None:
        """Remove the file; a file that is not there is no error."""
        ...

    async def file_mode(self, path: PurePosixPath) -> int | None:
        """The file's permission bits (0o644), or None when it does not exist."""
        ...

    async def list_dir(self, path: PurePosixPath) -> list[str] | None:
        """Names in the folder, sorted; None when it does not exist."""
        ...

    async def run(self, argv: Sequence[str], stdin: bytes | Path | None = None) -> CommandResult:
        """Run a command; `stdin` is bytes, or a local file streamed to it (a large tar)."""
        ...


@dataclass
class ApplyReport:
    node: str
    written: list[PurePosixPath] = field(default_factory=list)
    backups: list[PurePosixPath] = field(default_factory=list)
    ran: list[CommandResult] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written or self.ran)

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "changed": self.changed,
                "written": [str(p) for p in self.written],
                "backups": [str(p) for p in self.backups],
                "ran": [{"argv": list(r.argv), "returncode": r.returncode} for r in self.ran]}


def backup_path(path: PurePosixPath, stamp: str) -> PurePosixPath:
    return path.with_name(f"{path.name}{BACKUP_SUFFIX}{stamp}")


async def _free_backup_path(path: PurePosixPath, stamp: str, runner: Runner) -> PurePosixPath:
    """`backup_path`, or with `-2`, `-3`... when a backup of that second is there already (an
    earlier run in the same second): a backup is never replaced."""
    backup, n = backup_path(path, stamp), 1
    while await runner.read_file(backup) is not None:
        n += 1
        backup = backup_path(path, f"{stamp}-{n}")
    return backup


def pending_path(command: Command) -> PurePosixPath | None:
    """Where `apply` notes that `command` is still to run: beside its first `when_changed`
    file, written before that file and removed once the command succeeded."""
    if not command.when_changed:
        return None
    path = command.when_changed[0]
    return path.with_name(path.name + PENDING_SUFFIX)


async def resume_pending(plan: Plan, runner: Runner) -> None:
    """Make a command run that an earlier apply wrote its files for but did not finish (killed,
    or the command failed), even though its files are already as wanted."""
    for i, command in enumerate(plan.commands):
        marker = pending_path(command)
        if marker is not None and await runner.read_file(marker) is not None:
            plan.commands[i] = dataclasses.replace(command, only_if_changed=False)
            plan.notes.append(f"`{command}` did not run to the end after an earlier run "
                              "(killed, or it failed): it runs now")


@dataclass(frozen=True)
class _Written:
    """A file `apply` wrote: what it was (`write.old`, `old_mode`) and where its backup is."""

    write: FileWrite
    backup: PurePosixPath | None
    old_mode: int | None


async def _roll_back(done: list[_Written], runner: Runner) -> list[str]:
    """Put back what `apply` wrote, with its old content and mode; what could not be put back,
    as messages.

    Created files go first, newest first: removing them frees room on a full disk for putting
    the replaced ones back (each needs a temp copy of its old content).
    """
    left = []
    created = [d for d in reversed(done) if d.write.old is None]
    replaced = [d for d in reversed(done) if d.write.old is not None]
    for write, backup, old_mode in ((d.write, d.backup, d.old_mode) for d in created + replaced):
        try:
            if write.old is None:
                await runner.remove_file(write.path)
            else:
                mode = old_mode if old_mode is not None else write.mode
                await runner.write_file(write.path, write.old, mode)
            if backup is not None:
                await runner.remove_file(backup)
        except NodeError as exc:
            left.append(f"{write.path} ({exc.message}; backup: {backup})")
    return left


async def apply(plan: Plan, runner: Runner) -> ApplyReport:
    """Carry out `plan`: back up and atomically write each changed file, then run commands.

    Files are checked again just before writing: if one changed since the plan was made, the
    plan is stale and nothing more is written. When a write fails (or a file is stale), the
    files written so far get their old content back and the new backups are removed, so the
    node is left as it was; the error says so (or names what could not be put back).
    """
    report = ApplyReport(plan.node)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    done: list[_Written] = []
    stray: PurePosixPath | None = None  # a backup written for a file whose write then failed
    commands = plan.commands_to_run()
    # Noted before the file is written, removed once the command succeeded (`resume_pending`).
    markers = {c.when_changed[0]: (m, f"`{c}` is still to run ({c.when_changed[0]} changed)\n")
               for c in commands if c.only_if_changed and (m := pending_path(c)) is not None}
    written_markers: dict[PurePosixPath, PurePosixPath] = {}  # file -> its marker
    try:
        for write in plan.writes:
            if not write.changed:
                continue
            if write.path in markers:
                marker, text = markers.pop(write.path)
                await runner.write_file(marker, text.encode(), 0o644)
                written_markers[write.path] = marker
            current = await runner.read_file(write.path)
            if current != write.old:
                raise NodeError(
                    f"{plan.node}: {write.path} changed while gapkit was planning",
                    hint="run the command again to plan from what is there now")
            backup, old_mode = None, None
            if current is not None:
                old_mode = await runner.file_mode(write.path)
                backup = await _free_backup_path(write.path, stamp, runner)
                await runner.write_file(backup, current, 0o600)
                stray = backup
            await runner.write_file(write.path, write.content, write.mode)
            stray = None
            done.append(_Written(write, backup, old_mode))
            report.written.append(write.path)
            if backup is not None:
                report.backups.append(backup)
    except NodeError as exc:
        # First what is no longer needed: on a full disk, its room is what putting back needs.
        written = {d.write.path for d in done}
        unneeded = [m for f, m in written_markers.items() if f not in written]
        for extra in [stray, *unneeded] if stray is not None else unneeded:
            with contextlib.suppress(NodeError):
                await runner.remove_file(extra)
        left = await _roll_back(done, runner)
        if not left:  # else a file that could not be put back keeps its marker
            for extra in [m for f, m in written_markers.items() if f in written]:
                with contextlib.suppress(NodeError):
                    await runner.remove_file(extra)
        if left:
            raise NodeError(exc.message + "; could not put back: " + "; ".join(left),
                            hint="restore those files from their backups by hand, or "
                            + (exc.hint or "fix the cause and run the command again")) from None
        put_back = f"; the {len(done)} file(s) written before were put back" if done else ""
        raise NodeError(exc.message + put_back, hint=exc.hint) from None
    for command in commands:
        result = await runner.run(command.argv)
        report.ran.append(result)
        if result.returncode != 0:
            raise NodeError(
                f"{plan.node}: `{command}` failed with exit code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}",
                hint="the files above were written and backed up; fix the cause and run again "
                "(the command runs again then, even with nothing left to change)")
        pending = pending_path(command)
        if pending is not None:
            await runner.remove_file(pending)
    return report


def _write_hint(code: int | None, path: PurePosixPath) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"free space on the filesystem that holds {path.parent} (see `df -h`), then run "
                "the command again")
    if code == errno.EROFS:
        return (f"{path.parent} is on a read-only filesystem: remount it read-write, then run the "
                "command again")
    return "check the folder exists and is writable (run as root?)"


class LocalRunner:
    """This machine; with `root`, every node path is taken under that folder."""

    def __init__(self, root: Path | None = None, name: str = "localhost") -> None:
        self.root = root
        self.name = name
        #: Folders `write_file` made; `remove_file` removes them again once they are empty.
        self.made: list[Path] = []

    def local(self, path: PurePosixPath) -> Path:
        if self.root is None:
            return Path(path)
        return self.root / str(path).lstrip("/")

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        target = self.local(path)
        try:
            return await asyncio.to_thread(target.read_bytes)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise NodeError(f"{self.name}: {path} is a folder, not a file") from None
        except OSError as exc:
            raise NodeError(f"{self.name}: cannot read {path}: {exc.strerror}") from None

    async def write_file(self, path: PurePosixPath, content: bytes, mode: int) -> None:
        await asyncio.to_thread(self._write, self.local(path), content, mode, path)

    def _write(self, target: Path, content: bytes, mode: int, shown: PurePosixPath) -> None:
        try:
            missing = [p for p in target.parents if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
                self.made.append(folder)
            remove_dead_temps(target.parent)
            atomic_write(target, content, mode)
        except OSError as exc:
            raise NodeError(f"{self.name}: cannot write {shown}: {exc.strerror}",
                            hint=_write_hint(exc.errno, shown)) from None

    async def remove_file(self, path: PurePosixPath) -> None:
        """Remove the file, and the folders `write_file` made for it that are now empty."""
        try:
            await asyncio.to_thread(self._remove, self.local(path))
        except OSError as exc:
            raise NodeError(f"{self.name}: cannot remove {path}: {exc.strerror}") from None

    def _remove(self, target: Path) -> None:
        target.unlink(missing_ok=True)
        for folder in target.parents:
            if folder not in self.made:
                return
            try:
                folder.rmdir()
            except OSError:
                return
            self.made.remove(folder)

    async def file_mode(self, path: PurePosixPath) -> int | None:
        try:
            return stat.S_IMODE((await asyncio.to_thread(os.stat, self.local(path))).st_mode)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise NodeError(f"{self.name}: cannot read the mode of {path}: {exc.strerror}") from None

    async def list_dir(self, path: PurePosixPath) -> list[str] | None:
        try:
            return sorted(await asyncio.to_thread(os.listdir, self.local(path)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise NodeError(f"{self.name}: cannot list {path}: {exc.strerror}") from None

    async def run(self, argv: Sequence[str], stdin: bytes | Path | None = None) -> CommandResult:
        with contextlib.ExitStack() as stack:
            if isinstance(stdin, Path):
                try:
                    source: int | None = stack.enter_context(open(stdin, "rb")).fileno()
                except OSError as exc:
                    raise NodeError(f"cannot read {stdin}: {exc.strerror}") from None
                data = None
            else:
                source = asyncio.subprocess.PIPE if stdin is not None else None
                data = stdin
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=source, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE)
            except FileNotFoundError:
                return CommandResult(tuple(argv), 127, "", f"{argv[0]}: command not found")
            out, err = await process.communicate(data)
        return CommandResult(tuple(argv), process.returncode or 0, out.decode(errors="replace"),
                             err.decode(errors="replace"))
