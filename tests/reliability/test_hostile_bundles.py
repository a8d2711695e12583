"""Hostile bundles: tar bombs, blobs under the wrong name, index cycles, depth and fan-out
bombs, oversized JSON, path tricks.

Each is made from a real bundle (built by `gapkit bundle create` from a stand-in registry) and
given to `bundle verify`, `bundle inspect`, `images export`, `copy oci-archive:BUNDLE
oci-archive:OUT` and `registry serve` (until it listens), each a real process. Every one must
answer quickly, within a bounded peak RSS (gapkit's own: `/usr/bin/time`, or VmHWM for a
server still running), without a traceback, refusing what is bad with a message that names the
culprit, and writing nothing outside its target. What skopeo and ctr do with the same inputs is
in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gapkit.bundle.model import MAX_BUNDLE_JSON_SIZE
from gapkit.oci.stores.archive import MAX_MEMBERS
from tests.support.hostile import (
    MB,
    OCI_MANIFEST,
    Bundle,
    Hostile,
    base256,
    blob_name,
    descriptor,
    header,
    index_doc,
    many_headers,
    member,
    raw_header,
    sha3_b64,
    sha256,
    sparse_member,
    write_tar,
    zeros_digest,
)
from tests.support.peers import free_port
from tests.support.upstreams import Upstreams

APP = "docker.io/team/app:1"
PAUSE = "docker.io/team/pause:1"
#: Peak RSS any command may reach on these inputs; gapkit itself starts at about 50 MB.
MAX_RSS_MB = 150
#: Wall time any command may take (generous: the machine is shared).
MAX_SECONDS = 20
BIG = 100 * MB
FAN_OUT = 2000
MANY_NAMES = 6_000
#: Names kept in memory would pass MAX_RSS_MB.
LONG_NAMES = 120


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def base(folder: Path) -> Iterator[Bundle]:
    upstreams = Upstreams(folder / "upstreams")
    try:
        upstreams.push([APP, PAUSE])
        path = upstreams.build_bundle(folder / "base.tar", [APP, PAUSE])
        yield Bundle.read(path)
    finally:
        upstreams.stop()


# --------------------------------------------------------------------------------------------
# The hostile inputs


def _layer(b: Bundle) -> str:
    _, manifest = b.image_manifest(APP)
    return str(manifest["layers"][-1]["digest"])  # type: ignore[index]


def _fixed_point(make: Callable[[int], bytes]) -> bytes:
    """`make(n)` where n is the length of the result (a descriptor of itself)."""
    n = 0
    for _ in range(5):
        data = make(n)
        if len(data) == n:
            return data
        n = len(data)
    raise AssertionError("no fixed point")


def size_8_eb(b: Bundle, path: Path) -> Hostile:
    b.extra = [raw_header("gapkit/bomb", base256(8 * 10**18))]
    return Hostile(b.write(path), ("gapkit/bomb",), at_open=True)


def size_beyond_file(b: Bundle, path: Path) -> Hostile:
    bomb = raw_header("gapkit/bigger-than-file", b"%011o\0" % (8 * 1024**3 - 1))
    return Hostile(b.write(path, before=[bomb]), ("gapkit/bigger-than-file",), at_open=True)


def pax_header_8_eb(b: Bundle, path: Path) -> Hostile:
    b.extra = [raw_header("././@PaxHeader", base256(8 * 10**18), kind=tarfile.XHDTYPE)]
    return Hostile(b.write(path), ("extended header",), at_open=True)


def negative_pax_size(b: Bundle, path: Path) -> Hostile:
    """A pax `size` of -1536 sends tarfile back to the same header, for ever."""
    info = tarfile.TarInfo("gapkit/loop")
    info.pax_headers = {"size": "-1536"}
    b.extra = [info.tobuf(tarfile.PAX_FORMAT)]
    return Hostile(b.write(path), ("gapkit/loop", "-1536"), at_open=True)


def too_many_members(b: Bundle, path: Path) -> Hostile:
    headers = many_headers("gapkit/m/", MAX_MEMBERS + 1)
    return Hostile(b.write(path, before=[headers]), (f"more than {MAX_MEMBERS} members",),
                   at_open=True)


def members_with_1_mb_names(b: Bundle, path: Path) -> Hostile:
    stem = "gapkit/" + "n" * (MB - 100)
    b.extra = [member(f"{stem}{i}", b"") for i in range(LONG_NAMES)]
    return Hostile(b.write(path), ("gapkit/nnnn",), at_open=True)


def blob_with_other_content(b: Bundle, path: Path) -> Hostile:
    layer = _layer(b)
    name = blob_name(layer)
    b.members[name] = random.Random(1).randbytes(len(b.members[name]))
    return Hostile(b.write(path), (layer,))


def manifest_blob_under_other_digest(b: Bundle, path: Path) -> Hostile:
    layer = _layer(b)
    data = b.members.pop(blob_name(layer))
    b.members[blob_name(sha256(b"a different blob"))] = data
    return Hostile(b.write(path), (layer,))


def index_lists_itself(b: Bundle, path: Path) -> Hostile:
    claimed = sha256(b"the index that lists itself")
    data = _fixed_point(lambda n: index_doc([descriptor(claimed, n)]))
    b.add_blob(data, name=claimed)
    b.rename_image(APP, claimed, len(data))
    return Hostile(b.write(path), (claimed,), bad_manifest=True)


def two_indexes_list_each_other(b: Bundle, path: Path) -> Hostile:
    claimed_b = sha256(b"index B, stored under a name that is not its digest")

    def pair(size_b: int) -> bytes:
        a = index_doc([descriptor(claimed_b, size_b)])
        return index_doc([descriptor(sha256(a), len(a))])

    data_b = _fixed_point(pair)
    data_a = index_doc([descriptor(claimed_b, len(data_b))])
    b.add_blob(data_b, name=claimed_b)
    digest_a = b.add_blob(data_a)
    b.rename_image(APP, digest_a, len(data_a))
    return Hostile(b.write(path), (claimed_b,), bad_manifest=True)


def indexes_1000_deep(b: Bundle, path: Path) -> Hostile:
    digest, _ = b.image_manifest(APP)
    size = len(b.members[blob_name(digest)])
    child = descriptor(digest, size, OCI_MANIFEST,
                       platform={"os": "linux", "architecture": "amd64"})
    for _ in range(1000):
        data = index_doc([child])
        child = descriptor(b.add_blob(data), len(data))
    b.rename_image(APP, str(child["digest"]), int(str(child["size"])))
    return Hostile(b.write(path), ("team/app", "deep"), bad_manifest=True)


def _fan_out(b: Bundle, levels: int) -> dict[str, object]:
    """`levels` indexes, each listing the next FAN_OUT times, over APP's image manifest."""
    digest, _ = b.image_manifest(APP)
    child = descriptor(digest, len(b.members[blob_name(digest)]), OCI_MANIFEST,
                       platform={"os": "linux", "architecture": "amd64"})
    for _ in range(levels):
        data = index_doc([child] * FAN_OUT)
        child = descriptor(b.add_blob(data), len(data))
    return child


