"""`gapkit node configure` when the disk fills up, a folder is read-only, gapkit is killed
part-way, or the restart fails (issue 7, item 5).

Everything is real except `snap`/`microk8s` (the stand-ins of tests/support/microk8s.py, which
record `snap restart microk8s`, and one `snap` whose snapd is busy): the node root sits on a
small tmpfs filled to leave an exact number of pages free, or on bind mounts remounted read-only
(tests/support/mounts.py, always unmounted). A kill is a real SIGKILL of the gapkit process:
gapkit is first stopped where apply checks a file it is about to replace (a FIFO stands at that
path, so the point is set by which file gapkit has reached, not by timing), then killed there,
or at its next fsync or pipe2 by `strace` attached to it (`inject=SYSCALL:signal=SIGKILL`).

What the plan promises (gapkit/node/plan.py): each file is replaced atomically after its backup
is written, and no backup is ever replaced; when a write fails, the files written before are put
back and their backups (and the folders made for them) removed, so a failed run leaves the node
as it found it. After a kill nothing can be put back: the files before the kill point are new
(with their backups), the rest old, and a rerun converges: it removes the temp file a kill
mid-write leaves, and runs the restart a kill or a failure kept from running (the
`containerd-env.gapkit-pending` marker).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli import gapkit
from tests.support.microk8s import ARGS, StandInMicroK8s
from tests.support.mounts import PAGE, Mounts, fill

DEFAULTS = Path("/work/shared/data/microk8s/defaults")
CERTS = ARGS / "certs.d"
ENV = ARGS / "containerd-env"
PROXY = ["--proxy", "http://proxy.lan:3128", "--node-address", "198.51.100.10"]
#: An earlier configuration of quay.io, pointing at an old mirror: replaced, so backed up.
OLD_QUAY = (b'server = "https://quay.io"\n\n[host."http://10.9.9.9:5000"]\n'
            b'  capabilities = ["pull", "resolve"]\n')


def populate(root: Path, quay: bool = False) -> None:
    """MicroK8s' shipped files (as tests/node/test_configure.py sets them up)."""
    args = root / ARGS
    (args / "certs.d" / "docker.io").mkdir(parents=True)
    for name in ("containerd-env", "containerd-template.toml", "kube-proxy", "kube-apiserver"):
        shutil.copyfile(DEFAULTS / name, args / name)
    shutil.copyfile(DEFAULTS / "certs.d/docker.io/hosts.toml", args / "certs.d/docker.io/hosts.toml")
    if quay:
        (args / "certs.d" / "quay.io").mkdir()
        (args / "certs.d" / "quay.io" / "hosts.toml").write_bytes(OLD_QUAY)


