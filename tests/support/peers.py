"""Real peers started by the tests: the CNCF registry (plain HTTP, TLS with a test CA, htpasswd).

Every process is started on a free loopback port in a temp folder and stopped by PID, even when
the test fails (the fixtures in tests/conftest.py call `stop()` in a `finally`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process_group(process: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM the process's group (started with `start_new_session=True`), SIGKILL it after
    `timeout` seconds; a process that is already gone is fine."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class TestCA:
    """A throw-away CA and one server certificate for 127.0.0.1, localhost and extra names."""

    folder: Path
    ca_cert: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca_cert = self.folder / "ca.crt"
        self.server_cert = self.folder / "server.crt"
        self.server_key = self.folder / "server.key"

    def create(self, names: tuple[str, ...] = ()) -> TestCA:
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gapkit test CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        sans += [x509.DNSName(n) for n in names]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.server_key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return self


@dataclass
class Registry:
    """One `docker-registry serve` process on loopback."""

    folder: Path
    tls: TestCA | None = None
    users: dict[str, str] | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> Registry:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.folder / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "gapkit-tests"},
        }
        if self.tls is not None:
            config["http"] = {**config["http"],  # type: ignore[dict-item]
                              "tls": {"certificate": str(self.tls.server_cert),
                                      "key": str(self.tls.server_key)}}
        if self.users:
            htpasswd = self.folder / "htpasswd"
            htpasswd.write_text("".join(
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for user, pw in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "gapkit-tests", "path": str(htpasswd)}}
        config_path = self.folder / "config.yml"
        config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
        log = open(self.folder / "registry.log", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)], stdout=log, stderr=log,
            start_new_session=True)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None

    def skopeo_tls_args(self, prefix: str) -> list[str]:
        """skopeo flags (`prefix` is `src`, `dest`, or "" for `inspect`) to reach this registry."""
        flag = f"--{prefix}-" if prefix else "--"
        args = []
        if self.tls is None:
            args.append(f"{flag}tls-verify=false")
        else:
            certs = self.folder / "skopeo-certs"
            certs.mkdir(exist_ok=True)
            (certs / "ca.crt").write_bytes(self.tls.ca_cert.read_bytes())
            args.append(f"{flag}cert-dir={certs}")
        if self.users:
            user, pw = next(iter(self.users.items()))
            args.append(f"{flag}creds={user}:{pw}")
        return args

    def push_layout(self, layout: Path, name: str, target: str, all_platforms: bool = True) -> None:
        """Push image `name` of an OCI layout to `target` (a path:tag in this registry) by skopeo."""
        cmd = ["skopeo", "copy", "--quiet", *self.skopeo_tls_args("dest")]
        if all_platforms:
            cmd.append("--all")
        cmd += [f"oci:{layout}:{name}", f"docker://{self.host}/{target}"]
        subprocess.run(cmd, check=True, capture_output=True)

    def request(self, path: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        """A raw HTTP request (plain HTTP registries only), for assertions on registry state."""
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)
