from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from gapkit.errors import NodeError
from gapkit.node.plan import BACKUP_SUFFIX, Command, FileWrite, LocalRunner, Plan, apply

ENV = PurePosixPath("/var/snap/microk8s/current/args/containerd-env")


async def plan_for(runner: LocalRunner, content: bytes) -> Plan:
    old = await runner.read_file(ENV)
    return Plan("node1", [FileWrite(ENV, content, old, why="proxy for containerd")],
                [Command(("true",), "restart MicroK8s")])


async def test_dry_run_shows_a_diff_and_writes_nothing(tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path)
    (tmp_path / str(ENV).lstrip("/")).parent.mkdir(parents=True)
    runner.local(ENV).write_bytes(b"# keep me\nulimit -n 65536\n")
    plan = await plan_for(runner, b"# keep me\nulimit -n 65536\nHTTPS_PROXY=http://p:3128\n")
    text = plan.render()
    assert f"--- {ENV}" in text and "+HTTPS_PROXY=http://p:3128" in text
    assert "$ true" in text
    assert runner.local(ENV).read_bytes() == b"# keep me\nulimit -n 65536\n"


async def test_apply_twice_changes_nothing_the_second_time_and_keeps_a_backup(
        tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path)
    runner.local(ENV).parent.mkdir(parents=True)
    runner.local(ENV).write_bytes(b"old\n")
    first = await apply(await plan_for(runner, b"new\n"), runner)
    assert first.written == [ENV] and len(first.ran) == 1
    assert runner.local(ENV).read_bytes() == b"new\n"
    backups = [p for p in runner.local(ENV).parent.iterdir() if BACKUP_SUFFIX in p.name]
    assert [b.read_bytes() for b in backups] == [b"old\n"]
    again = await plan_for(runner, b"new\n")
    assert not again.changed and "nothing to change" in again.render()
    second = await apply(again, runner)
    assert not second.changed and second.ran == []


async def test_a_file_changed_since_planning_stops_the_apply(tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path)
    plan = await plan_for(runner, b"new\n")
    runner.local(ENV).parent.mkdir(parents=True)
    runner.local(ENV).write_bytes(b"someone else\n")
    with pytest.raises(NodeError, match="changed while gapkit was planning"):
        await apply(plan, runner)
    assert runner.local(ENV).read_bytes() == b"someone else\n"


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A real read-only filesystem (root ignores permission bits, so chmod would prove nothing)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (folder / "f").write_bytes(b"old\n")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


async def test_an_unwritable_folder_is_a_clear_error_and_leaves_the_file(
        read_only_folder: Path) -> None:
    path = PurePosixPath(str(read_only_folder / "f"))
    plan = Plan("node1", [FileWrite(path, b"new\n", b"old\n")])
    with pytest.raises(NodeError, match="cannot write"):
        await apply(plan, LocalRunner(None))
    assert (read_only_folder / "f").read_bytes() == b"old\n"
    assert sorted(p.name for p in read_only_folder.iterdir()) == ["f"]


async def test_a_file_put_back_gets_its_old_mode_not_the_new_files(tmp_path: Path) -> None:
    """A 0600 file (it held a password) that a failed apply had replaced by a 0644 one must not
    come back readable by everyone."""
    runner = LocalRunner(tmp_path)
    secret = PurePosixPath("/etc/containerd/certs.d/docker.io/hosts.toml")
    other = PurePosixPath("/etc/containerd/certs.d/quay.io/hosts.toml")
    for path, mode in ((secret, 0o600), (other, 0o644)):
        runner.local(path).parent.mkdir(parents=True)
        runner.local(path).write_bytes(b"old\n")
        runner.local(path).chmod(mode)
    plan = Plan("node1", [FileWrite(secret, b"new\n", b"old\n", mode=0o644),
                          FileWrite(other, b"new\n", b"old\n", mode=0o644)])
    runner.local(other).write_bytes(b"changed meanwhile\n")  # the second write fails
    with pytest.raises(NodeError, match="were put back"):
        await apply(plan, runner)
    assert runner.local(secret).read_bytes() == b"old\n"
    assert runner.local(secret).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in runner.local(secret).parent.iterdir()) == ["hosts.toml"]


async def test_a_failing_folder_fsync_after_the_rename_is_not_a_failed_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel error cannot be made to happen here, so fsync of a folder is made to fail:
    the file is already replaced, so the apply must succeed and keep the backup."""
    from gapkit.oci import fsutil

    def failing(folder: Path) -> None:
        raise OSError(5, "Input/output error")

    runner = LocalRunner(tmp_path)
    runner.local(ENV).parent.mkdir(parents=True)
    runner.local(ENV).write_bytes(b"old\n")
    plan = await plan_for(runner, b"new\n")
    monkeypatch.setattr(fsutil, "fsync_dir", failing)
    report = await apply(plan, runner)
    assert runner.local(ENV).read_bytes() == b"new\n"
    [backup] = report.backups
    assert runner.local(backup).read_bytes() == b"old\n"
