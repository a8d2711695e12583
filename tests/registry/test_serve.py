"""`gapkit registry serve` against real clients: containerd (`ctr --hosts-dir` and the CRI
plugin's `config_path`), skopeo, and raw HTTP for the corners of the distribution API.

The server always runs as the real command (`python -m gapkit registry serve …`) on a free
loopback port and is stopped by PID. The node side has no internet: every hosts.toml names a
closed local port as `server`, so an image can only come through the mirror.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.cli import gapkit
from tests.support.containerd import Containerd
from tests.support.images import Blob, ImageSpec, Layer, make_layer, write_layout
from tests.support.microk8s import cri_pull
from tests.support.peers import free_port
from tests.support.upstreams import Upstreams

if TYPE_CHECKING:
    from tests.support.peers import TestCA

#: One repository path under two upstreams (different content), a multi-arch index that only
#: registry.k8s.io has, and a Docker Hub image under a two-part name.
BUNDLE_IMAGES = [
    "docker.io/team/app:1",
    "quay.io/team/app:1",
    "registry.k8s.io/pause:3.10",
    "docker.io/calico/cni:v3.28.1",
]
#: Where an air-gapped node's `server` lines lead: nowhere (a closed port).
NOWHERE = "http://127.0.0.1:9"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


# --------------------------------------------------------------------------------------------
# The server as a user runs it


@dataclass
class Served:
    """One `gapkit registry serve` process on 127.0.0.1:PORT."""

    source: Path
    folder: Path
    args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    ca: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def tls(self) -> bool:
        auto = "--tls" in self.args and self.args[self.args.index("--tls") + 1] == "auto"
        return auto or "--tls-cert" in self.args

    @property
    def log_path(self) -> Path:
        return self.folder / "serve.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 30) -> Served:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        out = open(self.log_path, "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gapkit", "registry", "serve", str(self.source),
             "--listen", self.host, "--state", str(self.folder / "state"), *self.args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                # Listening comes first, then the banner; its last line says it is all there.
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    if "Ctrl-C stops the server" in self.log():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"serve did not start in {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        if self.tls and self.ca is None:
            self.ca = self.folder / "state" / "ca.crt"
        return self

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """`signum` (SIGTERM), then wait; the exit code (SIGKILL after 10 s: None)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            os.killpg(process.pid, signum)
            try:
                return process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return None
        return process.returncode

    def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None
                ) -> tuple[int, bytes, http.client.HTTPMessage]:
        if self.tls:
            assert self.ca is not None
            context = ssl.create_default_context(cafile=str(self.ca))
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=10, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), response.headers
        finally:
            conn.close()


@contextlib.contextmanager
def serving(source: Path, folder: Path, *args: str, ca: Path | None = None,
            stop_signal: int = signal.SIGTERM) -> Iterator[Served]:
    """A started server, stopped (and required to exit cleanly) afterwards."""
    served = Served(source, folder, list(args), ca=ca).start()
    try:
        yield served
    finally:
        code = served.stop(stop_signal)
        assert code == 0, f"serve exited with {code} on signal {stop_signal}:\n{served.log()}"


def write_hosts(folder: Path, upstreams: Iterable[str], mirror: str, ca: Path | None = None,
                authorization: str | None = None) -> Path:
    """`<folder>/<upstream>/hosts.toml` for each upstream, as an operator writes them."""
    for upstream in upstreams:
        lines = [f'server = "{NOWHERE}"', "", f'[host."{mirror}"]',
                 '  capabilities = ["pull", "resolve"]']
        if ca is not None:
            lines.append(f'  ca = "{ca}"')
        if authorization is not None:
            lines += [f'  [host."{mirror}".header]', f'    authorization = "{authorization}"']
        (folder / upstream).mkdir(parents=True, exist_ok=True)
        (folder / upstream / "hosts.toml").write_text("\n".join(lines) + "\n")
    return folder


def ctr_digests(containerd: Containerd) -> dict[str, str]:
    """name -> digest of every image containerd holds in k8s.io."""
    out = containerd.ctr("image", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out if line.strip()}


