"""`gapkit copy`, `bundle create` and `registry push` through a faulty network.

A `FaultProxy` sits between the `gapkit` process and a real docker-registry and resets, stalls,
trickles, truncates or answers 429/500/503 (with and without `Retry-After`). With the fault
fired fewer times than `--retries`, every command completes and skopeo (which checks every blob
it reads) finds the image byte for byte; downloads resume with `Range`, so a broken blob is not
fetched twice. With the fault repeated past `--retries`, the command exits 1 with a message that
names the registry or image, no traceback, and leaves no archive, bundle, tag or temp file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.support.cli import gapkit
from tests.support.faults import Fault, FaultProxy
from tests.support.mounts import Mounts
from tests.support.peers import Registry, free_port
from tests.support.reliability import (
    REPOSITORY,
    TAG,
    Source,
    assert_no_traceback,
    dot_files,
    one_image_bundle,
    skopeo_reads,
)

RETRIES = "2"
TIMEOUT = "1"
#: Faults repeated this many times outlast `--retries 2`.
FOREVER = 50


@dataclass(frozen=True)
class Case:
    """A fault on the big layer's download (the small one's for `trickle`, or a manifest's)."""

    fault: Fault
    #: The retry resumes with Range: what gapkit had taken in is not fetched again.
    resumes: bool = False


def download_cases(big: str, small: str) -> dict[str, Case]:
    retry_after = {"Retry-After": "1"}
    return {
        "reset": Case(Fault("reset", path=big, after=700_000), resumes=True),
        "stall": Case(Fault("stall", path=big, after=500_000, seconds=4), resumes=True),
        "trickle": Case(Fault("trickle", path=small, piece=16_384, seconds=0.15,
                              times=FOREVER)),
        "truncate": Case(Fault("truncate", path=big, after=900_000), resumes=True),
        "429-retry-after": Case(Fault("status", path=big, status=429, headers=retry_after,
                                      times=2)),
        "429": Case(Fault("status", path=big, status=429)),
        "500": Case(Fault("status", path=big, status=500)),
        "503-retry-after": Case(Fault("status", path=big, status=503, headers=retry_after,
                                      times=2)),
        "503": Case(Fault("status", path=big, status=503)),
        # A manifest's body breaks after its headers, beyond the request's own retries.
        "reset-manifest": Case(Fault("reset", path="/manifests/", after=100)),
        "truncate-manifest": Case(Fault("truncate", path="/manifests/", after=100)),
    }


CASES = list(download_cases("", ""))
#: Past the retries, one fault of each family is enough (each costs all its retries' time).
EXHAUSTING = ["reset", "stall", "truncate", "429-retry-after", "503", "truncate-manifest"]
KINDS = ("oci", "oci-archive")
#: Each fault once into a layout or an archive, the other one when it outlasts the retries.
COPY_CASES = [(name, KINDS[i % 2]) for i, name in enumerate(CASES)]
COPY_FAILURES = [(name, KINDS[(i + 1) % 2]) for i, name in enumerate(EXHAUSTING)]


def expected_fires(fault: Fault) -> int:
    """Every fault fires as often as asked, but a trickle (asked for every try) only once: a
    slow transfer that keeps moving must not time out and be tried again."""
    return 1 if fault.kind == "trickle" else fault.times


def blob_path(digest: str) -> str:
    return f"/v2/{REPOSITORY}/blobs/{digest}"


def arm(proxy: FaultProxy, source: Source, name: str, forever: bool = False) -> Fault:
    """Add the named fault for `source`'s layers; `forever`: past every retry, from byte 0."""
    case = download_cases(re.escape(blob_path(source.big.blob.digest)) + "$",
                          re.escape(blob_path(source.small.blob.digest)) + "$")[name]
    fault = case.fault
    if forever:
        fault = replace(fault, times=FOREVER, after=0)
    return proxy.add(fault)


