"""`gapkit copy` end to end against a real docker-registry, with skopeo as the independent reader."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import gapkit
from tests.support.containerd import Containerd
from tests.support.images import ImageSpec, make_layer, write_layout
from tests.support.peers import Registry


def skopeo_digest(location: str, *flags: str) -> str:
    out = subprocess.run(["skopeo", "inspect", "--raw", *flags, location], capture_output=True,
                         check=True)
    return "sha256:" + hashlib.sha256(out.stdout).hexdigest()


@pytest.fixture
def workload(tmp_path: Path) -> dict[str, str]:
    """Two images sharing a base layer, one of them multi-arch, written by hand as a layout."""
    base = make_layer(10, 300_000)
    return write_layout(tmp_path / "workload", [
        ImageSpec("calico-cni", [base, make_layer(11, 70_000)]),
        ImageSpec("coredns", [base, make_layer(12, 50_000)],
                  others={"linux/arm64/v8": [make_layer(13, 40_000)]}),
    ])


def test_registry_layout_registry_archive_round_trip_keeps_every_digest(
        registry: Registry, second_registry: Registry, workload: dict[str, str],
        tmp_path: Path) -> None:
    registry.push_layout(tmp_path / "workload", "calico-cni", "calico/cni:v3.25.0")
    registry.push_layout(tmp_path / "workload", "coredns", "coredns/coredns:1.10.1")
    cni = f"{registry.host}/calico/cni:v3.25.0"
    dns = f"{registry.host}/coredns/coredns:1.10.1"
    layout = tmp_path / "layout"
    for ref in (cni, dns):
        gapkit("copy", "--all-platforms", "--plain-http", registry.host, f"docker://{ref}",
               f"oci:{layout}")
    assert skopeo_digest(f"oci:{layout}:{cni}") == workload["calico-cni"]
    assert skopeo_digest(f"oci:{layout}:{dns}") == workload["coredns"]

    pushed = f"{second_registry.host}/mirror/coredns:1.10.1"
    gapkit("copy", "--all-platforms", "--plain-http", second_registry.host,
           f"oci:{layout}:{dns}", f"docker://{pushed}")
    assert skopeo_digest(f"docker://{pushed}", "--tls-verify=false") == workload["coredns"]

    archive = tmp_path / "images.tar"
    gapkit("copy", "--all-platforms", f"oci:{layout}", f"oci-archive:{archive}")
    assert skopeo_digest(f"oci-archive:{archive}:{dns}") == workload["coredns"]
    assert skopeo_digest(f"oci-archive:{archive}:{cni}") == workload["calico-cni"]

    back = tmp_path / "back"
    gapkit("copy", "--all-platforms", f"oci-archive:{archive}", f"oci:{back}")
    assert skopeo_digest(f"oci:{back}:{cni}") == workload["calico-cni"]
    assert skopeo_digest(f"oci:{back}:{dns}") == workload["coredns"]


def test_one_platform_of_a_multi_arch_image_still_resolves_by_its_index_digest(
        registry: Registry, workload: dict[str, str], tmp_path: Path) -> None:
    registry.push_layout(tmp_path / "workload", "coredns", "coredns/coredns:1.10.1")
    ref = f"{registry.host}/coredns/coredns:1.10.1"
    out = gapkit("copy", "--platform", "linux/arm64", "--plain-http", registry.host, "--json",
                 f"docker://{ref}", f"oci:{tmp_path / 'arm'}")
    report = json.loads(out.stdout)
    assert report["images"][0]["digest"] == workload["coredns"]
    assert report["images"][0]["platforms"] == ["linux/arm64"]
    by_digest = f"{registry.host}/coredns/coredns@{workload['coredns']}"
    inspected = subprocess.run(
        ["skopeo", "inspect", "--override-arch", "arm64", f"oci:{tmp_path / 'arm'}:{ref}"],
        capture_output=True, text=True, check=True)
    assert json.loads(inspected.stdout)["Architecture"] == "arm64"
    again = gapkit("copy", "--platform", "linux/arm64", "--plain-http", registry.host, "--json",
                   f"docker://{by_digest}", f"oci:{tmp_path / 'arm2'}")
    assert json.loads(again.stdout)["images"][0]["digest"] == workload["coredns"]


def test_a_registry_serving_a_wrong_blob_fails_naming_the_digest_and_keeps_nothing(
        registry: Registry, tmp_path: Path) -> None:
    layer = make_layer(20, 100_000)
    write_layout(tmp_path / "w", [ImageSpec("app", [layer])])
    registry.push_layout(tmp_path / "w", "app", "team/app:1")
    digest = layer.blob.digest.split(":", 1)[1]
    stored = registry.folder / "data" / "docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
    data = bytearray(stored.read_bytes())
    data[-10] ^= 0x55
    stored.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    out = gapkit("copy", "--plain-http", registry.host, f"docker://{registry.host}/team/app:1",
                 f"oci:{dest}", check=False)
    assert out.returncode == 1
    assert layer.blob.digest in out.stderr
    assert "Traceback" not in out.stderr
    assert not (dest / "blobs" / "sha256" / digest).exists()
    assert not [p for p in (dest / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    assert json.loads((dest / "index.json").read_text())["manifests"] == []


def test_an_interrupted_copy_resumes_fetching_only_what_was_missing(
        registry: Registry, tmp_path: Path) -> None:
    layers = [make_layer(30 + i, 12_000_000) for i in range(6)]
    write_layout(tmp_path / "w", [ImageSpec("big", layers)])
    registry.push_layout(tmp_path / "w", "big", "team/big:1")
    dest = tmp_path / "dest"
    blobs = dest / "blobs" / "sha256"
    args = [sys.executable, "-m", "gapkit", "copy", "--jobs", "1", "--plain-http", registry.host,
            f"docker://{registry.host}/team/big:1", f"oci:{dest}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    layer_names = {layer.blob.digest.split(":", 1)[1] for layer in layers}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            done = layer_names & {p.name for p in blobs.iterdir()} if blobs.exists() else set()
            if len(done) >= 2:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    kept = layer_names & {p.name for p in blobs.iterdir()}
    assert 2 <= len(kept) < len(layers), "the kill should land mid-copy"
    out = gapkit("copy", "--jobs", "1", "--plain-http", registry.host, "--json",
                 f"docker://{registry.host}/team/big:1", f"oci:{dest}")
    report = json.loads(out.stdout)
    missing = [layer for layer in layers if layer.blob.digest.split(":", 1)[1] not in kept]
    assert report["blobs_present"] >= len(kept)
    assert report["bytes_copied"] <= sum(len(layer.blob.data) for layer in missing) + 10_000
    assert not [p for p in blobs.iterdir() if p.name.startswith(".")]
    assert skopeo_digest(f"oci:{dest}:{registry.host}/team/big:1") == \
        skopeo_digest(f"docker://{registry.host}/team/big:1", "--tls-verify=false")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["copy", "docker://Nginx", "oci:/tmp/x"], 2, "lower case"),
        (["copy", "nginx", "oci:/tmp/x"], 2, "does not name a transport"),
        (["copy", "oci:/nonexistent/layout:app", "oci:/tmp/x"], 1, "not an OCI image layout"),
        (["copy", "--platform", "linux", "oci:/x:y", "oci:/tmp/x"], 2, "not a platform"),
        (["copy", "--ca", "reg.example", "docker://a", "oci:/tmp/x"], 2, "REGISTRY=FILE"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_traceback(args: list[str], code: int,
                                                       message: str) -> None:
    out = gapkit(*args, check=False)
    assert out.returncode == code, out.stderr
    assert message in out.stderr
    assert out.stderr.startswith("error:")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["copy", "--jobs", "x", "oci:/x:y", "oci:/tmp/x"], "Invalid value for '--jobs'"),
        (["copy", "--retries", "-1", "oci:/x:y", "oci:/tmp/x"], "--retries"),
        (["bundle", "inspect", "a.tar", "b.tar"], "unexpected extra argument"),
        (["copy", "--no-such-flag", "oci:/x:y", "oci:/tmp/x"], "No such option"),
        (["no-such-command"], "No such command"),
    ],
)
def test_a_flag_the_parser_refuses_is_a_usage_error_not_an_internal_one(
        args: list[str], message: str) -> None:
    out = gapkit(*args, check=False)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr


def test_missing_image_is_not_found(registry: Registry, tmp_path: Path) -> None:
    out = gapkit("copy", "--plain-http", registry.host, f"docker://{registry.host}/no/such:1",
                 f"oci:{tmp_path / 'd'}", check=False)
    assert out.returncode == 3, out.stderr
    assert "no/such" in out.stderr


def test_a_registry_refusing_a_partial_index_gets_the_platform_manifest_and_a_note(
        registry: Registry, workload: dict[str, str], tmp_path: Path) -> None:
    """CNCF distribution refuses an index whose other platforms are missing (as skopeo and
    crane do then, the tag names the selected platform's manifest, and gapkit says so)."""
    layout = tmp_path / "workload"
    out = gapkit("copy", "--platform", "linux/amd64", "--plain-http", registry.host, "--json",
                 f"oci:{layout}:coredns", f"docker://{registry.host}/coredns/coredns:1")
    image = json.loads(out.stdout)["images"][0]
    assert image["digest"] != workload["coredns"]
    assert "refused the index" in image["note"] and workload["coredns"] in image["note"]
    pulled = json.loads(subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/coredns/coredns:1"],
        capture_output=True, text=True, check=True).stdout)
    assert pulled["Digest"] == image["digest"]
    assert pulled["Architecture"] == "amd64"


