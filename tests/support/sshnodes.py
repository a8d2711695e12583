"""SSH "nodes" for cluster tests: a real `sshd` per network namespace, each with its own files.

The recipe (TESTBED.md, checked here on Debian 12, OpenSSH 9.2, as root, no systemd):

- Network: one bridge (`Network.attach`, 198.51.100.0/24 only). Node i gets 198.51.100.(11+i);
  the **jump host** (where gapkit runs) is a namespace of its own on the same bridge,
  198.51.100.10. The root namespace is never given an address: tests reach the nodes either by
  running `python -m gapkit` inside the jump namespace (`SSHNodes.gapkit`), or, for in-process
  asyncio tests, by moving the test's thread into the jump namespace with `setns(2)` for the
  duration of a `with nodes.from_jump():` block (sockets made inside the block belong to the
  jump namespace; the thread is moved back after it).
- Files: each node has a *keeper* process (`sleep`) in a private mount namespace (`unshare -m
  --uts --propagation private`) holding overlay mounts over `/etc` and `/var` (the upper layers
  are in the node's folder, so `/var/snap/...` and `/etc/microk8s.yaml` written by a session land
  in `<folder>/upper/var/...`, and the machine's own `/etc` and `/var` stay as they were), a
  tmpfs on `/run` (for `/run/sshd`), and its own host name. `sshd` is started *into* that
  namespace with `nsenter -t KEEPER -m -u -n`, so killing and restarting sshd keeps the node's
  files. `SSHNode.path("/var/snap/x")` is where a node path is on the machine.
- sshd: `-D -f CONFIG -E LOG` with `ListenAddress` the node's address, its own ed25519
  `HostKey`, `PidFile`, `AuthorizedKeysFile /etc/gapkit-tests-keys/%u` (in the node's /etc:
  sshd reads keys as the user, who cannot enter the test's root-only temp folders), key auth only
  (`PasswordAuthentication no`, `KbdInteractiveAuthentication no`, `UsePAM no`, `StrictModes
  no`), the internal SFTP server, and `SetEnv PATH=<stand-ins>:...` so the stand-in `snap` and
  `microk8s` come first on the PATH of every session.
- Users: `root`, plus `gapkit` (uid 4242, passwordless sudo) and `nopw` (uid 4243, sudo that
  wants a password), added to the node's own `/etc/passwd` and `/etc/sudoers.d/`;
  `secure_path` puts the stand-ins first for commands run through sudo too. sudo must be
  installed (`.ci/run` installs it); `HAS_SUDO` says whether it is.
- Keys: one client key (`client_key`, authorized for every user) and `known_hosts` holding
  every node's host key, as a user would have them.

`snap` and `microk8s` on the nodes are the stand-ins of `tests/support/microk8s.py` (no MicroK8s
snap can be installed here); everything else a node runs (sh, sudo, sha256sum, SFTP) is real.
`close()` stops every process by PID and deletes the namespaces, even when a test failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.microk8s import StandInMicroK8s
from tests.support.netns import Network, Node

CLONE_NEWNET = 0x40000000
JUMP_ADDRESS = "198.51.100.10"
SUDO_USER = "gapkit"
NOPW_USER = "nopw"
HAS_SUDO = shutil.which("sudo") is not None
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _keygen(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_name(path.name + ".pub").read_text().strip()


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Move this thread into network namespace `netns` for the block (sockets made in it stay
    there); back to where it was afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace failed")
    finally:
        os.close(own)
        os.close(target)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for child in children.get(current, []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class SSHNode:
    name: str
    address: str
    folder: Path
    ns: Node
    owner: SSHNodes
    microk8s: StandInMicroK8s
    keeper: subprocess.Popen[bytes] | None = None
    sshd: subprocess.Popen[bytes] | None = None
    host_key_line: str = ""

    @property
    def config(self) -> Path:
        return self.folder / "sshd_config"

    @property
    def log(self) -> Path:
        return self.folder / "sshd.log"

    def path(self, node_path: str) -> Path:
        """Where the node's `node_path` is on this machine (through the keeper's root)."""
        assert self.keeper is not None
        return Path(f"/proc/{self.keeper.pid}/root") / node_path.lstrip("/")

    def run(self, *argv: str, check: bool = True, user: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run a command on the node (its namespaces, the stand-ins on PATH), not over SSH."""
        assert self.keeper is not None
        command = ["nsenter", "-t", str(self.keeper.pid), "-m", "-u", "-n"]
        if user is not None:
            command += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        env = {"PATH": f"{self.microk8s.bin_dir}:{SYSTEM_PATH}", "HOME": "/root"}
        result = subprocess.run([*command, *argv], capture_output=True, text=True, check=False,
                                env=env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def start_sshd(self) -> None:
        assert self.keeper is not None
        if self.sshd is not None and self.sshd.poll() is None:
            return
        self.sshd = subprocess.Popen(
            ["nsenter", "-t", str(self.keeper.pid), "-m", "-u", "-n", "/usr/sbin/sshd", "-D",
             "-f", str(self.config), "-E", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.owner.network.processes.append(self.sshd)
        self.owner.jump.wait_for_port(self.address, 22)

    def kill_sshd(self) -> None:
        """Kill sshd and every session it runs (SIGKILL, by PID): the node stops answering SSH
        at once, its files stay."""
        if self.sshd is None:
            return
        for pid in [self.sshd.pid, *_descendants(self.sshd.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.sshd.wait(5)

    def restart_sshd(self) -> None:
        self.kill_sshd()
        self.start_sshd()


@dataclass
class SSHNodes:
    """`count` nodes with a real sshd each, and a jump namespace; `close()` removes everything."""

    folder: Path
    count: int = 3
    #: Passed to each node's StandInMicroK8s (fields it has: cluster_file, version, ...).
    stand_in: dict[str, Any] = field(default_factory=dict)
    network: Network = field(default_factory=Network)
    nodes: list[SSHNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.jump = self.network.node("jump")

    @property
    def client_key(self) -> Path:
        return self.folder / "client" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "client" / "known_hosts"

    @property
    def cluster_file(self) -> Path:
        return self.folder / "cluster.json"

    def node(self, name: str) -> SSHNode:
        return next(n for n in self.nodes if n.name == name)

    def start(self) -> SSHNodes:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.network.attach(self.jump, f"{JUMP_ADDRESS}/24")
        client_pub = _keygen(self.client_key)
        fields = {f.name for f in dataclasses.fields(StandInMicroK8s)}
        for i in range(self.count):
            name, address = f"node{i + 1}", f"198.51.100.{11 + i}"
            folder = self.folder / name
            ns = self.network.node(name)
            self.network.attach(ns, f"{address}/24")
            extra = {"cluster_file": self.cluster_file, "node_name": name, "node_address": address}
            options = {k: v for k, v in {**extra, **self.stand_in}.items() if k in fields}
            stand_in = StandInMicroK8s(folder / "microk8s", **options).install()
            node = SSHNode(name, address, folder, ns, self, stand_in)
            self._prepare(node, client_pub)
            self.nodes.append(node)
        for node in self.nodes:
            self._start_keeper(node)
            node.start_sshd()
        self.known_hosts.write_text("".join(f"{n.address} {n.host_key_line}\n" for n in self.nodes))
        return self

    def _prepare(self, node: SSHNode, client_pub: str) -> None:
        folder = node.folder
        host_key = folder / "ssh_host_ed25519_key"
        node.host_key_line = " ".join(_keygen(host_key).split()[:2])
        # sshd reads a user's keys as that user, and the test's folders are root's alone: keys
        # and homes live in the node's own /etc and /var (upper layers), which every user sees.
        etc = folder / "upper" / "etc"
        keys = etc / "gapkit-tests-keys"
        keys.mkdir(parents=True)
        for user in ("root", SUDO_USER, NOPW_USER):
            (keys / user).write_text(client_pub + "\n")
            (keys / user).chmod(0o644)
        path = f"{node.microk8s.bin_dir}:{SYSTEM_PATH}"
        node.config.write_text(
            f"ListenAddress {node.address}\nPort 22\nHostKey {host_key}\n"
            f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile /etc/gapkit-tests-keys/%u\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
            f"SetEnv PATH={path}\nSubsystem sftp internal-sftp\n")
        # The node's own /etc (the upper layer of an overlay): users, sudo, names.
        (etc / "sudoers.d").mkdir(parents=True)
        homes = {user: folder / "upper" / "var" / "lib" / "gapkit-tests-home" / user
                 for user in (SUDO_USER, NOPW_USER)}
        passwd = Path("/etc/passwd").read_text()
        shadow = Path("/etc/shadow").read_text()
        group = Path("/etc/group").read_text()
        for uid, user in ((4242, SUDO_USER), (4243, NOPW_USER)):
            homes[user].mkdir(parents=True)
            os.chown(homes[user], uid, uid)
            passwd += f"{user}:x:{uid}:{uid}::/var/lib/gapkit-tests-home/{user}:/bin/sh\n"
            shadow += f"{user}:*:20000:0:99999:7:::\n"
            group += f"{user}:x:{uid}:\n"
        (etc / "passwd").write_text(passwd)
        (etc / "shadow").write_text(shadow)
        (etc / "shadow").chmod(0o640)
        (etc / "group").write_text(group)
        sudoers = etc / "sudoers.d" / "gapkit-tests"
        sudoers.write_text(f'Defaults secure_path="{path}"\n'
                           f"{SUDO_USER} ALL=(ALL) NOPASSWD: ALL\n{NOPW_USER} ALL=(ALL) ALL\n")
        sudoers.chmod(0o440)
        (etc / "hostname").write_text(node.name + "\n")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{node.address} {node.name}\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        for layer in ("upper/var", "work/etc", "work/var"):
            (folder / layer).mkdir(parents=True, exist_ok=True)

    def _start_keeper(self, node: SSHNode) -> None:
        f = node.folder
        ready = f / "keeper.ready"
        script = (
            "set -e; "
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={f}/upper/etc,workdir={f}/work/etc /etc; "
            f"mount -t overlay overlay -o lowerdir=/var,upperdir={f}/upper/var,workdir={f}/work/var /var; "
            "mount -t tmpfs -o mode=755 tmpfs /run; mkdir -p /run/sshd /var/snap /var/lib/snapd; "
            f"hostname {node.name}; touch {ready}; "
            # Lives as long as the test process: if that is killed outright, the keeper goes
            # too, and takes the node's sshd with it (the namespaces go with the next run).
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
            f"kill $(cat {f}/sshd.pid) 2>/dev/null || true")
        node.keeper = node.ns.popen("unshare", "-m", "--uts", "--propagation", "private",
                                    "sh", "-c", script, log=f / "keeper.log")
        deadline = time.monotonic() + 10
        while not ready.exists():
            if node.keeper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: the keeper did not start: "
                                   + (f / "keeper.log").read_text(errors="replace"))
            time.sleep(0.02)

    @contextlib.contextmanager
    def from_jump(self) -> Iterator[None]:
        """Run the block's network code from the jump host (see the module docstring)."""
        with in_netns(self.jump.netns):
            yield

    def gapkit(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`python -m gapkit ARGS` on the jump host."""
        return self.jump.gapkit(*args, timeout=timeout)

    def inventory(self, path: Path | None = None, ssh: dict[str, Any] | None = None,
                  nodes: dict[str, dict[str, Any]] | None = None,
                  **top: Any) -> Path:
        """Write an inventory of these nodes (key and known_hosts of this fixture)."""
        path = path or self.folder / "inventory.yaml"
        data: dict[str, Any] = {
            "ssh": {"user": "root", "key": str(self.client_key),
                    "known_hosts": str(self.known_hosts), "connect_timeout": 5,
                    **(ssh or {})},
            "nodes": [{"name": n.name, "address": n.address, **(nodes or {}).get(n.name, {})}
                      for n in self.nodes],
            **top}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def close(self) -> None:
        for node in self.nodes:
            if node.sshd is not None and node.sshd.poll() is None:
                node.kill_sshd()
        self.network.close()
