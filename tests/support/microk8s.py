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
            "revision": self.revision, "arch": self.arch, "fail_imports": self.fail_imports}))

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

    def restarts(self) -> int:
        return sum(1 for call in self.calls() if call[:3] == ["snap", "restart", "microk8s"])


def stand_in_main(root: str, program: str, argv: list[str]) -> int:
    """What the stand-in does when run as `program ARGS...`."""
    state_dir = Path(root)
    state = json.loads((state_dir / "state.json").read_text())
    with open(state_dir / "calls.jsonl", "a") as log:
        log.write(json.dumps({"argv": [program, *argv]}) + "\n")
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