def pull(containerd: Containerd, hosts: Path, name: str,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return containerd.ctr("image", "pull", "--platform", "linux/amd64", "--hosts-dir",
                          str(hosts), name, check=check)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------------------------
# Sources


@dataclass
class BundleSource:
    bundle: Path
    digests: dict[str, str]
    folder: Path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BundleSource]:
    """A gapkit bundle built from stand-in upstreams, for this host's platform only."""
    folder = tmp_path_factory.mktemp("serve-bundle")
    upstreams = Upstreams(folder / "upstreams")
    try:
        digests = upstreams.push(BUNDLE_IMAGES)
        path = upstreams.build_bundle(folder / "bundle.tar", BUNDLE_IMAGES)
    finally:
        upstreams.stop()
    yield BundleSource(path, digests, folder)


@pytest.fixture(scope="module")
def bundle_server(bundle: BundleSource) -> Iterator[Served]:
    with serving(bundle.bundle, bundle.folder / "serve-plain", "--tls", "off") as served:
        yield served


LAYOUT_IMAGES = {
    "docker.io/library/nginx:1.27": 1,
    "docker.io/team/app:1": 2,
    "quay.io/team/app:1": 3,
    "quay.io/x/tool:1": 4,
    "ghcr.io/x/tool:1": 5,
}


@dataclass
class LayoutSource:
    root: Path
    digests: dict[str, str]
    canary: bytes


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> LayoutSource:
    """An OCI layout folder (written by hand), with a canary file beside it and an orphan
    blob inside it that no manifest names: neither may ever be served."""
    folder = tmp_path_factory.mktemp("serve-layout")
    root = folder / "layout"
    specs = [ImageSpec(name, [make_layer(seed, 3000 + seed)]) for name, seed in LAYOUT_IMAGES.items()]
    specs.append(ImageSpec("registry.k8s.io/pause:3.10", [make_layer(9, 700)],
                           others={"linux/arm64/v8": [make_layer(10, 600)]}))
    specs.append(ImageSpec("docker.io/library/many:1", [make_layer(11, 500)]))
    digests = write_layout(root, specs)
    # More tags for pagination: same image, tags t00..t11.
    index = json.loads((root / "index.json").read_text())
    many = next(m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == "docker.io/library/many:1")
    for i in range(12):
        index["manifests"].append(dict(many, annotations={
            "org.opencontainers.image.ref.name": f"docker.io/library/many:t{i:02d}"}))
    (root / "index.json").write_text(json.dumps(index))
    canary = b"CANARY-" + os.urandom(16).hex().encode()
    (folder / "secret.txt").write_bytes(canary * 4)
    orphan = canary * 8
    (root / "blobs" / "sha256" / hashlib.sha256(orphan).hexdigest()).write_bytes(orphan)
    return LayoutSource(root, digests, canary)


@pytest.fixture(scope="module")
def layout_server(layout: LayoutSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(layout.root, tmp_path_factory.mktemp("serve-layout-run"), "--tls", "off") as served:
        yield served


# --------------------------------------------------------------------------------------------
# containerd: ctr --hosts-dir


@dataclass
class Pulled:
    containerd: Containerd
    hosts: Path
    digests: dict[str, str]


@pytest.fixture(scope="module")
def pulled(bundle: BundleSource, bundle_server: Served,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pulled]:
    """Every bundle image pulled by a real containerd through plain-HTTP hosts.toml files."""
    folder = tmp_path_factory.mktemp("ctr-plain")
    daemon = Containerd(folder / "containerd")
    try:
        daemon.start()
        hosts = write_hosts(folder / "hosts", ["docker.io", "quay.io", "registry.k8s.io"],
                            bundle_server.url)
        for name in BUNDLE_IMAGES:
            pull(daemon, hosts, name)
        yield Pulled(daemon, hosts, ctr_digests(daemon))
    finally:
        daemon.stop()


def test_ctr_pulls_every_image_through_hosts_toml_with_its_upstream_digest(
        bundle: BundleSource, pulled: Pulled, bundle_server: Served) -> None:
    assert {name: pulled.digests[name] for name in BUNDLE_IMAGES} == bundle.digests
    log = bundle_server.log()
    assert "ns=quay.io" in log and "ns=registry.k8s.io" in log and "ns=docker.io" in log


def test_the_same_path_under_two_upstreams_stays_apart_through_ns(
        bundle: BundleSource, pulled: Pulled) -> None:
    docker, quay = pulled.digests["docker.io/team/app:1"], pulled.digests["quay.io/team/app:1"]
    assert docker != quay
    assert docker == bundle.digests["docker.io/team/app:1"]
    assert quay == bundle.digests["quay.io/team/app:1"]


def test_a_ctr_export_tar_serves_as_a_source(pulled: Pulled, tmp_path: Path) -> None:
    exported = tmp_path / "export.tar"
    pulled.containerd.ctr("image", "export", str(exported), *BUNDLE_IMAGES)
    with serving(exported, tmp_path / "serve", "--tls", "off") as served:
        for name in BUNDLE_IMAGES:
            raw = subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false",
                 f"docker://{served.host}/{name}"], capture_output=True, check=True).stdout
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == pulled.digests[name], name


