"""Nodes as network namespaces: veth links, a bridge, addresses from 198.51.100.0/24 only.

`Network` makes namespaces named `gkt<pid>x<random>-<node>` (unique per test run, so parallel
runs never share one), links them, starts processes inside them, and `close()` stops those
processes by PID and deletes every namespace it made, even when the test failed (the fixture
calls it in a `finally`). Namespaces left by a run that was killed outright are deleted by the
next run once their PID is gone.

Files in `/etc/netns/<namespace>/` replace their `/etc` namesakes for commands run with
`ip netns exec` (iproute2 bind-mounts them): `Node.hosts()` uses that to give one namespace its
own `/etc/hosts` without touching the machine's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import bcrypt

from tests.support.peers import TestCA, stop_process_group

ALLOWED = ipaddress.ip_network("198.51.100.0/24")
REPO = Path(__file__).resolve().parents[2]
_NAME_RE = re.compile(r"^gkt(\d+)x[0-9a-f]+-")


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (a run killed with SIGKILL)."""
    listed = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout
    try:
        names = [n["name"] for n in json.loads(listed or "[]")]
    except (ValueError, KeyError, TypeError):
        return
    for name in names:
        match = _NAME_RE.match(name)
        if match and not _alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


@dataclass
class Node:
    short: str
    netns: str
    network: Network
    addresses: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.addresses[0]

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout,
                                check=False, cwd=REPO, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.short}: {' '.join(argv)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def gapkit(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`python -m gapkit ARGS` inside this namespace (exit code not checked)."""
        return self.run(sys.executable, "-m", "gapkit", *args, check=False, env=env,
                        timeout=timeout)

    def popen(self, *argv: str, log: Path | None = None, hostname: str | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        """Start a process in this namespace (its own UTS namespace with `hostname`); it is
        stopped by PID when the network closes."""
        command = self.cmd(*argv)
        if hostname is not None:
            command = self.cmd("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                               hostname, *argv)
        out: int | IO[bytes] = subprocess.DEVNULL
        if stdout_pipe:
            out = subprocess.PIPE
        elif log is not None:
            out = open(log, "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT if log or
                                   stdout_pipe else subprocess.DEVNULL,
                                   start_new_session=True, cwd=REPO)
        self.network.processes.append(process)
        return process

    def wait_for_port(self, address: str, port: int, timeout: float = 15) -> None:
        """Wait until something listens on address:port, as seen from inside this namespace."""
        code = ("import socket,sys,time\n"
                "end=time.monotonic()+float(sys.argv[3])\n"
                "while time.monotonic()<end:\n"
                "    try:\n"
                "        socket.create_connection((sys.argv[1],int(sys.argv[2])),0.5).close()\n"
                "        sys.exit(0)\n"
                "    except OSError:\n"
                "        time.sleep(0.05)\n"
                "sys.exit(1)\n")
        result = self.run(sys.executable, "-c", code, address, str(port), str(timeout), check=False)
        if result.returncode != 0:
            raise TimeoutError(f"nothing listens on {address}:{port} in {self.short} after {timeout}s")

    def add_default_route(self, iface: str = "eth0") -> None:
        _ip("-n", self.netns, "route", "add", "default", "dev", iface)

    def etc_file(self, name: str, content: str) -> None:
        """Give commands in this namespace their own /etc/NAME (iproute2 bind-mounts it)."""
        folder = Path("/etc/netns") / self.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)

    def hosts(self, entries: dict[str, str]) -> None:
        """Give commands in this namespace their own /etc/hosts (address -> names)."""
        lines = ["127.0.0.1 localhost"] + [f"{addr} {name}" for addr, name in entries.items()]
        self.etc_file("hosts", "\n".join(lines) + "\n")

    def iptables_drop(self, port: int, protocol: str = "tcp") -> bool:
        """Drop incoming packets to `port`; False when iptables cannot work in a namespace here."""
        if shutil.which("iptables") is None:
            return False
        result = self.run("iptables", "-I", "INPUT", "-p", protocol, "--dport", str(port), "-j",
                          "DROP", check=False)
        return result.returncode == 0


@dataclass
class Network:
    """Namespaces and links of one test; `close()` removes them all."""

    prefix: str = field(default_factory=lambda: f"gkt{os.getpid()}x{secrets.token_hex(2)}")
    nodes: dict[str, Node] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _bridge: Node | None = None
    _ports: int = 0

    def __post_init__(self) -> None:
        reap_stale()

    def node(self, short: str) -> Node:
        name = f"{self.prefix}-{short}"
        _ip("netns", "add", name)
        node = Node(short, name, self)
        self.nodes[short] = node
        _ip("-n", name, "link", "set", "lo", "up")
        # The machine's DNS server is out of reach from a namespace: ask loopback, which
        # refuses at once, instead of waiting for timeouts.
        node.etc_file("resolv.conf", "nameserver 127.0.0.1\n")
        node.hosts({})
        return node

    def _address(self, address: str) -> str:
        iface = ipaddress.ip_interface(address)
        if iface.ip not in ALLOWED:
            raise ValueError(f"{address}: tests use addresses from {ALLOWED} only")
        return str(iface)

    def link(self, a: Node, a_address: str, b: Node, b_address: str, a_iface: str = "eth0",
             b_iface: str = "eth0") -> None:
        """A veth pair between two namespaces; addresses as `198.51.100.1/24`."""
        a_cidr, b_cidr = self._address(a_address), self._address(b_address)
        _ip("-n", a.netns, "link", "add", a_iface, "type", "veth", "peer", "name", b_iface,
            "netns", b.netns)
        for node, iface, cidr in ((a, a_iface, a_cidr), (b, b_iface, b_cidr)):
            _ip("-n", node.netns, "addr", "add", cidr, "dev", iface)
            _ip("-n", node.netns, "link", "set", iface, "up")
            node.addresses.append(cidr.split("/")[0])

    def attach(self, node: Node, address: str, iface: str = "eth0") -> None:
        """Plug `node` into the network's bridge (made on first use, in a namespace of its own)."""
        cidr = self._address(address)
        if self._bridge is None:
            self._bridge = self.node("sw")
            _ip("-n", self._bridge.netns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self._bridge.netns, "link", "set", "br0", "up")
        self._ports += 1
        port = f"p{self._ports}"
        _ip("-n", node.netns, "link", "add", iface, "type", "veth", "peer", "name", port,
            "netns", self._bridge.netns)
        _ip("-n", self._bridge.netns, "link", "set", port, "master", "br0")
        _ip("-n", self._bridge.netns, "link", "set", port, "up")
        _ip("-n", node.netns, "addr", "add", cidr, "dev", iface)
        _ip("-n", node.netns, "link", "set", iface, "up")
        node.addresses.append(cidr.split("/")[0])

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process_group(process)
        if process.stdout is not None:
            process.stdout.close()

    def close(self) -> None:
        for process in self.processes:
            self.stop(process)
        for node in self.nodes.values():
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)


def wait_for_line(process: subprocess.Popen[bytes], needle: str, timeout: float = 15) -> str:
    """Read the process's stdout until a line holds `needle` (the process was started with a pipe)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    os.set_blocking(process.stdout.fileno(), True)
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode(errors="replace")
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} from the process: {''.join(seen)!r}")


def start_registry(node: Node, folder: Path, address: str, port: int,
                   tls: TestCA | None = None, users: dict[str, str] | None = None) -> str:
    """A `docker-registry` listening on address:port inside `node`; returns its host:port."""
    folder.mkdir(parents=True, exist_ok=True)
    host = f"{address}:{port}"
    http: dict[str, object] = {"addr": host, "secret": "gapkit-tests"}
    if tls is not None:
        http["tls"] = {"certificate": str(tls.server_cert), "key": str(tls.server_key)}
    config: dict[str, object] = {
        "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(folder / "data")}}, "http": http}
    if users:
        htpasswd = folder / "htpasswd"
        htpasswd.write_text("".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for u, p in users.items()))
        config["auth"] = {"htpasswd": {"realm": "gapkit-tests", "path": str(htpasswd)}}
    (folder / "config.yml").write_text(json.dumps(config))
    node.popen("docker-registry", "serve", str(folder / "config.yml"), log=folder / "registry.log")
    node.wait_for_port(address, port)
    return host


@dataclass
class Tinyproxy:
    """A real tinyproxy inside a namespace: its config and log in a temp folder."""

    node: Node
    folder: Path
    address: str
    port: int = 8888
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "tinyproxy.log"

    def start(self) -> Tinyproxy:
        self.folder.mkdir(parents=True, exist_ok=True)
        # No ConnectPort line: CONNECT to any port is allowed (the default allows 443 and 563).
        (self.folder / "tinyproxy.conf").write_text(
            f"Port {self.port}\nListen {self.address}\nTimeout 30\nMaxClients 20\n"
            f'LogFile "{self.log}"\nLogLevel Connect\nPidFile "{self.folder / "tinyproxy.pid"}"\n'
            f"Allow {ALLOWED}\n")
        self.process = self.node.popen("tinyproxy", "-d", "-c", str(self.folder / "tinyproxy.conf"),
                                       log=self.folder / "tinyproxy.out")
        self.node.wait_for_port(self.address, self.port)
        return self

    def connects(self) -> list[str]:
        """The `CONNECT host:port` requests tinyproxy logged."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)", text)
