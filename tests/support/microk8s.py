"""Stand-ins for `snap` and `microk8s`, and the MicroK8s parts that are real: containerd + CRI.

No MicroK8s snap can be installed on these machines (TESTBED.md), so `snap` and `microk8s` are
the two programs tests may stand in for. `StandInMicroK8s.install()` writes both into
`<root>/bin`, to put first on `PATH`. Each records its arguments (`calls()`) and answers as the
real one does:

- `snap restart microk8s` prints `Restarted.`; `snap version` and `snap list microk8s` answer
  with realistic text;
- `microk8s version` prints `MicroK8s v1.32.3 revision 7964` (the version is settable);
- `microk8s ctr ARGS` runs the real `ctr --address SOCK --namespace k8s.io ARGS` against the
  test's containerd (the snap's wrapper adds the same two flags from `args/ctr`);
- `microk8s images import [FILE|-]` reads the tar and hands it to the real
  `ctr ... image import --platform <arch> -`, as the cluster agent does on each node; like the
  real command it prints a failure and **still exits 0** (`fail_imports` cuts the tar short, as
  a connection reset does, to show it).

With `cluster_file` set (a JSON file shared by the stand-ins of every node of a test), the
stand-ins also keep the state of an install and a cluster, as `cluster up` needs:

- `snap list` lists what `snap install` installed (`<root>/snaps.json`); `snap ack FILE` records
  the assertion; `snap install FILE [--classic] [--dangerous]` wants the ack (or
  `--dangerous`), `--classic` for microk8s and a base first, and for microk8s copies
  `common/sideload/*.tar` into `common/etc/sideload/` as the install hook does. Until then
  `microk8s` answers `command not found` (exit 127), as it would;
- the side-load plugin: on each `microk8s` call, `common/etc/sideload/*.tar` are imported (real
  `ctr` when a containerd runs) and renamed to `*.tar.loaded`;
- `microk8s status --wait-ready --timeout N`, `add-node --token T --token-ttl N` (prints
  `microk8s join <address>:25000/<token>/<12 hex>` as the real one does), `join
  ADDR:PORT/TOKEN/HASH [--worker]` (checks the token, its expiry and the hash), and `kubectl get
  nodes -o json`, where a joined node turns Ready after `ready_after` polls;
- `fs_root`: node paths (`/var/snap/...`, uploaded snaps) are taken under that folder (a
  `LocalRunner(root)` node); `fail` makes the named step fail once (`snap install microk8s`,
  `join`, ...), as a broken node would.

Also here: `NodeContainerd`, a real containerd whose CRI `config_path` is the certs.d folder of a
node root (`<root>/var/snap/microk8s/current/args/certs.d`), and `cri_pull`, the CRI
`PullImage` call the kubelet makes (protobuf written by hand; grpcio is a test dependency; the
CRI tools are not packaged in Debian 12).

The stand-in scripts import only this module and the standard library, so they start quickly.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.containerd import Containerd

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where MicroK8s keeps its arguments, under a node root.
ARGS = Path("var/snap/microk8s/current/args")
DEFAULT_VERSION = "v1.32.3"


@dataclass
class StandInMicroK8s:
    """`snap` and `microk8s` executables in `<root>/bin`; state in `<root>/state.json`."""

    root: Path
    #: The socket of the containerd that `microk8s ctr` / `images import` talk to.
    containerd_address: str | None = None
    version: str = DEFAULT_VERSION
    revision: int = 7964
    #: The architecture the cluster agent passes to `ctr image import --platform`.
    arch: str = "amd64"
    #: Cut every `microk8s images import` tar in half (a connection reset): ctr fails, the
    #: stand-in prints the failure and exits 0, as MicroK8s does.
    fail_imports: bool = False
    #: Shared by the stand-ins of every node of a test: tokens and cluster members.
    cluster_file: Path | None = None
    node_name: str = "node"
    node_address: str = "127.0.0.1"
    #: Node paths are under this folder (a LocalRunner root); None: the real paths.
    fs_root: Path | None = None
    #: kubectl polls after a join before the joined node is Ready.
    ready_after: int = 0
    #: Steps that fail once each: "snap install <name>", "status", "add-node", "join".
    fail: tuple[str, ...] = ()

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def calls_file(self) -> Path:
        return self.root / "calls.jsonl"

    def install(self) -> StandInMicroK8s:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for program in ("snap", "microk8s"):
            script = self.bin_dir / program
            script.write_text(
                f"#!{sys.executable}\n"
                f"# stand-in for `{program}` (tests only): see tests/support/microk8s.py\n"
                "import sys\n"
                f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
                "from tests.support.microk8s import stand_in_main\n"
                f"sys.exit(stand_in_main({str(self.root)!r}, {program!r}, sys.argv[1:]))\n")
            script.chmod(0o755)
        self.save()
        return self

    def save(self) -> None:
        """Write the settings the scripts read (call again after changing a field)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state.json").write_text(json.dumps({
            "containerd_address": self.containerd_address, "version": self.version,
            "revision": self.revision, "arch": self.arch, "fail_imports": self.fail_imports,
            "cluster_file": str(self.cluster_file) if self.cluster_file else None,
            "node_name": self.node_name, "node_address": self.node_address,
            "fs_root": str(self.fs_root) if self.fs_root else None,
            "ready_after": self.ready_after, "fail": list(self.fail)}))

    @property
    def path(self) -> str:
        """A PATH with the stand-ins first."""
        return f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    def calls(self) -> list[list[str]]:
        """Every call so far, as `[program, *args]`."""
        if not self.calls_file.exists():
            return []
        return [json.loads(line)["argv"] for line in self.calls_file.read_text().splitlines()]

    def imports(self) -> list[dict[str, object]]:
        """What each `microk8s images import` received: `bytes` and tar `members`."""
        path = self.root / "imports.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def installed(self) -> dict[str, str]:
        """What `snap install` installed on this node: name -> revision."""
        path = self.root / "snaps.json"
        return json.loads(path.read_text())["installed"] if path.exists() else {}

    def sideloads(self) -> list[dict[str, object]]:
        """What the side-load plugin imported: `file` and tar `members`."""
        path = self.root / "sideloads.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def restarts(self) -> int:
        return sum(1 for call in self.calls() if call[:3] == ["snap", "restart", "microk8s"])