def test_a_docker_save_tar_serves_as_a_source(layout: LayoutSource, tmp_path: Path) -> None:
    name = "docker.io/library/nginx:1.27"
    archive = tmp_path / "saved.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout.root}:{name}",
                    f"docker-archive:{archive}:{name}"], capture_output=True, check=True)
    original = json.loads((layout.root / "blobs" / "sha256" /
                           layout.digests[name].split(":")[1]).read_text())
    with serving(archive, tmp_path / "serve", "--tls", "off") as served:
        _, body, head = served.request("/v2/library/nginx/manifests/1.27")
        assert head["Content-Type"] == DOCKER_MANIFEST  # what a registry serves for it
        assert json.loads(body)["config"]["digest"] == original["config"]["digest"]
        copied = tmp_path / "copied"
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{served.host}/nginx:1.27", f"oci:{copied}:x"],
                       capture_output=True, check=True)  # checking every digest it reads
        assert (copied / "index.json").is_file()


def test_ctr_pulls_over_https_with_the_ca_that_tls_auto_made(
        bundle: BundleSource, tmp_path: Path, containerd: Containerd) -> None:
    with serving(bundle.bundle, tmp_path / "serve", "--tls", "auto") as served:
        assert served.ca is not None and served.ca.is_file()
        assert str(served.ca) in served.log()  # printed for the operator
        hosts = write_hosts(tmp_path / "hosts", ["registry.k8s.io", "quay.io"],
                            f"https://{served.host}", ca=served.ca)
        pull(containerd, hosts, "registry.k8s.io/pause:3.10")
        pull(containerd, hosts, "quay.io/team/app:1")
        digests = ctr_digests(containerd)
        assert digests["registry.k8s.io/pause:3.10"] == bundle.digests["registry.k8s.io/pause:3.10"]
        assert digests["quay.io/team/app:1"] == bundle.digests["quay.io/team/app:1"]
        # Without the CA, containerd refuses the certificate (and the node has nowhere else).
        untrusting = write_hosts(tmp_path / "hosts-no-ca", ["docker.io"], f"https://{served.host}")
        refused = pull(containerd, untrusting, "docker.io/calico/cni:v3.28.1", check=False)
        assert refused.returncode != 0
        assert "certificate" in refused.stderr


def test_the_sites_own_certificate_serves_https_and_sigint_stops_cleanly(
        layout: LayoutSource, tmp_path: Path, test_ca: TestCA) -> None:
    access = tmp_path / "access.log"
    with serving(layout.root, tmp_path / "serve", "--tls-cert", str(test_ca.server_cert),
                 "--tls-key", str(test_ca.server_key), "--access-log", str(access),
                 ca=test_ca.ca_cert, stop_signal=signal.SIGINT) as served:
        status, body, _ = served.request("/v2/nginx/manifests/1.27")
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layout.digests[
            "docker.io/library/nginx:1.27"]
        assert not (tmp_path / "serve" / "state").exists()  # nothing made for auto TLS
        assert served.request("/v2/nginx/manifests/nope", method="HEAD")[0] == 404
    lines = access.read_text().splitlines()
    assert len(lines) == 2
    assert '127.0.0.1 "GET /v2/nginx/manifests/1.27" 200 ' + str(len(body)) in lines[0]
    assert '"HEAD /v2/nginx/manifests/nope" 404 0 ' in lines[1]


