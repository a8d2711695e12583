"""The SSH runner against real sshd's in network namespaces (tests/support/sshnodes.py).

Everything on the nodes is real (sshd, SFTP, sh, sudo, sha256sum); gapkit's side runs in this
process, moved into the jump namespace with `nodes.from_jump()`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from gapkit.cluster import runners
from gapkit.cluster.inventory import Inventory, load_inventory
from gapkit.cluster.runners import SSHRunner, fan_out
from gapkit.errors import GapkitError, NodeError, NodeStepError
from gapkit.node.plan import FileWrite, Plan, apply
from tests.support.sshnodes import HAS_SUDO, NOPW_USER, SUDO_USER, SSHNodes

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not Path("/usr/sbin/sshd").exists(),
    reason="SSH nodes need root, iproute2 and openssh-server")
needs_sudo = pytest.mark.skipif(not HAS_SUDO, reason="sudo is not installed (.ci/run installs it)")


@pytest.fixture
def two(ssh_nodes_factory) -> SSHNodes:  # type: ignore[no-untyped-def]
    return ssh_nodes_factory(2)


def inventory(cluster: SSHNodes, **kwargs: object) -> Inventory:
    return load_inventory(cluster.inventory(**kwargs))  # type: ignore[arg-type]


def runner(inv: Inventory, name: str) -> SSHRunner:
    return SSHRunner(inv.target(inv.node(name)))


async def test_commands_run_as_the_user_or_through_sudo(two: SSHNodes) -> None:
    inv = inventory(two, nodes={"node2": {"user": SUDO_USER}})
    with_sudo = inventory(two, nodes={"node2": {"user": SUDO_USER, "sudo": True}})
    with two.from_jump():
        async with runner(inv, "node1") as root, runner(inv, "node2") as user:
            as_root = await root.run(["sh", "-c", "id -u; hostname"])
            assert as_root.stdout.split() == ["0", "node1"]
            assert (await user.run(["id", "-u"])).stdout == "4242\n"
            if HAS_SUDO:
                async with runner(with_sudo, "node2") as sudo:
                    assert sudo.command_line(["id", "-u"]) == "sudo -n -- id -u"
                    assert (await sudo.run(["id", "-u"])).stdout == "0\n"
                    # sudo's secure_path has the stand-ins: `snap` is found through sudo too.
                    assert (await sudo.run(["sh", "-c", "command -v snap"])).returncode == 0
            failed = await root.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (failed.returncode, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
            assert root.history[-1].returncode == 3
            with pytest.raises(NodeStepError, match=r"node1: `sh -c 'exit 4'`: failed with exit code 4"):
                await root.check(["sh", "-c", "exit 4"])


@needs_sudo
async def test_a_sudo_that_wants_a_password_is_a_clear_error(two: SSHNodes) -> None:
    inv = inventory(two, nodes={"node1": {"user": NOPW_USER, "sudo": True}})
    with two.from_jump():
        async with runner(inv, "node1") as node:
            with pytest.raises(NodeStepError) as caught:
                await node.run(["true"])
    assert "node1" in caught.value.message and "sudo wants a password for nopw" in caught.value.message
    assert caught.value.hint is not None and "NOPASSWD" in caught.value.hint


@pytest.mark.parametrize("through_sudo", [False, pytest.param(True, marks=needs_sudo)])
async def test_write_file_is_atomic_and_lands_in_the_nodes_own_files(
        two: SSHNodes, through_sudo: bool) -> None:
    inv = inventory(two, nodes={"node1": {"user": SUDO_USER, "sudo": True}} if through_sudo else None)
    path = PurePosixPath("/var/snap/microk8s/current/args/containerd-env")
    with two.from_jump():
        async with runner(inv, "node1") as node:
            assert await node.read_file(path) is None
            assert await node.file_mode(path) is None
            assert await node.list_dir(path.parent) is None
            await node.write_file(path, b"one\n", 0o600)
            assert await node.file_mode(path) == 0o600
            first = os.stat(two.node("node1").path(str(path)))
            await node.write_file(path, b"two\n", 0o644)
            assert await node.read_file(path) == b"two\n"
            await asyncio.wait_for(node.write_file(path, b"", 0o644), 30)  # hung once
            assert await node.read_file(path) == b""
            await node.write_file(path, b"two\n", 0o644)
            assert await node.list_dir(path.parent) == ["containerd-env"]  # no temp file left
            with pytest.raises(NodeStepError, match=r"node1: read .*args: it is a folder"):
                await node.read_file(path.parent)
            await node.remove_file(path)
            await node.remove_file(path)  # not there: no error
            assert await node.read_file(path) is None
    on_node = two.node("node1").path(str(path.parent))
    assert first.st_mode & 0o777 == 0o600 and first.st_uid == 0
    assert list(on_node.iterdir()) == []
    # What the session wrote is node1's alone: not on node2, not on this machine.
    assert (two.node("node1").folder / "upper/var/snap/microk8s/current/args").is_dir()
    assert not two.node("node2").path("/var/snap/microk8s").exists()
    assert not Path("/var/snap/microk8s/current/args").exists()


async def test_the_second_write_replaces_the_file_by_rename(two: SSHNodes) -> None:
    inv = inventory(two)
    path = PurePosixPath("/etc/microk8s.yaml")
    with two.from_jump():
        async with runner(inv, "node1") as node:
            await node.write_file(path, b"a: 1\n", 0o644)
            before = os.stat(two.node("node1").path(str(path))).st_ino
            await node.write_file(path, b"a: 2\n", 0o644)
    after = os.stat(two.node("node1").path(str(path))).st_ino
    assert before != after  # a new file renamed over the old one, never rewritten in place
    assert (two.node("node1").folder / "upper/etc/microk8s.yaml").read_bytes() == b"a: 2\n"


async def test_a_write_the_user_may_not_make_names_node_and_file(two: SSHNodes) -> None:
    inv = inventory(two, nodes={"node2": {"user": SUDO_USER}})
    with two.from_jump():
        async with runner(inv, "node2") as node:
            with pytest.raises(NodeError, match="node2: write /etc/gapkit-test: cannot write it"):
                await node.write_file(PurePosixPath("/etc/gapkit-test"), b"x", 0o644)
    assert not two.node("node2").path("/etc/gapkit-test").exists()
    assert [p.name for p in two.node("node2").path("/etc").glob(".gapkit-test*")] == []


async def test_a_plan_applies_over_ssh(two: SSHNodes) -> None:
    inv = inventory(two)
    path = PurePosixPath("/var/snap/microk8s/current/args/certs.d/docker.io/hosts.toml")
    plan = Plan("node2", writes=[FileWrite(path, b'server = "x"\n', None)])
    with two.from_jump():
        async with runner(inv, "node2") as node:
            report = await apply(plan, node)
    assert report.written == [path]
    assert two.node("node2").path(str(path)).read_bytes() == b'server = "x"\n'


@pytest.mark.parametrize("through_sudo", [False, pytest.param(True, marks=needs_sudo)])
async def test_upload_skips_the_same_bytes_and_checks_after_upload(
        two: SSHNodes, tmp_path: Path, through_sudo: bool) -> None:
    inv = inventory(two, nodes={"node1": {"user": SUDO_USER, "sudo": True}} if through_sudo else None)
    local = tmp_path / "microk8s_7964.snap"
    local.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    remote = PurePosixPath("/var/lib/gapkit/snaps/microk8s_7964.snap")
    seen: list[tuple[int, int]] = []
    with two.from_jump():
        async with runner(inv, "node1") as node:
            first = await node.upload(local, remote, progress=lambda d, t: seen.append((d, t)))
            on_node = two.node("node1").path(str(remote))
            stamp = os.stat(on_node).st_ino
            again = await node.upload(local, remote)
            assert os.stat(on_node).st_ino == stamp  # skipped: not copied again
            local.write_bytes(b"changed")
            changed = await node.upload(local, remote)
            assert await node.list_dir(remote.parent) == ["microk8s_7964.snap"]
    assert not first.skipped and again.skipped and not changed.skipped
    assert seen and seen[-1][0] == seen[-1][1] == 3 * 1024 * 1024 + 17
    assert on_node.read_bytes() == b"changed"
    assert os.stat(on_node).st_uid == 0


async def test_an_upload_that_does_not_arrive_whole_is_not_kept(
        two: SSHNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inv = inventory(two)
    local = tmp_path / "core22.snap"
    local.write_bytes(b"snap bytes")
    # The node's sha256 of what arrived differs from the one gapkit expects (a damaged copy).
    monkeypatch.setattr(runners, "file_digest", lambda _p: "0" * 64)
    remote = PurePosixPath("/var/lib/gapkit/snaps/core22.snap")
    with two.from_jump():
        async with runner(inv, "node2") as node:
            with pytest.raises(NodeStepError, match=r"node2: upload core22\.snap to .*: the file did "
                               r"not arrive whole: sha256 on the node is"):
                await node.upload(local, remote)
            assert await node.list_dir(remote.parent) == []  # nothing half-uploaded


async def test_stdin_streams_from_a_local_file(two: SSHNodes, tmp_path: Path) -> None:
    local = tmp_path / "images.tar"
    local.write_bytes(os.urandom(2 * 1024 * 1024))
    inv = inventory(two)
    with two.from_jump():
        async with runner(inv, "node1") as node:
            result = await node.run(["sha256sum"], stdin=local)
            echoed = await node.run(["cat"], stdin=b"bytes in\n")
    assert result.stdout.split()[0] == runners.file_digest(local)
    assert echoed.stdout == "bytes in\n"


async def test_unreachable_node_wrong_key_and_timeout_name_the_node(
        two: SSHNodes, tmp_path: Path) -> None:
    two.node("node2").kill_sshd()
    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    inv = inventory(two, nodes={"node1": {"key": str(other_key)}})
    good = inventory(two)
    with two.from_jump():
        with pytest.raises(NodeStepError) as down:
            await runner(inv, "node2").connect()
        with pytest.raises(NodeStepError) as refused:
            await runner(inv, "node1").connect()
        async with runner(good, "node1") as node:
            with pytest.raises(NodeStepError) as slow:
                await node.run(["sleep", "10"], timeout=0.5)
            assert (await node.run(["true"])).returncode == 0  # the connection still works
    assert down.value.message.startswith("node2: connect: cannot reach root@198.51.100.12:22")
    assert "Connection refused" in down.value.message
    assert refused.value.message == f"node1: connect: root@198.51.100.11:22 refused key {other_key}"
    assert slow.value.message == "node1: `sleep 10`: no answer within 0.5 s; stopped"
    two.node("node2").restart_sshd()
    with two.from_jump():
        async with runner(good, "node2") as node:
            assert (await node.run(["hostname"])).stdout == "node2\n"


async def test_killing_sshd_mid_run_is_a_per_node_error(two: SSHNodes) -> None:
    inv = inventory(two)
    with two.from_jump():
        async with runner(inv, "node1") as node:
            assert (await node.run(["true"])).returncode == 0
            two.node("node1").kill_sshd()
            with pytest.raises(NodeStepError) as caught:
                await node.run(["echo", "hello"])
            assert caught.value.message.startswith("node1: `echo hello`: ")
            two.node("node1").restart_sshd()
            assert (await node.run(["echo", "again"])).stdout == "again\n"  # reconnects


async def test_host_keys_are_checked_and_new_ones_only_accepted_when_asked(two: SSHNodes) -> None:
    empty = two.folder / "empty_known_hosts"
    empty.write_text("")
    wrong = two.folder / "wrong_known_hosts"
    wrong.write_text(f"198.51.100.11 {two.node('node2').host_key_line}\n")
    strict = inventory(two, ssh={"known_hosts": str(empty)})
    trusting = inventory(two, ssh={"known_hosts": str(empty), "accept_new_host_keys": True})
    swapped = inventory(two, ssh={"known_hosts": str(wrong), "accept_new_host_keys": True})
    with two.from_jump():
        with pytest.raises(NodeStepError, match=r"node1: connect: the host key of root@198\.51\.100\.11:22 "
                           r"is unknown: it is not in") as unknown:
            await runner(strict, "node1").connect()
        assert unknown.value.hint is not None and "ssh-keyscan -p 22 198.51.100.11" in unknown.value.hint
        async with runner(trusting, "node1") as node:
            assert (await node.run(["true"])).returncode == 0
        assert node.notes and "accepted the new host key of root@198.51.100.11:22 (SHA256:" in node.notes[0]
        # Now known: the next connect checks against it, without a note.
        async with runner(strict, "node1") as node:
            assert not node.notes
        # A key that differs from the known one is refused even with accept_new_host_keys.
        with pytest.raises(NodeStepError, match="is not the one in"):
            await runner(swapped, "node1").connect()
    assert empty.read_text() == f"198.51.100.11 {two.node('node1').host_key_line}\n"


async def test_fan_out_is_bounded_and_keeps_every_nodes_result() -> None:
    running = 0
    most = 0

    async def work(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1
        if n == 3:
            raise NodeStepError(f"n{n}", "step", "broken")
        return n * 10

    done = await fan_out(range(8), work, limit=3, name=lambda n: f"n{n}")
    assert most == 3
    assert [r.node for r in done.results] == [f"n{i}" for i in range(8)]
    assert done.values() == {f"n{i}": i * 10 for i in range(8) if i != 3}
    assert [r.node for r in done.errors] == ["n3"]
    with pytest.raises(GapkitError, match="n3: step: broken"):
        done.raise_first()

    async def buggy(n: int) -> int:
        if n == 0:
            raise KeyError("a bug")
        await asyncio.sleep(0.05)
        finished.append(n)
        return n

    finished: list[int] = []
    with pytest.raises(KeyError):  # a bug is no node's error: it propagates, after the others
        await fan_out(range(3), buggy, limit=3)
    assert finished == [1, 2]


async def test_fan_out_over_nodes_one_down(ssh_nodes: SSHNodes) -> None:
    ssh_nodes.node("node2").kill_sshd()
    inv = inventory(ssh_nodes)

    async def hostname(name: str) -> str:
        async with runner(inv, name) as node:
            return (await node.run(["hostname"])).stdout.strip()

    with ssh_nodes.from_jump():
        done = await fan_out([n.name for n in inv.nodes], hostname, limit=2)
    assert done.values() == {"node1": "node1", "node3": "node3"}
    assert [(r.node, r.error.message.split(":")[0:2]) for r in done.errors if r.error] == \
        [("node2", ["node2", " connect"])]