def check_fired(proxy: FaultProxy, source: Source, name: str, fault: Fault) -> None:
    """The fault really happened, and a resumable one was resumed, not fetched again whole."""
    assert fault.fired == expected_fires(fault), f"{name} fired {fault.fired} times"
    case = download_cases("", "")[name]
    if case.resumes:
        big = blob_path(source.big.blob.digest)
        ranges = [r.headers["Range"] for r in proxy.seen("GET", re.escape(big) + "$")
                  if "Range" in r.headers]
        assert len(ranges) <= 1, ranges
        start = int(ranges[0].removeprefix("bytes=").removesuffix("-")) if ranges else 0
        # The retry asks (with Range) only for what gapkit had not taken in: a reset discards
        # what the kernel held, and aiohttp drops what it buffered once a connection breaks.
        assert start <= fault.after
        assert proxy.downloaded[big] == fault.after + len(source.big.blob.data) - start


# --- gapkit copy ---------------------------------------------------------------------------------


def copy_through(proxy: FaultProxy, destination: str, *,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    return gapkit("copy", "--retries", RETRIES, "--timeout", TIMEOUT, "--plain-http", proxy.host,
                  f"docker://{proxy.host}/{REPOSITORY}:{TAG}", destination, "--json",
                  check=check, timeout=120)


@pytest.mark.parametrize(("name", "kind"), COPY_CASES)
def test_copy_completes_through_a_fault_byte_for_byte(
        name: str, kind: str, source: Source, proxy: FaultProxy, tmp_path: Path) -> None:
    fault = arm(proxy, source, name)
    target = tmp_path / "out" / ("layout" if kind == "oci" else "images.tar")
    target.parent.mkdir()
    copy_through(proxy, f"{kind}:{target}")
    check_fired(proxy, source, name, fault)
    ref = f"{proxy.host}/{REPOSITORY}:{TAG}"
    assert skopeo_reads(f"{kind}:{target}:{ref}", tmp_path / "read") == source.digest
    assert dot_files(target.parent) == []


@pytest.mark.parametrize(("name", "kind"), COPY_FAILURES)
def test_copy_fails_cleanly_once_retries_are_spent(
        name: str, kind: str, source: Source, proxy: FaultProxy, tmp_path: Path) -> None:
    fault = arm(proxy, source, name, forever=True)
    target = tmp_path / "out" / ("layout" if kind == "oci" else "images.tar")
    target.parent.mkdir()
    out = copy_through(proxy, f"{kind}:{target}", check=False)
    assert out.returncode == 1, out.stderr
    assert_no_traceback(out.stderr)
    named = f"{REPOSITORY}:{TAG}" if "manifest" in name else source.big.blob.digest
    assert proxy.host in out.stderr and named in out.stderr, out.stderr
    assert fault.fired == int(RETRIES) + 1, f"{fault.fired} tries, not 1 + {RETRIES} retries"
    assert dot_files(target.parent) == []
    if kind == "oci-archive":
        assert list(target.parent.iterdir()) == []
    else:
        index = json.loads((target / "index.json").read_text()) if (
            target / "index.json").exists() else {"manifests": []}
        assert index["manifests"] == []
        assert not (target / "blobs" / "sha256" / source.big.blob.digest.split(":")[1]).exists()


@pytest.mark.parametrize(("kind", "says"), [
    ("oci", "cannot write the layout {target}: No space left on device"),
    ("oci-archive", "cannot write {target}: No space left on device"),
    ("docker-archive", "cannot write {target}: No space left on device"),
])
def test_copy_onto_a_full_disk_names_the_destination_and_leaves_no_temp_file(
        kind: str, says: str, source: Source, proxy: FaultProxy, tmp_path: Path) -> None:
    """A 1 MiB tmpfs, an image of 2.2 MB: exit 1 with a message naming the destination (it
    was an internal error for a layout), no traceback, no temp file left on the full disk."""
    with Mounts() as mounts:
        full = mounts.tmpfs(tmp_path / "small", 1024 * 1024)
        target = full / ("layout" if kind == "oci" else "images.tar")
        out = copy_through(proxy, f"{kind}:{target}", check=False)
        assert out.returncode == 1, out.stderr
        assert_no_traceback(out.stderr)
        assert f"error: {says.format(target=target)}" in out.stderr
        assert dot_files(full) == []  # temp files and partial blobs start with "."


# --- gapkit bundle create ------------------------------------------------------------------------

BUNDLE_IMAGE = f"docker.io/{REPOSITORY}:{TAG}"
#: Bundles go through the proxy as a docker.io mirror, as an operator's pull-through cache.
BUNDLE_CASES = ["reset", "stall", "trickle", "503-retry-after"]
BUNDLE_FAILURES = ["429"]


def bundle_through(proxy: FaultProxy, output: Path, cache: Path, *,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
    return gapkit("bundle", "create", "--no-snaps", f"--image={BUNDLE_IMAGE}",
                  "--platform=linux/amd64", f"--mirror=docker.io=http://{proxy.host}",
                  "--retries", RETRIES, "--timeout", TIMEOUT, "--cache", str(cache),
                  "-o", str(output), "--json", check=check, timeout=120)


@pytest.mark.parametrize("name", BUNDLE_CASES)
def test_bundle_create_completes_through_a_fault_and_verifies(
        name: str, source: Source, proxy: FaultProxy, tmp_path: Path) -> None:
    fault = arm(proxy, source, name)
    output = tmp_path / "out" / "bundle.tar"
    report = json.loads(bundle_through(proxy, output, tmp_path / "cache").stdout)
    check_fired(proxy, source, name, fault)
    assert report["manifest"]["images"][0]["digest"] == source.digest
    gapkit("bundle", "verify", str(output))
    assert skopeo_reads(f"oci-archive:{output}:{BUNDLE_IMAGE}", tmp_path / "read") == source.digest
    assert dot_files(output.parent) == [] and dot_files(tmp_path / "cache") == []


@pytest.mark.parametrize("name", BUNDLE_FAILURES)
def test_bundle_create_fails_cleanly_once_retries_are_spent(
        name: str, source: Source, proxy: FaultProxy, tmp_path: Path) -> None:
    fault = arm(proxy, source, name, forever=True)
    output = tmp_path / "out" / "bundle.tar"
    out = bundle_through(proxy, output, tmp_path / "cache", check=False)
    assert out.returncode == 1, out.stderr
    assert_no_traceback(out.stderr)
    # The mirror gave up, then docker.io itself was out of reach (the tests have no internet).
    assert proxy.host in out.stderr and f"{REPOSITORY}" in out.stderr, out.stderr
    assert fault.fired == int(RETRIES) + 1
    assert list((tmp_path / "out").iterdir()) == []
    assert dot_files(tmp_path / "cache") == []
    # what was fetched stays in the cache for the next run, which the message says
    kept = list((tmp_path / "cache" / "partial").iterdir())
    assert len(kept) == 1 and f"is kept in {kept[0]}: run the same command again" in out.stderr


def test_bundle_create_on_a_full_disk_names_the_file_and_a_rerun_with_room_completes(
        source: Source, proxy: FaultProxy, tmp_path: Path) -> None:
    """The cache on a 1 MiB tmpfs, the image 2.2 MB: a clear error naming the bundle and where
    it is written, exit 1, no traceback, nothing next to the output; with room, it builds."""
    output = tmp_path / "out" / "bundle.tar"
    with Mounts() as mounts:
        full = mounts.tmpfs(tmp_path / "small", 1024 * 1024)
        out = bundle_through(proxy, output, full / "cache", check=False)
        assert out.returncode == 1, out.stderr
        assert_no_traceback(out.stderr)
        assert f"error: cannot write {output}: No space left on device (it is written as " \
            f"{full / 'cache' / 'partial'}" in out.stderr
        assert list((tmp_path / "out").iterdir()) == []
    report = json.loads(bundle_through(proxy, output, tmp_path / "cache").stdout)
    assert report["manifest"]["images"][0]["digest"] == source.digest
    gapkit("bundle", "verify", str(output))


def test_serve_with_its_state_folder_on_a_full_disk_names_the_file(
        source: Source, tmp_path: Path) -> None:
    """`--tls auto` writes its CA into --state: on a full disk, exit 2 naming the file."""
    with Mounts() as mounts:
        full = mounts.tmpfs(tmp_path / "small", 4096)
        (full / "fill").write_bytes(b"\0" * 4096)
        out = gapkit("registry", "serve", str(source.layout), "--listen", f"127.0.0.1:{free_port()}",
                     "--state", str(full / "state"), check=False, timeout=60)
        assert out.returncode == 2, out.stderr
        assert_no_traceback(out.stderr)
        assert f"error: cannot write {full / 'state'}/ca.key: No space left on device" \
            in out.stderr
        assert dot_files(full) == []


def test_a_full_disk_no_store_named_is_still_an_error_not_a_bug(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's last line: an ENOSPC, EDQUOT or EROFS from anywhere exits 1 with the file,
    not 70 'internal error' (the stores name their own; this is for a write they do not own)."""
    from gapkit import cli

    def full(**_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/var/x")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as exited:
        cli._main(["version"])
    assert exited.value.code == 1
    assert "cannot write /var/x: No space left on device" in capsys.readouterr().err


# --- gapkit registry push ------------------------------------------------------------------------

UPLOADS = "/blobs/uploads/"


def push_cases() -> dict[str, Fault]:
    retry_after = {"Retry-After": "1"}
    return {
        "reset-streamed": Fault("reset", method="PATCH", path=UPLOADS, after=700_000),
        "reset-monolithic": Fault("reset", method="PUT", path=UPLOADS, after=100_000),
        "stall-streamed": Fault("stall", method="PATCH", path=UPLOADS, after=500_000, seconds=4),
        "trickle-streamed": Fault("trickle", method="PATCH", path=UPLOADS, piece=65_536,
                                  seconds=0.1, times=FOREVER),
        "trickle-monolithic": Fault("trickle", method="PUT", path=UPLOADS, after=100_000,
                                    piece=16_384, seconds=0.1, times=FOREVER),
        "truncate-streamed": Fault("truncate", method="PATCH", path=UPLOADS, after=900_000),
        "503-streamed": Fault("status", method="PATCH", path=UPLOADS, status=503, times=2),
        "429-retry-after-start": Fault("status", method="POST", path=UPLOADS + "$", status=429,
                                       headers=retry_after, times=2),
        "503-retry-after-monolithic": Fault("status", method="PUT", path=UPLOADS, status=503,
                                            headers=retry_after, times=2),
        "500-manifest": Fault("status", method="PUT", path="/manifests/", status=500, times=2),
    }


PUSH_FAILURES = ["reset-streamed", "reset-monolithic", "500-manifest"]


@pytest.fixture(scope="module")
def bundle(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_image_bundle(source, BUNDLE_IMAGE, tmp_path_factory.mktemp("reliability-bundle"))


def push_through(proxy: FaultProxy, bundle: Path, *,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    return gapkit("registry", "push", str(bundle), "--to", proxy.host, "--plain-http",
                  "--retries", RETRIES, "--timeout", TIMEOUT, "--json", check=check, timeout=120)


@pytest.mark.parametrize("name", list(push_cases()))
def test_registry_push_completes_through_a_fault(
        name: str, source: Source, bundle: Path, registry: Registry,
        proxy_for: Callable[[Registry], FaultProxy], tmp_path: Path) -> None:
    proxy = proxy_for(registry)
    fault = proxy.add(push_cases()[name])
    report = json.loads(push_through(proxy, bundle).stdout)
    assert fault.fired == expected_fires(fault), f"{name} fired {fault.fired} times"
    assert report["images"][0]["digest"] == source.digest
    pushed = f"docker://{registry.host}/{REPOSITORY}:{TAG}"
    assert skopeo_reads(pushed, tmp_path / "read", "--src-tls-verify=false") == source.digest


@pytest.mark.parametrize("name", PUSH_FAILURES)
def test_registry_push_fails_cleanly_once_retries_are_spent(
        name: str, bundle: Path, registry: Registry,
        proxy_for: Callable[[Registry], FaultProxy]) -> None:
    proxy = proxy_for(registry)
    fault = proxy.add(replace(push_cases()[name], times=FOREVER))
    out = push_through(proxy, bundle, check=False)
    assert out.returncode == 1, out.stderr
    assert_no_traceback(out.stderr)
    assert proxy.host in out.stderr and REPOSITORY in out.stderr, out.stderr
    # aiohttp itself sends an idempotent request (PUT) once more when a reused connection
    # breaks before the answer (RFC 9112 9.3.1), so each of gapkit's tries may count twice.
    tries = int(RETRIES) + 1
    assert tries <= fault.fired <= 2 * tries, f"{fault.fired} tries, not 1 + {RETRIES} retries"
    status, _, _ = registry.request(f"/v2/{REPOSITORY}/manifests/{TAG}", method="HEAD")
    assert status == 404


# --- a token server's answer breaks --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_a_broken_token_answer_is_asked_for_again(kind: str, source: Source,
                                                        tmp_path: Path) -> None:
    """The registry's token realm is a `FaultProxy` in front of a real token server: the
    token's body breaks after its headers, once."""
    from gapkit.oci.reference import Reference
    from gapkit.oci.stores.registry import HostOptions, ProxyConfig, RegistryStore
    from tests.support.tokens import TokenRegistry, TokenServer

    server = await TokenServer(tmp_path / "tokens", {"gapkit": "s3cret"},
                               anonymous_pull=True).start()
    proxy = await FaultProxy(f"http://127.0.0.1:{server.port}").start()
    realm = TokenServer(tmp_path / "realm", {})
    realm.port, realm.cert_file = proxy.port, server.cert_file
    registry = TokenRegistry(tmp_path / "registry", users={"gapkit": "s3cret"},
                             token_server=realm)
    try:
        await asyncio.to_thread(registry.start)
        await asyncio.to_thread(registry.push_layout, source.layout, "app", f"{REPOSITORY}:{TAG}")
        fault = proxy.add(Fault(kind, path="^/token$", after=20))
        store = RegistryStore(hosts={registry.host: HostOptions(plain_http=True)}, retries=2,
                              timeout=2, backoff=0.05, proxies=ProxyConfig())
        try:
            ref = Reference.parse(f"{registry.host}/{REPOSITORY}:{TAG}")
            assert str((await store.get_manifest(ref)).digest) == source.digest
        finally:
            await store.close()
        assert fault.fired == 1
    finally:
        registry.stop()
        await proxy.stop()
        await server.stop()


def test_a_server_that_accepts_and_never_answers_times_out_with_a_clear_error(
        tmp_path: Path) -> None:
    """A stand-in for a broken registry host: it accepts connections and never sends a byte."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(64)
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    try:  # gapkit() fails the test if the command hangs past its timeout
        out = gapkit("copy", "--plain-http", host, "--retries", "1", "--timeout", TIMEOUT,
                     f"docker://{host}/{REPOSITORY}:{TAG}", f"oci:{tmp_path / 'layout'}",
                     check=False, timeout=60)
    finally:
        listener.close()
    assert out.returncode == 1, out.stderr
    assert_no_traceback(out.stderr)
    assert host in out.stderr and "did not answer" in out.stderr, out.stderr
    assert dot_files(tmp_path) == []