def test_tls_auto_keeps_its_ca_and_renews_the_server_certificate_when_names_change(
        tmp_path: Path) -> None:
    from gapkit.registry.tls import ensure_auto_tls

    first = ensure_auto_tls(tmp_path, "0.0.0.0")
    assert first.new_ca and first.new_cert and first.ca is not None
    ca_bytes, cert_bytes = first.ca.read_bytes(), first.cert.read_bytes()
    assert "127.0.0.1" in first.names and "localhost" in first.names
    assert oct(first.key.stat().st_mode & 0o777) == "0o600"
    again = ensure_auto_tls(tmp_path, "0.0.0.0")
    assert not again.new_ca and not again.new_cert
    assert first.cert.read_bytes() == cert_bytes
    named = ensure_auto_tls(tmp_path, "0.0.0.0", ("mirror.example",))
    assert not named.new_ca and named.new_cert and "mirror.example" in named.names
    assert first.ca.read_bytes() == ca_bytes
    assert first.cert.read_bytes() != cert_bytes


def test_basic_auth_lets_ctr_in_with_the_header_table_and_tells_nothing_without_it(
        bundle: BundleSource, tmp_path: Path, containerd: Containerd) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{user}:{bcrypt.hashpw(pw, bcrypt.gensalt(4)).decode()}\n"
                                for user, pw in (("gapkit", b"s3cret"), ("late", b"l4te"))))
    with serving(bundle.bundle, tmp_path / "serve", "--tls", "off",
                          "--htpasswd", str(htpasswd)) as served:
        hosts = write_hosts(tmp_path / "hosts", ["quay.io"], served.url,
                            authorization=basic("gapkit", "s3cret"))
        pull(containerd, hosts, "quay.io/team/app:1")
        assert ctr_digests(containerd)["quay.io/team/app:1"] == bundle.digests["quay.io/team/app:1"]
        without = write_hosts(tmp_path / "hosts-bare", ["docker.io"], served.url)
        assert pull(containerd, without, "docker.io/team/app:1", check=False).returncode != 0
        answers = []
        for path in ("/v2/", "/v2/team/app/manifests/1?ns=quay.io",
                     "/v2/no/such/manifests/1?ns=quay.io", "/v2/_catalog"):
            for headers in ({}, {"Authorization": basic("gapkit", "wrong")},
                            {"Authorization": basic("nobody", "s3cret")},
                            {"Authorization": "Bearer x"}):
                status, body, head = served.request(path, headers=headers)
                assert status == 401
                assert head["WWW-Authenticate"] == 'Basic realm="gapkit"'
                answers.append(body)
        assert len(set(answers)) == 1 and b"UNAUTHORIZED" in answers[0]
        status, _, _ = served.request("/v2/_catalog",
                                      headers={"Authorization": basic("gapkit", "s3cret")})
        assert status == 200
        # 8 failed logins from this address so far; 2 more and it must wait, even with a right
        # password it never used (the same 401, no bcrypt), while known credentials still pass.
        for _ in range(2):
            assert served.request("/v2/", headers={"Authorization": basic("late", "x")})[0] == 401
        assert served.request("/v2/", headers={"Authorization": basic("late", "l4te")})[0] == 401
        assert served.request("/v2/", headers={"Authorization": basic("gapkit", "s3cret")})[0] == 200


def test_serve_refuses_an_htpasswd_without_bcrypt(bundle: BundleSource, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ok:" + bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
                        + "\nold:$apr1$abcdefgh$0123456789abcdefghijkl\n")
    refused = gapkit("registry", "serve", str(bundle.bundle), "--tls", "off", "--listen",
                     f"127.0.0.1:{free_port()}", "--htpasswd", str(htpasswd), check=False)
    assert refused.returncode == 2
    assert "line 2" in refused.stderr and "apr1" in refused.stderr
    assert "htpasswd -B" in refused.stderr


# --------------------------------------------------------------------------------------------
# containerd's CRI plugin: config_path