def state(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every folder (a folder left behind is a difference too)."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name == "filler":
            continue
        out[name] = path.read_bytes() if path.is_file() else "<folder>" if path.is_dir() else "<other>"
    return out


def configure(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return gapkit("node", "configure", "--root", str(root), *args, check=False)


def check_failed_run(out: subprocess.CompletedProcess[str], reason: str) -> str:
    """Exit 1, one `error:` naming the file and `reason`, a hint, no traceback; the file."""
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr, out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("error:"))
    assert reason in line, out.stderr
    assert "cannot write /var/snap/microk8s/current/args/" in line, out.stderr
    assert "hint:" in out.stderr
    return line.split("cannot write ", 1)[1].split(":", 1)[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.fixture
def microk8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInMicroK8s:
    stand_in = StandInMicroK8s(tmp_path / "stand-in").install()
    monkeypatch.setenv("PATH", stand_in.path)
    return stand_in


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    with Mounts() as made:
        yield made


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n" + "QUJD" * 400 + "\n-----END CERTIFICATE-----\n")
    return path


# -- the disk fills up -----------------------------------------------------------------------------


def many_files(ca: Path) -> list[str]:
    """Seven writes: a CA and a hosts.toml per upstream (docker.io's and quay.io's replaced,
    registry.k8s.io's created with its folder), then the containerd-env edit."""
    return ["--mirror", "https://10.0.0.5:5000", "--ca", str(ca), "--registries",
            "docker.io,quay.io,registry.k8s.io", *PROXY]


def replaced_files(ca: Path) -> list[str]:
    """Two writes, both replacing a file (so both backed up): docker.io's hosts.toml, then
    containerd-env. A failure at the second leaves no created file whose removal frees room to
    put the first back."""
    return ["--mirror", "http://10.0.0.5:5000", "--registries", "docker.io", *PROXY]


@pytest.mark.parametrize("scenario", [many_files, replaced_files])
def test_disk_full_at_every_page_leaves_the_node_as_it_was_and_a_rerun_converges(
        tmp_path: Path, mounts: Mounts, microk8s: StandInMicroK8s, ca: Path,
        scenario: object) -> None:
    """The root on a 256 KiB tmpfs, filled to leave 0, 1, 2, ... pages free: each run stops at
    the next write (the first CA, a backup, a hosts.toml, containerd-env) until one fits. Each
    failed run exits 1 naming the file and saying to free space, leaves every file, folder and
    backup as it was and no temp file; after freeing the space the same command completes, and a
    third run changes nothing."""
    assert callable(scenario)
    args: list[str] = scenario(ca)
    root = mounts.tmpfs(tmp_path / "node", 256 * 1024)
    failed_at: list[str] = []
    for pages in range(40):
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        populate(root, quay=True)
        before = state(root)
        filler = fill(root, pages * PAGE)
        restarts = microk8s.restarts()
        out = configure(root, *args)
        if out.returncode == 0:
            break
        failed_at.append(check_failed_run(out, "No space left on device"))
        assert "free" in out.stderr.split("hint:", 1)[1], out.stderr
        assert state(root) == before, f"{pages} page(s) free: {out.stderr}"
        assert temp_files(root) == []
        assert microk8s.restarts() == restarts
        filler.unlink()
        rerun = configure(root, *args)
        assert rerun.returncode == 0, rerun.stderr
        done = state(root)
        for name, content in done.items():  # each backup is the old file, byte for byte
            if ".gapkit-backup-" in name:
                assert content == before[name.split(".gapkit-backup-")[0]]
        assert configure(root, *args).stderr.count("already configured") == 1
        assert state(root) == done
    else:
        raise AssertionError("configure never fitted")
    assert len(failed_at) >= 3 and len(set(failed_at)) >= 2, failed_at
    assert any(".gapkit-backup-" in name for name in failed_at), failed_at  # while backing up
    assert any(name.endswith("containerd-env") for name in failed_at), failed_at


# -- a read-only folder ----------------------------------------------------------------------------


def test_a_read_only_args_folder_at_the_last_file_puts_back_six_files_and_two_folders(
        tmp_path: Path, mounts: Mounts, microk8s: StandInMicroK8s, ca: Path) -> None:
    """`args/` read-only (a bind mount remounted ro) with `certs.d/` writable under it: every
    CA and hosts.toml is written, then containerd-env fails. The six written files are put back
    (quay.io's and docker.io's old hosts.toml, the CAs and registry.k8s.io's folder removed),
    no backup is left; remounted read-write, the same command completes."""
    real = tmp_path / "real"
    populate(real, quay=True)
    root = tmp_path / "node"
    (root / ARGS).mkdir(parents=True)
    args_folder = mounts.read_only_bind(real / ARGS, root / ARGS)
    mounts.bind(real / CERTS, root / CERTS)
    before = state(root)
    out = configure(root, *many_files(ca))
    assert "args/containerd-env" in check_failed_run(out, "Read-only file system")
    assert "put back" in out.stderr and "read-only" in out.stderr.split("hint:", 1)[1]
    assert state(root) == before
    subprocess.run(["mount", "-o", "remount,bind,rw", str(args_folder)], check=True)
    assert configure(root, *many_files(ca)).returncode == 0
    assert microk8s.restarts() == 1
    assert b"HTTPS_PROXY=http://proxy.lan:3128" in (root / ENV).read_bytes()


# -- killed between two files ----------------------------------------------------------------------


def open_when_read(fifo: Path, process: subprocess.Popen[str], deadline: float) -> int:
    """Wait (no fixed sleep decides anything) until `process` opens `fifo` to read it."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        if process.poll() is not None:
            raise AssertionError(f"gapkit ended before reading {fifo}: {process.stderr}")
        assert time.monotonic() < deadline, f"gapkit never read {fifo}"
        time.sleep(0.005)


def wait_open(fifo: Path, process: subprocess.Popen[str], deadline: float, want: bool) -> None:
    """Wait until a file descriptor of `process` is open on `fifo` (`want`), or none is."""
    fds = Path(f"/proc/{process.pid}/fd")
    while True:
        opened = set()
        for fd in fds.iterdir():
            try:
                opened.add(os.readlink(fd))
            except FileNotFoundError:
                continue
        if (str(fifo) in opened) == want:
            return
        assert time.monotonic() < deadline, f"gapkit never {'opened' if want else 'closed'} {fifo}"
        time.sleep(0.005)


class Stopped:
    """gapkit (`node configure` ARGS) run with a FIFO at `path` (an existing file of the plan),
    stopped where apply checks that file before replacing it: planning's read of the FIFO is
    given the old content and seen to finish; apply's read then opens the FIFO and waits for
    bytes, with `fd` the open writing end. `release()` gives it the old content again so gapkit
    goes on (to a kill set up by `strace_kill`); `close()` ends whatever is still running and
    puts the real file back (the FIFO only stood in to stop gapkit there)."""

    def __init__(self, root: Path, path: Path, args: list[str]) -> None:
        self.fifo = root / path
        self.old = self.fifo.read_bytes()
        self.fifo.unlink()
        os.mkfifo(self.fifo)
        self.started: list[subprocess.Popen[str]] = []
        self.process = self.start([sys.executable, "-m", "gapkit", "node", "configure",
                                   "--root", str(root), *args], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 30
        fd = open_when_read(self.fifo, self.process, deadline)
        os.write(fd, self.old)
        wait_open(self.fifo, self.process, deadline, want=True)
        os.close(fd)
        wait_open(self.fifo, self.process, deadline, want=False)
        self.fd: int | None = open_when_read(self.fifo, self.process, deadline)

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
        started: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            argv, stderr=subprocess.PIPE, text=True, **kwargs)
        self.started.append(started)
        return started

    def strace_kill(self, syscall: str) -> None:
        """SIGKILL gapkit at its next `syscall` (any thread), by `strace` attached to it now."""
        tracer = self.start(["strace", "-f", "-p", str(self.process.pid), "-o", "/dev/null",
                             "-e", f"trace={syscall}", "-e",
                             f"inject={syscall}:signal=SIGKILL:when=1"])
        assert tracer.stderr is not None
        attached = tracer.stderr.readline()  # "Process N attached [with T threads]": all of them
        assert "attached" in attached, attached + tracer.stderr.read()

    def killed_at(self, syscall: str) -> None:
        """Let gapkit go on and SIGKILL it at its next `syscall`; then end the rest."""
        self.strace_kill(syscall)
        self.release()
        assert self.process.wait(timeout=30) == -signal.SIGKILL
        self.close()

    def release(self) -> None:
        assert self.fd is not None
        os.write(self.fd, self.old)
        self.close_fd()

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        while self.started:
            started = self.started.pop()
            if started.poll() is None:
                started.kill()
            started.communicate()
        self.close_fd()
        if not self.fifo.is_file():
            self.fifo.unlink()
            self.fifo.write_bytes(self.old)


@pytest.fixture
def stop_at(tmp_path: Path) -> Iterator[Callable[..., Stopped]]:
    made: list[Stopped] = []

    def make(root: Path, path: Path, args: list[str]) -> Stopped:
        made.append(Stopped(root, path, args))
        return made[-1]

    try:
        yield make
    finally:
        for stopped in made:
            stopped.close()


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


#: Plan order of `many_files`: the paths, and which of them existed before.
ORDER = [CERTS / "docker.io/ca.crt", CERTS / "docker.io/hosts.toml", CERTS / "quay.io/ca.crt",
         CERTS / "quay.io/hosts.toml", CERTS / "registry.k8s.io/ca.crt",
         CERTS / "registry.k8s.io/hosts.toml", ENV]


@pytest.mark.parametrize("kill_at", [CERTS / "docker.io/hosts.toml", CERTS / "quay.io/hosts.toml",
                                     ENV], ids=["docker.io", "quay.io", "containerd-env"])
def test_killed_between_files_the_earlier_files_are_new_with_backups_and_a_rerun_converges(
        tmp_path: Path, microk8s: StandInMicroK8s, ca: Path, kill_at: Path,
        stop_at: Callable[..., Stopped]) -> None:
    """gapkit is SIGKILLed where apply checks `kill_at` before replacing it (`Stopped`). Then:
    every file before `kill_at` in the plan is new, with a backup of the old one beside it when
    there was one; `kill_at` and every later file are old; no temp file; no restart. The rerun
    writes the rest (backing them up), restarts MicroK8s once, and a third run changes
    nothing."""
    root = tmp_path / "node"
    populate(root, quay=True)
    before = {path: (root / path).read_bytes() if (root / path).is_file() else None
              for path in ORDER}
    stopped = stop_at(root, kill_at, many_files(ca))
    stopped.process.send_signal(signal.SIGKILL)
    assert stopped.process.wait(timeout=30) == -signal.SIGKILL
    stopped.close()

    killed = ORDER.index(kill_at)
    for i, path in enumerate(ORDER):
        now = (root / path).read_bytes() if (root / path).is_file() else None
        backups = list((root / path).parent.glob(path.name + ".gapkit-backup-*"))
        if i < killed:
            assert now is not None and now != before[path], path
            assert [b.read_bytes() for b in backups] == ([] if before[path] is None
                                                         else [before[path]]), path
        else:
            assert now == before[path] and backups == [], path
    assert temp_files(root) == []
    assert microk8s.restarts() == 0
    assert (root / ARGS / "containerd-env.gapkit-pending").exists() == (kill_at == ENV)

    rerun = configure(root, *many_files(ca))
    assert rerun.returncode == 0, rerun.stderr
    assert "already as wanted" in rerun.stdout or killed == 1
    assert microk8s.restarts() == 1
    assert not (root / ARGS / "containerd-env.gapkit-pending").exists()
    for path in ORDER:
        backups = list((root / path).parent.glob(path.name + ".gapkit-backup-*"))
        assert [b.read_bytes() for b in backups] == ([] if before[path] is None else [before[path]])
    done = state(root)
    again = configure(root, *many_files(ca))
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert state(root) == done and microk8s.restarts() == 1


@needs_strace
def test_killed_while_writing_a_backup_the_rerun_sweeps_the_temp_file_and_converges(
        tmp_path: Path, microk8s: StandInMicroK8s, ca: Path,
        stop_at: Callable[..., Stopped]) -> None:
    """gapkit stopped at containerd-env, then killed at its next fsync: the temp file of
    containerd-env's backup is fully written but never renamed (what a power cut or an OOM kill
    there leaves). The six earlier files are new with their backups, containerd-env is old and
    has no backup yet; the rerun removes the dead process's temp file and converges."""
    root = tmp_path / "node"
    populate(root, quay=True)
    stopped = stop_at(root, ENV, many_files(ca))
    stopped.killed_at("fsync")

    [temp] = temp_files(root)
    assert temp.name.startswith(".containerd-env.gapkit-backup-") and temp.read_bytes() == stopped.old
    assert not list((root / ARGS).glob("containerd-env.gapkit-backup-*"))
    for path in ORDER[:-1]:
        assert (root / path).is_file(), path
    assert microk8s.restarts() == 0

    assert configure(root, *many_files(ca)).returncode == 0
    assert temp_files(root) == []
    assert [b.read_bytes() for b in (root / ARGS).glob("containerd-env.gapkit-backup-*")] == \
        [stopped.old]
    assert microk8s.restarts() == 1
    assert "nothing to change" in configure(root, *many_files(ca)).stdout


# -- the restart after containerd-env changed does not happen --------------------------------------


@needs_strace
def test_killed_after_the_files_before_the_restart_the_rerun_restarts(
        tmp_path: Path, microk8s: StandInMicroK8s, ca: Path,
        stop_at: Callable[..., Stopped]) -> None:
    """Killed when gapkit starts `snap restart microk8s` (its first pipe2: the command's output
    pipes), after all seven files are written: containerd still runs with the old
    containerd-env. The rerun has no file to change, and must still restart MicroK8s."""
    root = tmp_path / "node"
    populate(root, quay=True)
    stopped = stop_at(root, ENV, many_files(ca))
    stopped.killed_at("pipe2")
    assert b"HTTPS_PROXY=http://proxy.lan:3128" in (root / ENV).read_bytes()
    assert microk8s.restarts() == 0

    rerun = configure(root, *many_files(ca))
    assert rerun.returncode == 0, rerun.stderr
    assert "$ snap restart microk8s" in rerun.stdout and "did not run" in rerun.stdout
    assert microk8s.restarts() == 1
    assert not (root / ARGS / "containerd-env.gapkit-pending").exists()
    done = state(root)
    again = configure(root, *many_files(ca))
    assert "nothing to change" in again.stdout and microk8s.restarts() == 1
    assert state(root) == done


def test_a_failed_restart_runs_again_on_the_rerun(
        tmp_path: Path, microk8s: StandInMicroK8s, monkeypatch: pytest.MonkeyPatch) -> None:
    """`snap restart microk8s` fails (snapd busy: a `snap` stand-in that says so): the command
    exits 1 naming it; the files are written. The rerun, with snap working again, restarts even
    though no file changes; the run after that changes nothing and does not restart."""
    root = tmp_path / "node"
    populate(root)
    broken = tmp_path / "broken-snap"
    broken.mkdir()
    (broken / "snap").write_text(
        "#!/bin/sh\n# stand-in for a `snap` whose snapd is busy (tests only)\n"
        "echo 'error: snap \"microk8s\" has \"refresh\" change in progress' >&2\nexit 10\n")
    (broken / "snap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}{microk8s.path}")
    first = configure(root, *PROXY)
    assert first.returncode == 1 and "`snap restart microk8s` failed" in first.stderr
    assert b"HTTPS_PROXY=http://proxy.lan:3128" in (root / ENV).read_bytes()
    monkeypatch.setenv("PATH", microk8s.path)
    second = configure(root, *PROXY)
    assert second.returncode == 0, second.stderr
    assert microk8s.restarts() == 1
    third = configure(root, *PROXY)
    assert "nothing to change" in third.stdout and microk8s.restarts() == 1


# -- an earlier backup ---------------------------------------------------------------------------


def test_a_backup_from_an_earlier_run_in_the_same_second_is_never_overwritten(
        tmp_path: Path, microk8s: StandInMicroK8s) -> None:
    """Backups are named by the second (`.gapkit-backup-YYYYmmddTHHMMSSZ`); two runs within one
    second (a script configuring one mirror, then another) must not replace the first run's
    backup, the only copy of MicroK8s' file. Backups named for every second of the next ten are
    there before the run: each stays as it was, and the run's own backup is a new name."""
    root = tmp_path / "node"
    populate(root)
    hosts = root / CERTS / "docker.io/hosts.toml"
    original = hosts.read_bytes()
    now = time.time()
    earlier = {hosts.with_name(hosts.name + ".gapkit-backup-" + time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime(now + s))): f"backup {s}\n".encode() for s in range(10)}
    for path, content in earlier.items():
        path.write_bytes(content)
    assert configure(root, "--mirror", "http://10.0.0.5:5000", "--registries",
                     "docker.io").returncode == 0
    for path, content in earlier.items():
        assert path.read_bytes() == content
    backups = [p.read_bytes() for p in hosts.parent.glob("hosts.toml.gapkit-backup-*")]
    assert backups.count(original) == 1 and len(backups) == len(earlier) + 1
