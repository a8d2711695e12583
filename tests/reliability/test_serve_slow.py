"""Slow clients cannot lock others out of `gapkit registry serve`.

Each connection costs the server a file descriptor, and a process has only so many. Two kinds of
client can hold one for ever: one that never finishes its request headers (slowloris), and one
that asks for a blob and never reads it (the server's send then waits on a full TCP window).
The server is started as users run it, its file limit lowered (`prlimit`) below the number of
such clients; a new client must still get in, once the server has cut the slow ones off, and
every stalled download must be dropped.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path

from gapkit.registry.server import STALL_TIMEOUT
from tests.registry.test_serve import serving
from tests.reliability.test_serve_attack import SlowClients, build, exchange
from tests.support.images import Blob, ImageSpec, Layer, write_layout

FILES = 64
SLOW_SENDERS = 50
STALLED_READERS = 40
BLOB = 8 * 1024 * 1024


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stalled_download(port: int, path: str) -> socket.socket:
    """A GET of a blob whose answer is never read (a tiny receive buffer, so the server's send
    soon waits on a zero window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_slow_senders_and_stalled_readers_are_cut_off_so_others_get_in(tmp_path: Path) -> None:
    big = Layer(Blob(os.urandom(BLOB), "application/vnd.oci.image.layer.v1.tar+gzip"),
                "sha256:" + "0" * 64)
    write_layout(tmp_path / "layout", [ImageSpec("docker.io/team/big:1", [big])])
    path = f"/v2/team/big/blobs/{big.blob.digest}"
    with serving(tmp_path / "layout", tmp_path / "serve", "--tls", "off") as served:
        assert served.process is not None
        pid = served.process.pid
        assert len(served.request(path)[1]) == BLOB  # hashed once, before it is first served
        baseline = open_files(pid)
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (FILES, hard))
        started = time.monotonic()
        readers = [stalled_download(served.port, path) for _ in range(STALLED_READERS)]
        time.sleep(1)  # the server has taken them in and is stuck sending
        slow = SlowClients(served.port, SLOW_SENDERS)
        try:
            try:
                answer = exchange(served.port, build("GET", "/v2/", []), timeout=STALL_TIMEOUT + 15)
            except TimeoutError:
                answer = None
            waited = time.monotonic() - started
            slow.stop()  # gone: what stays open now is the stalled downloads
            deadline = started + STALL_TIMEOUT + 15
            while open_files(pid) > baseline + 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            left, dropped = open_files(pid), time.monotonic() - started
        finally:
            slow.stop()
            for sock in readers:
                sock.close()
        print(f"\n{STALLED_READERS} stalled readers, {SLOW_SENDERS} slow senders, {FILES} files: "
              f"a new client got in after {waited:.1f} s; the server was back to {left} open "
              f"files (from {baseline}) after {dropped:.1f} s")
        assert answer is not None and answer.status == 200
        assert left <= baseline + 2, (baseline, left)
        assert "Traceback" not in served.log()