def test_ctr_imports_the_archive_and_skopeo_reads_the_docker_archive_gapkit_wrote(
        registry: Registry, containerd: Containerd, workload: dict[str, str],
        tmp_path: Path) -> None:
    registry.push_layout(tmp_path / "workload", "calico-cni", "calico/cni:v3.25.0")
    registry.push_layout(tmp_path / "workload", "coredns", "coredns/coredns:1.10.1")
    cni = f"{registry.host}/calico/cni:v3.25.0"
    dns = f"{registry.host}/coredns/coredns:1.10.1"
    layout = tmp_path / "layout"
    for ref in (cni, dns):
        gapkit("copy", "--platform", "linux/amd64", "--plain-http", registry.host,
               f"docker://{ref}", f"oci:{layout}")
    archive = tmp_path / "images.tar"
    gapkit("copy", f"oci:{layout}", f"oci-archive:{archive}")
    containerd.ctr("image", "import", "--platform", "linux/amd64", str(archive))
    assert containerd.image_names() == sorted([cni, dns])
    listed = containerd.ctr("image", "ls").stdout
    assert workload["coredns"] in listed and workload["calico-cni"] in listed

    saved = tmp_path / "saved.tar"
    gapkit("copy", f"oci:{layout}:{cni}", f"docker-archive:{saved}")
    inspected = json.loads(subprocess.run(
        ["skopeo", "inspect", f"docker-archive:{saved}"], capture_output=True, text=True,
        check=True).stdout)
    assert inspected["Architecture"] == "amd64"
    assert len(inspected["Layers"]) == 2