def index_fan_out(b: Bundle, path: Path) -> Hostile:
    top = _fan_out(b, 3)
    b.rename_image(APP, str(top["digest"]), int(str(top["size"])))
    return Hostile(b.write(path), (), images_bad=False)


def nameless_index_fan_out(b: Bundle, path: Path) -> Hostile:
    top = _fan_out(b, 5)
    index = b.index
    index["manifests"].append(top)  # type: ignore[attr-defined]
    b.members["index.json"] = json.dumps(index).encode()
    return Hostile(b.write(path), (), images_bad=False)


def one_index_named_6000_times(b: Bundle, path: Path) -> Hostile:
    top = _fan_out(b, 1)
    index = b.index
    record = b.bundle_json
    template = next(i for i in record["images"] if i["reference"] == APP)  # type: ignore[attr-defined]
    for i in range(MANY_NAMES):
        name = f"docker.io/team/app:many-{i}"
        index["manifests"].append(dict(top, annotations={  # type: ignore[attr-defined]
            "io.containerd.image.name": name, "org.opencontainers.image.ref.name": name}))
        record["images"].append(dict(template, reference=name, digest=top["digest"]))  # type: ignore[attr-defined]
    b.members["index.json"] = json.dumps(index).encode()
    b.members["gapkit/bundle.json"] = json.dumps(record).encode()
    return Hostile(b.write(path), (), images_bad=False)


def index_json_nested_100000_deep(b: Bundle, path: Path) -> Hostile:
    b.members["index.json"] = b'{"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return Hostile(b.write(path), ("index.json", "deep"), at_open=True)