def stand_in_main(root: str, program: str, argv: list[str]) -> int:
    """What the stand-in does when run as `program ARGS...`."""
    state_dir = Path(root)
    state = json.loads((state_dir / "state.json").read_text())
    with open(state_dir / "calls.jsonl", "a") as log:
        log.write(json.dumps({"argv": [program, *argv]}) + "\n")
    if state.get("cluster_file"):
        node = _Node(state_dir, state)
        if program == "snap":
            return node.snap(argv)
        return node.microk8s(argv)
    if program == "snap":
        return _snap(state, argv)
    return _microk8s(state_dir, state, argv)


def _snap(state: dict[str, object], argv: list[str]) -> int:
    if argv[:1] == ["restart"] and argv[1:2] == ["microk8s"]:
        print("Restarted.")
        return 0
    if argv == ["version"]:
        print("snap    2.61.3\nsnapd   2.61.3\nseries  16\nubuntu  22.04\nkernel  6.1.0-18-amd64")
        return 0
    if argv == ["list", "microk8s"]:
        version = str(state["version"])
        print("Name      Version   Rev    Tracking       Publisher   Notes")
        print(f"microk8s  {version:<9} {state['revision']:<6} "
              f"{version.lstrip('v').rsplit('.', 1)[0]}/stable  canonical✓  classic")
        return 0
    print(f"error: this stand-in `snap` does not answer `snap {' '.join(argv)}`", file=sys.stderr)
    return 64


def _ctr_argv(state: dict[str, object], args: list[str]) -> list[str]:
    address = state.get("containerd_address")
    if not address:
        raise SystemExit("stand-in microk8s: no containerd address (MicroK8s not running)")
    return ["ctr", "--address", str(address), "--namespace", "k8s.io", *args]