def test_docker_io_images_come_through_a_mirror(registry: Registry, workload: dict[str, str],
                                                tmp_path: Path) -> None:
    """No internet here: the mirror must answer, as containerd's hosts.toml mirrors do."""
    registry.push_layout(tmp_path / "workload", "calico-cni", "calico/cni:v3.25.0")
    out = gapkit("copy", "--mirror", f"docker.io=http://{registry.host}", "--json",
                 "docker://calico/cni:v3.25.0", f"oci:{tmp_path / 'via-mirror'}")
    image = json.loads(out.stdout)["images"][0]
    assert image["source"] == "docker.io/calico/cni:v3.25.0"
    assert image["digest"] == workload["calico-cni"]
    assert skopeo_digest(f"oci:{tmp_path / 'via-mirror'}:docker.io/calico/cni:v3.25.0") == \
        workload["calico-cni"]


def test_credentials_and_a_private_ca_reach_protected_registries(
        auth_registry: Registry, tls_registry: Registry, workload: dict[str, str],
        tmp_path: Path) -> None:
    auth_registry.push_layout(tmp_path / "workload", "calico-cni", "calico/cni:v3.25.0")
    src = f"docker://{auth_registry.host}/calico/cni:v3.25.0"
    denied = gapkit("copy", "--plain-http", auth_registry.host, src, f"oci:{tmp_path / 'x'}",
                    check=False)
    assert denied.returncode == 1
    assert "--creds" in denied.stderr and "Traceback" not in denied.stderr
    assert tls_registry.tls is not None
    dst = f"docker://{tls_registry.host}/calico/cni:v3.25.0"
    untrusted = gapkit("copy", "--plain-http", auth_registry.host,
                       "--creds", f"{auth_registry.host}=gapkit:s3cret", src, dst, check=False)
    assert untrusted.returncode == 1
    assert "--ca" in untrusted.stderr
    gapkit("copy", "--plain-http", auth_registry.host,
           "--creds", f"{auth_registry.host}=gapkit:s3cret",
           "--ca", f"{tls_registry.host}={tls_registry.tls.ca_cert}", src, dst)
    assert skopeo_digest(dst, *tls_registry.skopeo_tls_args("")) == workload["calico-cni"]