def manifest_nested_100000_deep(b: Bundle, path: Path) -> Hostile:
    data = b'{"layers":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    digest = b.add_blob(data)
    b.rename_image(APP, digest, len(data), OCI_MANIFEST)
    return Hostile(b.write(path), (digest.split(":")[1], "deep"), bad_manifest=True)


def index_json_100_mb(b: Bundle, path: Path) -> Hostile:
    return Hostile(b.write(path, replace={"index.json": sparse_member("index.json", BIG)}),
                   ("index.json",), at_open=True)


def manifest_100_mb(b: Bundle, path: Path) -> Hostile:
    digest = zeros_digest(BIG)
    b.extra = sparse_member(blob_name(digest), BIG)
    b.rename_image(APP, digest, BIG, OCI_MANIFEST)
    return Hostile(b.write(path), (digest.split(":")[1],), bad_manifest=True)


def bundle_json_100_mb(b: Bundle, path: Path) -> Hostile:
    big = sparse_member("gapkit/bundle.json", BIG)
    return Hostile(b.write(path, replace={"gapkit/bundle.json": big}), ("bundle.json",),
                   bundle_only=True, images_bad=False)


def bundle_json_at_the_limit(b: Bundle, path: Path) -> Hostile:
    """bundle.json just under its limit, listing as many images as fit: each is rendered."""
    record = b.bundle_json
    image = dict(record["images"][0], sources=["s" * 100])  # type: ignore[index]
    size = len(json.dumps(dict(image, reference="docker.io/x/y000000:1"))) + 2
    record["images"] = [dict(image, reference=f"docker.io/x/y{i:06d}:1")
                        for i in range((MAX_BUNDLE_JSON_SIZE - 2000) // size)]
    b.members["gapkit/bundle.json"] = json.dumps(record).encode()
    assert len(b.members["gapkit/bundle.json"]) <= MAX_BUNDLE_JSON_SIZE
    return Hostile(b.write(path), ("in index.json",), images_bad=False)


def snap_assertion_100_mb(b: Bundle, path: Path) -> Hostile:
    snap = b"not a squashfs" * 1000
    record = b.bundle_json
    record["snaps"] = [{"name": "x", "file": "gapkit/snaps/x.snap",
                        "assertion": "gapkit/snaps/x.assert", "size": len(snap),
                        "sha256": hashlib.sha256(snap).hexdigest(), "sha3_384": sha3_b64(snap)}]
    b.members["gapkit/bundle.json"] = json.dumps(record).encode()
    b.members["gapkit/snaps/x.snap"] = snap
    b.extra = sparse_member("gapkit/snaps/x.assert", BIG)
    return Hostile(b.write(path), ("gapkit/snaps/x.assert",), images_bad=False)


def dot_dot_member(b: Bundle, path: Path) -> Hostile:
    b.extra = [member("../written-by-dot-dot", b"x")]
    return Hostile(b.write(path), ("../written-by-dot-dot",), bundle_only=True, images_bad=False)


def absolute_member(b: Bundle, path: Path) -> Hostile:
    name = str(path.parent / "written-by-absolute-member")
    b.extra = [member(name, b"x")]
    return Hostile(b.write(path), (name,), bundle_only=True, images_bad=False)


def symlink_out(b: Bundle, path: Path) -> Hostile:
    b.extra = [header("gapkit/link", kind=tarfile.SYMTYPE, link="/etc/passwd")]
    return Hostile(b.write(path), ("gapkit/link",), bundle_only=True, images_bad=False)


def hardlink_out(b: Bundle, path: Path) -> Hostile:
    b.extra = [header("gapkit/hardlink", kind=tarfile.LNKTYPE, link="../../etc/passwd")]
    return Hostile(b.write(path), ("gapkit/hardlink",), bundle_only=True, images_bad=False)


def blob_is_symlink_out(b: Bundle, path: Path) -> Hostile:
    layer = _layer(b)
    link = [header(blob_name(layer), kind=tarfile.SYMTYPE, link="/etc/passwd")]
    return Hostile(b.write(path, replace={blob_name(layer): link}), (layer.split(":")[1],))


def index_json_is_symlink_out(b: Bundle, path: Path) -> Hostile:
    link = [header("index.json", kind=tarfile.SYMTYPE, link="../../../../../../etc/passwd")]
    return Hostile(b.write(path, replace={"index.json": link}), ("index.json",), at_open=True)


def duplicate_index_json(b: Bundle, path: Path) -> Hostile:
    index = b.index
    for entry in index["manifests"]:  # type: ignore[attr-defined]
        entry["annotations"] = {k: v.replace("team/app", "team/evil")
                                for k, v in entry["annotations"].items()}
    b.extra = [member("index.json", json.dumps(index).encode())]
    return Hostile(b.write(path), ("index.json",), bundle_only=True, images_bad=False)


HOSTILE: dict[str, Callable[[Bundle, Path], Hostile]] = {
    "member of 8 EB (base-256 size)": size_8_eb,
    "member larger than the file": size_beyond_file,
    "pax header of 8 EB": pax_header_8_eb,
    "member with a negative pax size": negative_pax_size,
    "one member more than MAX_MEMBERS": too_many_members,
    "members with names of 1 MiB": members_with_1_mb_names,
    "blob whose content has another digest": blob_with_other_content,
    "manifest's blob stored under another digest": manifest_blob_under_other_digest,
    "index that lists itself": index_lists_itself,
    "two indexes listing each other": two_indexes_list_each_other,
    "indexes nested 1000 deep": indexes_1000_deep,
    "index fan-out 2000^3": index_fan_out,
    "nameless index fan-out 2000^5 in index.json": nameless_index_fan_out,
    "one 2000-entry index named 6000 times": one_index_named_6000_times,
    "index.json nested 100000 deep": index_json_nested_100000_deep,
    "manifest nested 100000 deep": manifest_nested_100000_deep,
    "index.json of 100 MB": index_json_100_mb,
    "manifest of 100 MB": manifest_100_mb,
    "bundle.json of 100 MB": bundle_json_100_mb,
    "bundle.json at its limit, 12 000 images": bundle_json_at_the_limit,
    "snap assertion of 100 MB": snap_assertion_100_mb,
    "member ../x": dot_dot_member,
    "absolute member": absolute_member,
    "symlink to /etc/passwd": symlink_out,
    "hardlink to ../../etc/passwd": hardlink_out,
    "blob that is a symlink to /etc/passwd": blob_is_symlink_out,
    "index.json that is a symlink out": index_json_is_symlink_out,
    "index.json twice": duplicate_index_json,
}


@pytest.fixture(scope="module")
def hostile(base: Bundle, folder: Path) -> Callable[[str], Hostile]:
    made: dict[str, Hostile] = {}

    def get(kind: str) -> Hostile:
        if kind not in made:
            target = folder / "inputs" / kind.replace(" ", "-").replace("/", "_")
            target.mkdir(parents=True)
            made[kind] = HOSTILE[kind](base.copy(), target / "bundle.tar")
        return made[kind]

    return get


# --------------------------------------------------------------------------------------------
# Running gapkit as a user does, measuring its peak RSS


@dataclass
class Run:
    args: list[str]
    #: None: it was still running (serving) when stopped.
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float

    def __str__(self) -> str:
        return (f"gapkit {' '.join(self.args)} -> {self.returncode} in {self.seconds:.1f}s, "
                f"{self.peak_rss_mb:.0f} MB\nstdout: {self.stdout[-2000:]}\n"
                f"stderr: {self.stderr[-2000:]}")


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


REPO = Path(__file__).resolve().parents[2]


def run_gapkit(args: list[str], cwd: Path, listen_port: int | None = None) -> Run:
    """Run gapkit to its end (or, with `listen_port`, until it listens there, then stop it).

    It runs under `/usr/bin/time`, which reports gapkit's own peak RSS: a child forked from
    pytest would count pytest's pages in its ru_maxrss.
    """
    out, err, rss = cwd.parent / "stdout", cwd.parent / "stderr", cwd.parent / "rss"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            ["/usr/bin/time", "-o", str(rss), "-f", "%M", sys.executable, "-m", "gapkit", *args],
            cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    returncode: int | None = None
    peak = 0.0
    try:
        while True:
            returncode = process.poll()
            if returncode is not None:
                peak = int(rss.read_text().split()[-1]) / 1024
                break
            if (listen_port is not None and _listening(listen_port)
                    and b"listening on" in out.read_bytes()):
                children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
                peak = _peak_rss_mb(int(children.split()[0]))
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(MAX_SECONDS)
                returncode = None
                break
            if time.monotonic() - started > MAX_SECONDS:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"gapkit {' '.join(args)} still runs after "
                                     f"{MAX_SECONDS}s:\n{err.read_text()[-2000:]}")
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.monotonic() - started
    rss.unlink(missing_ok=True)
    return Run(args, returncode, out.read_text(errors="replace"),
               err.read_text(errors="replace"), seconds, peak)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


COMMANDS = ["verify", "inspect", "export", "copy", "serve"]


def _command(name: str, bundle: Path, out: Path) -> tuple[list[str], int | None]:
    if name == "verify":
        return ["bundle", "verify", str(bundle)], None
    if name == "inspect":
        return ["bundle", "inspect", str(bundle)], None
    if name == "export":
        return ["images", "export", str(bundle), "-o", str(out / "images.tar")], None
    if name == "copy":
        return ["copy", f"oci-archive:{bundle}", f"oci-archive:{out / 'copy.tar'}"], None
    port = free_port()
    return ["registry", "serve", str(bundle), "--tls", "off", "--listen", f"127.0.0.1:{port}",
            "--state", str(out / "state")], port


def _must_refuse(command: str, h: Hostile) -> bool:
    if h.at_open:
        return True
    if command == "verify":
        return bool(h.culprit)
    if command == "copy":
        return h.images_bad
    if command == "export":
        return h.bundle_only or h.images_bad
    return h.bundle_only  # inspect and serve read bundle.json and the structure, not blobs


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_bundle_is_refused_quickly_in_bounded_memory_writing_nothing_outside(
        hostile: Callable[[str], Hostile], kind: str, command: str, tmp_path: Path) -> None:
    h = hostile(kind)
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    out.mkdir()
    args, port = _command(command, h.path, out)
    run = run_gapkit(args, cwd, listen_port=port)

    assert run.seconds < MAX_SECONDS, run
    assert run.peak_rss_mb < MAX_RSS_MB, run
    assert "Traceback" not in run.stderr + run.stdout, run
    refused = run.returncode not in (0, None)
    if _must_refuse(command, h):
        assert refused, run
    if refused:
        assert run.stderr.startswith("error:") or command == "verify", run
    if refused or (command == "serve" and h.bad_manifest):
        for text in h.culprit:
            assert text in run.stderr, run
    if refused and command == "export":
        assert not _files(out), run
    # Nothing outside the target: the working folder stays empty, and so does every other place
    # a member name could point at.
    assert _files(tmp_path) - _files(out) == {tmp_path / "stdout", tmp_path / "stderr"}, run
    assert not (h.path.parent / "written-by-absolute-member").exists()
    if command == "export" and not refused:
        with tarfile.open(out / "images.tar") as tar:
            for info in tar.getmembers():
                assert info.isfile() or info.isdir(), info.name
                assert not info.name.startswith("/") and ".." not in info.name.split("/")


def test_serve_never_answers_with_a_blob_whose_bytes_have_another_digest(
        hostile: Callable[[str], Hostile], tmp_path: Path) -> None:
    h = hostile("blob whose content has another digest")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gapkit", "registry", "serve", str(h.path), "--tls", "off",
             "--listen", f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + MAX_SECONDS
        while not _listening(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/v2/team/app/blobs/{h.culprit[0]}")
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status != 200, response.status
        assert hashlib.sha256(body).hexdigest() != h.culprit[0].split(":")[1]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    assert h.culprit[0] in log.read_text()


@pytest.mark.parametrize("command", ["copy", "serve"])
def test_docker_save_tar_whose_manifest_json_nests_100000_deep_is_refused(
        command: str, tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "save.tar",
                    [member("manifest.json", b"[" * 100_000 + b"]" * 100_000)])
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    out.mkdir()
    if command == "copy":
        run = run_gapkit(["copy", f"docker-archive:{tar}", f"oci-archive:{out / 'x.tar'}"], cwd)
    else:
        port = free_port()
        run = run_gapkit(["registry", "serve", str(tar), "--tls", "off", "--listen",
                          f"127.0.0.1:{port}"], cwd, listen_port=port)
    assert run.returncode not in (0, None), run
    assert run.stderr.startswith("error:") and "internal error" not in run.stderr, run
    assert "manifest.json" in run.stderr and "deep" in run.stderr, run
    assert not _files(out), run