def test_the_cri_plugin_pulls_through_hosts_toml_under_config_path(
        bundle: BundleSource, bundle_server: Served, tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    daemon = Containerd(tmp_path / "containerd", cri=True)
    try:
        daemon.start()
        write_hosts(daemon.certs_dir, ["registry.k8s.io", "quay.io"], bundle_server.url)
        for name in ("registry.k8s.io/pause:3.10", "quay.io/team/app:1"):
            ref = cri_pull(daemon.address, name)
            assert ref.startswith("sha256:")
        digests = ctr_digests(daemon)
        assert digests["registry.k8s.io/pause:3.10"] == bundle.digests["registry.k8s.io/pause:3.10"]
        assert digests["quay.io/team/app:1"] == bundle.digests["quay.io/team/app:1"]
    finally:
        daemon.stop()


# --------------------------------------------------------------------------------------------
# skopeo


def test_skopeo_inspects_and_copies_every_image_by_short_and_upstream_paths(
        bundle: BundleSource, bundle_server: Served, tmp_path: Path) -> None:
    names = {
        "docker.io/team/app:1": "team/app:1",                     # Docker Hub reading
        "quay.io/team/app:1": "quay.io/team/app:1",               # upstream in the path
        "registry.k8s.io/pause:3.10": "pause:3.10",               # unique among upstreams
        "docker.io/calico/cni:v3.28.1": "docker.io/calico/cni:v3.28.1",
    }
    for name, path in names.items():
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{bundle_server.host}/{path}"],
                             capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == bundle.digests[name], path
        target = tmp_path / name.replace("/", "_").replace(":", "_")
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{bundle_server.host}/{path}", f"oci:{target}:x"],
                       capture_output=True, check=True)
        index = json.loads((target / "index.json").read_text())
        assert index["manifests"][0]["digest"] in (bundle.digests[name], _amd64(raw))
    tags = subprocess.run(["skopeo", "list-tags", "--tls-verify=false",
                           f"docker://{bundle_server.host}/quay.io/team/app"],
                          capture_output=True, check=True, text=True).stdout
    assert json.loads(tags)["Tags"] == ["1"]


def _amd64(raw: bytes) -> str:
    doc = json.loads(raw)
    for entry in doc.get("manifests", []):
        if entry["platform"]["architecture"] == "amd64":
            return str(entry["digest"])
    return ""


# --------------------------------------------------------------------------------------------
# A damaged bundle