def test_several_sources_copy_into_one_layout_fetching_shared_blobs_once(
        registry: Registry, workload: dict[str, str], tmp_path: Path) -> None:
    registry.push_layout(tmp_path / "workload", "calico-cni", "calico/cni:v3.25.0")
    registry.push_layout(tmp_path / "workload", "coredns", "coredns/coredns:1.10.1")
    out = gapkit("copy", "--plain-http", registry.host, "--json",
                 f"docker://{registry.host}/calico/cni:v3.25.0",
                 f"docker://{registry.host}/coredns/coredns:1.10.1", f"oci:{tmp_path / 'both'}")
    report = json.loads(out.stdout)
    assert [i["digest"] for i in report["images"]] == [workload["calico-cni"], workload["coredns"]]
    assert report["blobs_present"] == 1  # the shared base layer: fetched for one image only
    refused = gapkit("copy", f"oci:{tmp_path / 'both'}:{registry.host}/calico/cni:v3.25.0",
                     f"oci:{tmp_path / 'both'}:{registry.host}/coredns/coredns:1.10.1",
                     f"oci:{tmp_path / 'x'}:one/name:1", check=False)
    assert refused.returncode == 2 and "several sources" in refused.stderr


def test_a_damaged_blob_pushed_to_a_registry_is_refused_by_it_and_kept_nowhere(
        registry: Registry, tmp_path: Path) -> None:
    """Into a registry gapkit does not hash twice: the registry checks each upload's digest
    (see `Store.verifies_digests`). Wrong bytes must still fail, naming the blob."""
    layer = make_layer(40, 3_000_000)
    write_layout(tmp_path / "w", [ImageSpec("app", [layer])])
    blob = tmp_path / "w" / "blobs" / "sha256" / layer.blob.digest.split(":", 1)[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    out = gapkit("copy", "--plain-http", registry.host, f"oci:{tmp_path / 'w'}:app",
                 f"docker://{registry.host}/team/app:1", check=False)
    assert out.returncode == 1, out.stderr
    assert layer.blob.digest in out.stderr and "Traceback" not in out.stderr
    status, _, _ = registry.request(f"/v2/team/app/blobs/{layer.blob.digest}", method="HEAD")
    assert status == 404
    status, _, _ = registry.request("/v2/team/app/manifests/1", method="HEAD")
    assert status == 404
