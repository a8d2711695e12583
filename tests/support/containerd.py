"""A real containerd for the tests: its own root, state, socket and opt path; stopped by PID.

Follows TESTBED.md: `containerd --config FILE` without systemd. The socket lives in a short
folder of its own under /tmp, because a unix socket path must stay under 108 bytes and pytest's
temp folders can be longer. Several instances can run side by side.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import stop_process_group


@dataclass
class Containerd:
    """One `containerd` daemon; `ctr(...)` runs the real `ctr` against it."""

    folder: Path
    #: Start the CRI plugin too (slower; only tests of CRI behaviour need it).
    cri: bool = False
    snapshotter: str = "overlayfs"
    process: subprocess.Popen[bytes] | None = None
    socket_dir: Path | None = None

    @property
    def address(self) -> str:
        assert self.socket_dir is not None, "containerd is not started"
        return str(self.socket_dir / "containerd.sock")

    @property
    def certs_dir(self) -> Path:
        """The CRI plugin's `registry.config_path` (hosts.toml folders)."""
        return self.folder / "certs.d"

    def start(self, timeout: float = 20.0) -> Containerd:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.certs_dir.mkdir(exist_ok=True)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        disabled = [] if self.cri else ['"io.containerd.grpc.v1.cri"']
        config = self.folder / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.folder / "root"}"\n'
            f'state = "{self.folder / "state"}"\n'
            f"disabled_plugins = [{', '.join(disabled)}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.socket_dir / "ttrpc.sock"}"\n'
            "[debug]\n"
            f'  address = "{self.socket_dir / "debug.sock"}"\n'
            '  level = "warn"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.folder / "opt"}"\n'
            '[plugins."io.containerd.grpc.v1.cri".registry]\n'
            f'  config_path = "{self.certs_dir}"\n'
        )
        log = open(self.folder / "containerd.log", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=log, stderr=log,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self.process.returncode}: "
                    + (self.folder / "containerd.log").read_text(errors="replace")[-2000:])
            if Path(self.address).exists():
                probe = subprocess.run(["ctr", "-a", self.address, "version"],
                                       capture_output=True)
                if probe.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"containerd did not answer on {self.address} in {timeout}s")
            time.sleep(0.1)

    def ctr(self, *args: str, namespace: str = "k8s.io",
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `ctr -a SOCK -n NAMESPACE ARGS...`; raise with ctr's stderr when it fails."""
        proc = subprocess.run(["ctr", "-a", self.address, "-n", namespace, *args],
                              capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}")
        return proc

    def image_names(self, namespace: str = "k8s.io") -> list[str]:
        out = self.ctr("image", "ls", "-q", namespace=namespace).stdout
        return sorted(line for line in out.splitlines() if line)

    def stop(self) -> None:
        stop_process_group(self.process, timeout=10)
        self.process = None
        # Snapshots may hold overlay mounts under root; containerd unmounts its own on exit.
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