def test_a_damaged_blob_is_never_served_and_is_reported(bundle: BundleSource, tmp_path: Path,
                                                        containerd: Containerd) -> None:
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bundle.bundle.read_bytes())
    with tarfile.open(bundle.bundle) as tar:
        layer = max((m for m in tar.getmembers() if m.name.startswith("blobs/")),
                    key=lambda m: m.size)
    with open(damaged, "r+b") as f:
        f.seek(layer.offset_data + layer.size // 2)
        byte = f.read(1)
        f.seek(layer.offset_data + layer.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    digest = "sha256:" + layer.name.rsplit("/", 1)[1]
    with serving(damaged, tmp_path / "serve", "--tls", "off") as served:
        for method in ("GET", "HEAD", "GET"):
            status, body, _ = served.request(f"/v2/team/app/blobs/{digest}", method=method)
            assert status == 404
            if method == "GET":
                error = json.loads(body)["errors"][0]
                assert error["code"] == "BLOB_UNKNOWN"
                assert "damaged" in error["detail"]["reason"]
        hosts = write_hosts(tmp_path / "hosts", ["docker.io"], served.url)
        assert pull(containerd, hosts, "docker.io/team/app:1", check=False).returncode != 0
        assert digest not in ctr_digests(containerd).values()
        reports = [line for line in served.log().splitlines() if "is not served" in line]
        assert len(reports) == 1 and digest in reports[0] and "bundle verify" in reports[0]


# --------------------------------------------------------------------------------------------
# The API's corners, over an OCI layout folder


def test_an_oci_layout_folder_serves_heads_with_the_spec_headers(
        layout: LayoutSource, layout_server: Served) -> None:
    digest = layout.digests["docker.io/library/nginx:1.27"]
    status, body, head = layout_server.request("/v2/nginx/manifests/1.27", method="HEAD")
    assert status == 200 and body == b""
    assert head["Docker-Content-Digest"] == digest
    assert head["Content-Type"] == OCI_MANIFEST
    assert head["Docker-Distribution-API-Version"] == "registry/2.0"
    size = int(head["Content-Length"])
    status, body, _ = layout_server.request(f"/v2/library/nginx/manifests/{digest}")
    assert status == 200 and len(body) == size
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    layer = json.loads(body)["layers"][0]
    status, body, head = layout_server.request(f"/v2/nginx/blobs/{layer['digest']}", method="HEAD")
    assert status == 200 and body == b""
    assert head["Content-Length"] == str(layer["size"])
    assert head["Content-Type"] == "application/octet-stream"
    assert head["Docker-Content-Digest"] == layer["digest"]
    status, body, _ = layout_server.request("/v2/")
    assert status == 200 and json.loads(body) == {}


def test_blob_ranges_answer_206_and_416(layout: LayoutSource, layout_server: Served) -> None:
    _, body, _ = layout_server.request("/v2/nginx/manifests/1.27")
    layer = json.loads(body)["layers"][0]
    path = f"/v2/nginx/blobs/{layer['digest']}"
    _, whole, _ = layout_server.request(path)
    assert hashlib.sha256(whole).hexdigest() == layer["digest"].split(":")[1]
    size = len(whole)
    cases = {"bytes=10-19": (10, 20), "bytes=100-": (100, size), "bytes=-7": (size - 7, size),
             f"bytes=5-{size + 100}": (5, size)}
    for spec, (start, end) in cases.items():
        status, part, head = layout_server.request(path, headers={"Range": spec})
        assert status == 206, spec
        assert part == whole[start:end], spec
        assert head["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
        assert head["Docker-Content-Digest"] == layer["digest"]
    status, _, head = layout_server.request(path, headers={"Range": f"bytes={size}-"})
    assert status == 416 and head["Content-Range"] == f"bytes */{size}"
    status, part, _ = layout_server.request(path, headers={"Range": "bytes=1-2,5-6"})
    assert status == 200 and part == whole  # several ranges: RFC 9110 lets a server ignore them


def test_tags_and_catalog_paginate_with_link_headers(layout_server: Served) -> None:
    tags: list[str] = []
    path = "/v2/library/many/tags/list?n=5"
    pages = 0
    while path:
        status, body, head = layout_server.request(path)
        assert status == 200
        doc = json.loads(body)
        assert doc["name"] == "library/many" and len(doc["tags"]) <= 5
        tags += doc["tags"]
        pages += 1
        link = head.get("Link")
        path = link[1:link.index(">")] if link else ""
    assert pages == 3
    assert tags == sorted(["1", *[f"t{i:02d}" for i in range(12)]])
    _, body, head = layout_server.request("/v2/_catalog?n=2")
    first = json.loads(body)["repositories"]
    assert first == ["docker.io/library/many", "docker.io/library/nginx"]
    assert 'rel="next"' in head["Link"]
    _, body, _ = layout_server.request("/v2/_catalog")
    everything = json.loads(body)["repositories"]
    assert "quay.io/team/app" in everything and "ghcr.io/x/tool" in everything
    assert everything == sorted(everything)
    _, body, _ = layout_server.request("/v2/_catalog?n=0")
    assert json.loads(body)["repositories"] == []
    status, _, _ = layout_server.request("/v2/_catalog?n=-1")
    assert status == 400
    _, body, _ = layout_server.request(f"/v2/_catalog?n=100000&last={everything[-2]}")
    assert json.loads(body)["repositories"] == everything[-1:]


def test_names_resolve_by_ns_by_upstream_path_and_by_a_unique_short_path(
        layout: LayoutSource, layout_server: Served) -> None:
    def digest_of(path: str) -> str | int:
        status, _, head = layout_server.request(path, method="HEAD")
        return head["Docker-Content-Digest"] if status == 200 else status

    d = layout.digests
    assert digest_of("/v2/team/app/manifests/1") == d["docker.io/team/app:1"]
    assert digest_of("/v2/team/app/manifests/1?ns=docker.io") == d["docker.io/team/app:1"]
    assert digest_of("/v2/team/app/manifests/1?ns=quay.io") == d["quay.io/team/app:1"]
    assert digest_of("/v2/quay.io/team/app/manifests/1") == d["quay.io/team/app:1"]
    assert digest_of("/v2/docker.io/team/app/manifests/1?ns=docker.io") == d["docker.io/team/app:1"]
    assert digest_of("/v2/nginx/manifests/1.27") == d["docker.io/library/nginx:1.27"]
    assert digest_of("/v2/pause/manifests/3.10") == d["registry.k8s.io/pause:3.10"]
    assert digest_of("/v2/x/tool/manifests/1?ns=ghcr.io") == d["ghcr.io/x/tool:1"]
    assert digest_of("/v2/team/app/manifests/1?ns=ghcr.io") == 404
    status, body, _ = layout_server.request("/v2/x/tool/manifests/1")
    error = json.loads(body)["errors"][0]
    assert status == 404 and error["code"] == "NAME_UNKNOWN"
    assert error["detail"]["candidates"] == ["ghcr.io/x/tool", "quay.io/x/tool"]
    # A blob is reached only through a repository whose images use it.
    _, body, _ = layout_server.request("/v2/team/app/manifests/1?ns=quay.io")
    quay_layer = json.loads(body)["layers"][0]["digest"]
    assert layout_server.request(f"/v2/team/app/blobs/{quay_layer}?ns=quay.io")[0] == 200
    assert layout_server.request(f"/v2/team/app/blobs/{quay_layer}?ns=docker.io")[0] == 404


def test_accept_never_gets_a_type_the_client_excluded(layout: LayoutSource,
                                                      layout_server: Served) -> None:
    index_digest = layout.digests["registry.k8s.io/pause:3.10"]
    path = "/v2/pause/manifests/3.10"
    status, body, head = layout_server.request(path)
    assert status == 200 and head["Content-Type"] == OCI_INDEX
    amd64 = _amd64(body)
    status, _, head = layout_server.request(path, headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
    assert head["Content-Type"] == OCI_INDEX and head["Docker-Content-Digest"] == index_digest
    # No index accepted, by tag: the platform manifest for the server's platform, saying so.
    status, body, head = layout_server.request(path, headers={"Accept": OCI_MANIFEST})
    assert status == 200 and head["Content-Type"] == OCI_MANIFEST
    assert head["Docker-Content-Digest"] == amd64 == "sha256:" + hashlib.sha256(body).hexdigest()
    # Only Docker types accepted: nothing here fits.
    status, body, _ = layout_server.request(path, headers={"Accept": DOCKER_MANIFEST})
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, _ = layout_server.request(f"/v2/pause/manifests/{index_digest}",
                                         headers={"Accept": OCI_MANIFEST})
    assert status == 404
    status, _, head = layout_server.request("/v2/nginx/manifests/1.27",
                                            headers={"Accept": DOCKER_MANIFEST})
    assert status == 404
    status, _, head = layout_server.request("/v2/nginx/manifests/1.27",
                                            headers={"Accept": "*/*"})
    assert status == 200 and head["Content-Type"] == OCI_MANIFEST


def test_writes_answer_405_unsupported_and_bad_names_400(layout_server: Served) -> None:
    for method in ("PUT", "POST", "PATCH", "DELETE", "OPTIONS"):
        for path in ("/v2/nginx/manifests/1.27", "/v2/nginx/blobs/uploads/", "/v2/"):
            status, body, head = layout_server.request(path, method=method)
            assert status == 405, (method, path)
            assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
            assert head["Allow"] == "GET, HEAD"
    for path, code in (("/v2/a%2Fb/manifests/1", "NAME_INVALID"),
                       ("/v2/a/../b/manifests/1", "NAME_INVALID"),
                       ("/v2/%2e%2e/b/manifests/1", "NAME_INVALID"),
                       ("/v2/Upper/manifests/1", "NAME_INVALID"),
                       ("/v2/" + "a/" * 200 + "b/manifests/1", "NAME_INVALID"),
                       ("/v2/nginx/blobs/sha256:xyz", "DIGEST_INVALID"),
                       ("/v2/nginx/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
                       ("/v2/nginx/manifests/sha256:" + "0" * 63, "DIGEST_INVALID")):
        status, body, _ = layout_server.request(path)
        assert status == 400, path
        assert json.loads(body)["errors"][0]["code"] == code, path
    status, _, _ = layout_server.request("/v2/nginx/manifests/1?" + "x" * 5000)
    assert status == 414
    status, _, _ = layout_server.request("/v2/", headers={f"X-{i}": "y" * 4000 for i in range(6)})
    assert status == 431


# --------------------------------------------------------------------------------------------
# Hostile requests


_SEGMENTS = st.sampled_from([
    "v2", "", ".", "..", "%2e%2e", "%2E%2e", "%2F", "..%2F..", "%00", "nginx", "library", "team",
    "app", "quay.io", "manifests", "blobs", "tags", "list", "_catalog", "uploads", "1.27", "1",
    "sha256:" + "0" * 64, "sha256:../../etc/passwd", "secret.txt", "layout", "blobs/sha256",
    "/etc/passwd", "%252e%252e", "a" * 300, "\u00e9", "\u202e", "../../secret.txt",
])
_PATHS = st.lists(st.one_of(_SEGMENTS, st.text(min_size=1, max_size=20)), min_size=0,
                  max_size=8).map(lambda parts: "/" + "/".join(parts))
_QUERY = st.one_of(st.just(""), st.builds(
    lambda ns, n, last: f"?ns={ns}&n={n}&last={last}",
    st.sampled_from(["docker.io", "quay.io", "..", "%2F", "a" * 300, ""]),
    st.sampled_from(["1", "-1", "0", "99999999999999999999", "x", ""]),
    st.text(max_size=10)))
_HEADERS = st.dictionaries(
    st.sampled_from(["Range", "Accept", "Authorization", "If-None-Match", "X-Big", "Host",
                     "Content-Length", "Transfer-Encoding"]),
    st.one_of(st.text(max_size=30), st.sampled_from([
        "bytes=0-", "bytes=-0", "bytes=99999999999999999999-", "bytes=5-1", "bytes=0-0,1-1",
        "*/*", OCI_INDEX, "Basic Zm9vOmJhcg==", "x" * 9000, "chunked", "-1"])),
    max_size=4)


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """One answer to `request`: its status, and its headers and body as bytes. The answer is
    read by its length (a half-closed connection gets no answer from aiohttp, and a request
    that declares a body it does not send keeps the connection open after the answer)."""
    method = request.split(b" ", 1)[0].decode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read(2_000_000)
        return response.status, str(response.headers).encode("utf-8", "replace") + body


@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH", "OPTIONS",
                               "TRACE", "CONNECT", "BREW", "get"]),
       path=_PATHS, query=_QUERY, headers=_HEADERS)
def test_hostile_requests_never_get_a_5xx_a_hang_or_a_byte_from_outside(
        layout: LayoutSource, layout_server: Served, method: str, path: str, query: str,
        headers: dict[str, str]) -> None:
    lines = [f"{method} {path}{query} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *[f"{k}: {v}" for k, v in headers.items() if k != "Host"]]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    status, data = _raw(layout_server.port, request)
    assert status < 500, (request, data[:300])
    assert layout.canary not in data


def test_the_server_still_answers_after_the_hostile_requests(layout_server: Served) -> None:
    assert layout_server.request("/v2/")[0] == 200
    assert "Traceback" not in layout_server.log()


# --------------------------------------------------------------------------------------------
# Memory


def test_memory_stays_flat_while_32_clients_pull_a_large_blob(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    data = os.urandom(size)
    big = Layer(Blob(data, "application/vnd.oci.image.layer.v1.tar+gzip"), "sha256:" + "0" * 64)
    write_layout(tmp_path / "layout", [ImageSpec("docker.io/team/big:1", [big])])
    digest = big.blob.digest
    del data
    with serving(tmp_path / "layout", tmp_path / "serve", "--tls", "off") as served:
        assert served.process is not None
        status_file = Path(f"/proc/{served.process.pid}/status")

        def hwm() -> int:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
            raise AssertionError("no VmHWM")

        def fetch(results: list[int]) -> None:
            with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
                sock.sendall(f"GET /v2/team/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
                             "Connection: close\r\n\r\n".encode())
                buffer = bytearray(1 << 20)
                total = 0
                while n := sock.recv_into(buffer):
                    total += n
            results.append(total)

        warm: list[int] = []
        fetch(warm)  # the blob is hashed once, before it is first served
        assert warm[0] > size
        before = hwm()
        results: list[int] = []
        threads = [threading.Thread(target=fetch, args=(results,)) for _ in range(32)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        seconds = time.monotonic() - started
        after = hwm()
        assert len(results) == 32 and all(r > size for r in results)
        print(f"\n32 clients x {size >> 20} MiB in {seconds:.2f} s "
              f"({32 * size / seconds / 1e9:.2f} GB/s); server VmHWM {before >> 20} MiB -> "
              f"{after >> 20} MiB")
        assert after - before < 16 * 1024 * 1024, (before, after)