def _microk8s(state_dir: Path, state: dict[str, object], argv: list[str]) -> int:
    if argv == ["version"]:
        print(f"MicroK8s {state['version']} revision {state['revision']}")
        return 0
    if argv[:1] == ["ctr"]:
        os.execvp("ctr", _ctr_argv(state, argv[1:]))
    if argv[:2] == ["images", "import"]:
        source = argv[2] if len(argv) > 2 else "-"
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        print("Importing images to 1 node(s)" if source == "-" else f"Importing {source}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar, \
                open(state_dir / "imports.jsonl", "a") as log:
            log.write(json.dumps({"bytes": len(data), "members": tar.getnames()}) + "\n")
        if state.get("fail_imports"):
            data = data[: len(data) // 2]
        proc = subprocess.run(
            _ctr_argv(state, ["image", "import", "--platform", str(state["arch"]), "-"]),
            input=data, capture_output=True)
        if proc.returncode != 0:
            # MicroK8s prints the failure per node and exits 0 all the same.
            print(f"Failed to import images on 127.0.0.1: {proc.stderr.decode().strip()}")
        return 0
    print(f"error: this stand-in `microk8s` does not answer `microk8s {' '.join(argv)}`",
          file=sys.stderr)
    return 64


@dataclass
class NodeContainerd(Containerd):
    """A real containerd whose CRI `config_path` is a node root's MicroK8s certs.d folder."""

    node_root: Path = field(default_factory=Path)

    @property
    def certs_dir(self) -> Path:
        return self.node_root / ARGS / "certs.d"

    def start(self, timeout: float = 20.0) -> NodeContainerd:
        self.certs_dir.parent.mkdir(parents=True, exist_ok=True)
        super().start(timeout)
        return self


def cri_pull(socket_path: str, image: str, timeout: float = 60) -> str:
    """CRI `ImageService/PullImage` as the kubelet sends it; returns the image id.

    PullImageRequest{image: ImageSpec{image: NAME}} -> PullImageResponse{image_ref}.
    """
    import grpc  # type: ignore[import-untyped]

    def field_bytes(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2]) + _varint(len(payload)) + payload

    request = field_bytes(1, field_bytes(1, image.encode()))
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        call = channel.unary_unary("/runtime.v1.ImageService/PullImage",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        answer: bytes = call(request, timeout=timeout)
    assert answer[0] == 0x0A, answer
    length = answer[1]
    return answer[2:2 + length].decode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# ---- with cluster_file: install and cluster state ---------------------------------------------


def cluster_hash(name: str) -> str:
    """The stand-in's `server.crt` fingerprint for a node (12 hex, as in join URLs)."""
    import hashlib

    return hashlib.sha256(f"server.crt of {name}".encode()).hexdigest()[:12]


class _Node:
    """One node's stand-in with install and cluster state (see the module docstring)."""

    def __init__(self, state_dir: Path, state: dict[str, object]) -> None:
        self.dir = state_dir
        self.state = state
        self.name = str(state["node_name"])
        self.address = str(state["node_address"])
        self.snaps_file = state_dir / "snaps.json"
        self.snaps = (json.loads(self.snaps_file.read_text()) if self.snaps_file.exists()
                      else {"installed": {}, "acked": [], "failed": []})

    def fs(self, path: str) -> Path:
        root = self.state.get("fs_root")
        return Path(str(root)) / path.lstrip("/") if root else Path(path)

    def save(self) -> None:
        self.snaps_file.write_text(json.dumps(self.snaps))

    def fails(self, step: str) -> bool:
        """Whether `step` is set to fail and has not failed yet (it fails once)."""
        if step in self.state.get("fail", []) and step not in self.snaps["failed"]:  # type: ignore[operator]
            self.snaps["failed"].append(step)
            self.save()
            return True
        return False

    # -- snap --

    def snap(self, argv: list[str]) -> int:
        installed: dict[str, str] = self.snaps["installed"]
        if argv == ["list"]:
            if not installed:
                print("No snaps are installed yet. Try 'snap install hello-world'.",
                      file=sys.stderr)
                return 0
            print("Name      Version   Rev    Tracking       Publisher   Notes")
            for name, rev in installed.items():
                print(f"{name:<9} 1.0       {rev:<6} -              -           -")
            return 0
        if argv[:1] == ["list"]:
            if argv[1] not in installed:
                print("error: no matching snaps installed", file=sys.stderr)
                return 1
            if argv[1] == "microk8s":
                return _snap(self.state, argv)
            print("Name  Version  Rev  Tracking  Publisher  Notes")
            print(f"{argv[1]}  1.0  {installed[argv[1]]}  -  -  -")
            return 0
        if argv[:1] == ["ack"] and len(argv) == 2:
            path = self.fs(argv[1])
            if not path.is_file():
                print(f'error: cannot read assertion "{argv[1]}": no such file', file=sys.stderr)
                return 1
            self.snaps["acked"].append(path.name.rsplit(".", 1)[0])
            self.save()
            return 0
        if argv[:1] == ["install"] and len(argv) >= 2:
            return self.install(argv[1], argv[2:])
        return _snap(self.state, argv)

    def install(self, file: str, flags: list[str]) -> int:
        path = self.fs(file)
        if not path.is_file():
            print(f'error: cannot find "{file}"', file=sys.stderr)
            return 1
        stem = path.name.rsplit(".", 1)[0]
        name, _, rev = stem.rpartition("_")
        if self.fails(f"snap install {name}"):
            print(f'error: cannot perform the following tasks:\n- Mount snap "{name}" ({rev}) '
                  "(snap-update-ns failed: stand-in failure)", file=sys.stderr)
            return 1
        if "--dangerous" not in flags and stem not in self.snaps["acked"]:
            print(f'error: cannot find signatures with metadata for snap "{file}"',
                  file=sys.stderr)
            return 1
        installed: dict[str, str] = self.snaps["installed"]
        if name == "microk8s":
            if "--classic" not in flags:
                print('error: This revision of snap "microk8s" was published using classic '
                      "confinement and thus may perform arbitrary system changes outside of the "
                      "security sandbox that snaps are usually confined to.", file=sys.stderr)
                return 1
            if not any(n.startswith("core") for n in installed):
                print('error: cannot install "microk8s": snap "core20" is not installed '
                      "(the stand-in wants the base first)", file=sys.stderr)
                return 1
            common = self.fs("/var/snap/microk8s/common")
            (common / "etc" / "sideload").mkdir(parents=True, exist_ok=True)
            for tar in sorted((common / "sideload").glob("*.tar")):
                (common / "etc" / "sideload" / tar.name).write_bytes(tar.read_bytes())
            args = self.fs("/var/snap/microk8s/current/args")
            args.mkdir(parents=True, exist_ok=True)
            env = args / "containerd-env"
            if not env.exists():
                env.write_text("# stand-in default containerd-env\n"
                               "#HTTPS_PROXY=http://squid.internal:3128\n"
                               "#NO_PROXY=10.1.0.0/16,10.152.183.0/24\n"
                               "ulimit -n 65536 || true\n")
        installed[name] = rev
        self.save()
        print(f"{name} {rev} installed")
        return 0

    # -- microk8s --

    def sideload_plugin(self) -> None:
        folder = self.fs("/var/snap/microk8s/common/etc/sideload")
        if not folder.is_dir():
            return
        for tar_path in sorted(folder.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                members = tar.getnames()
            if self.state.get("containerd_address"):
                proc = subprocess.run(
                    _ctr_argv(self.state, ["image", "import", "--platform",
                                           str(self.state["arch"]), str(tar_path)]),
                    capture_output=True)
                if proc.returncode != 0:
                    continue  # the plugin leaves a tar that fails under its name
            tar_path.rename(tar_path.with_name(tar_path.name + ".loaded"))
            with open(self.dir / "sideloads.jsonl", "a") as log:
                log.write(json.dumps({"file": tar_path.name, "members": members}) + "\n")

    def microk8s(self, argv: list[str]) -> int:
        if "microk8s" not in self.snaps["installed"]:
            print("microk8s: command not found", file=sys.stderr)
            return 127
        self.sideload_plugin()
        if argv[:2] == ["status", "--wait-ready"]:
            if self.fails("status"):
                print("microk8s is not running. Use microk8s inspect for a deeper inspection.")
                return 1
            f, data = self.cluster()
            self.store(f, data)
            if any(m["name"] == self.name and m["role"] == "worker" for m in data["members"]):
                print("This MicroK8s deployment is acting as a node in a cluster. Please use "
                      "the microk8s status on the master.")
                return 0
            print("microk8s is running\nhigh-availability: no\n  datastore master nodes: "
                  "127.0.0.1:19001\n  datastore standby nodes: none")
            return 0
        if argv[:1] == ["add-node"]:
            return self.add_node(argv[1:])
        if argv[:1] == ["join"]:
            return self.join(argv[1:])
        if argv[:4] == ["kubectl", "get", "nodes", "-o"] and argv[4:] == ["json"]:
            return self.get_nodes()
        return _microk8s(self.dir, self.state, argv)

    def cluster(self) -> tuple[Any, dict[str, Any]]:
        import fcntl

        path = Path(str(self.state["cluster_file"]))
        f = open(path, "a+")  # noqa: SIM115 - held locked until store() closes it
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        data = json.loads(text) if text.strip() else {"members": [], "tokens": {}, "log": []}
        return f, data

    @staticmethod
    def store(f: Any, data: dict[str, Any]) -> None:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data))
        f.close()

    def _me(self, role: str = "control-plane") -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "role": role, "polls_left": 0}

    def add_node(self, args: list[str]) -> int:
        import time

        token, ttl = None, -1
        for i, arg in enumerate(args):
            if arg in ("--token", "-t"):
                token = args[i + 1]
            if arg in ("--token-ttl", "-l"):
                ttl = int(args[i + 1])
        if token is not None and len(token) < 32:
            print("Invalid token size.  It must be 32 characters long.", file=sys.stderr)
            return 1
        if self.fails("add-node"):
            print("Error: the cluster agent is not answering (stand-in failure)", file=sys.stderr)
            return 1
        token = token or "0" * 32
        f, data = self.cluster()
        if not data["members"]:
            data["members"].append(self._me())
        data["tokens"][token] = time.time() + ttl if ttl > 0 else None
        data["log"].append({"node": self.name, "call": "add-node"})
        self.store(f, data)
        url = f"{self.address}:25000/{token}/{cluster_hash(self.name)}"
        print("From the node you wish to join to this cluster, run the following:")
        print(f"microk8s join {url}\n")
        print("Use the '--worker' flag to join a node as a worker not running the control plane, "
              "eg:")
        print(f"microk8s join {url} --worker\n")
        print("If the node you are adding is not reachable through the default interface you "
              "can use one of the following:")
        print(f"microk8s join {url}")
        return 0

    def join(self, args: list[str]) -> int:
        import re
        import time

        worker = "--worker" in args
        urls = [a for a in args if not a.startswith("--")]
        match = re.fullmatch(r"(?P<ip>[^:/]+):(?P<port>\d+)/(?P<token>\w+)(?:/(?P<hash>\w+))?",
                             urls[0] if urls else "")
        if match is None or len(match["token"]) < 32:
            print("Invalid connection string", file=sys.stderr)
            return 1
        if self.fails("join"):
            print(f"Contacting cluster at {match['ip']}\nConnection failed. Could not connect "
                  f"to {match['ip']}:{match['port']} (stand-in failure)", file=sys.stderr)
            return 1
        f, data = self.cluster()
        try:
            leader = next((m for m in data["members"] if m["address"] == match["ip"]), None)
            if leader is None:
                print(f"Contacting cluster at {match['ip']}\nConnection failed. Invalid token "
                      "(500)", file=sys.stderr)
                return 1
            expiry = data["tokens"].get(match["token"], "missing")
            if expiry == "missing" or (expiry is not None and expiry < time.time()):
                print(f"Contacting cluster at {match['ip']}\nConnection failed. Invalid token "
                      "(500)", file=sys.stderr)
                return 1
            if match["hash"] and not cluster_hash(leader["name"]).startswith(match["hash"]):
                print("Join failed: the certificate fingerprint does not match", file=sys.stderr)
                return 4
            if any(m["name"] == self.name for m in data["members"]):
                print("The node has already joined the cluster", file=sys.stderr)
                return 1
            me = self._me("worker" if worker else "control-plane")
            me["polls_left"] = int(self.state.get("ready_after", 0))  # type: ignore[call-overload]
            data["members"].append(me)
            if expiry is None:
                del data["tokens"][match["token"]]
            data["log"].append({"node": self.name, "call": "join", "worker": worker})
        finally:
            self.store(f, data)
        print(f"Contacting cluster at {match['ip']}")
        if worker:
            print("The node has joined the cluster and will appear in the nodes list in a few "
                  "seconds.")
        print("Successfully joined the cluster.")
        return 0

    def get_nodes(self) -> int:
        f, data = self.cluster()
        members = data["members"]
        if not any(m["name"] == self.name for m in members):
            members = [self._me()]
            self.store(f, data)
        else:
            for m in members:
                if m["polls_left"] > 0:
                    m["polls_left"] -= 1
            self.store(f, data)
        items = []
        for m in members:
            ready = m["polls_left"] <= 0
            items.append({
                "metadata": {"name": m["name"], "labels": {
                    "node.kubernetes.io/microk8s-" + ("worker" if m["role"] == "worker"
                                                      else "controlplane"): "microk8s-"
                    + ("worker" if m["role"] == "worker" else "controlplane")}},
                "status": {"addresses": [{"type": "InternalIP", "address": m["address"]},
                                         {"type": "Hostname", "address": m["name"]}],
                           "conditions": [{"type": "Ready",
                                           "status": "True" if ready else "False"}]}})
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        return 0
