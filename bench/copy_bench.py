"""`python -m bench copy`: gapkit copy against skopeo copy, per shared/BENCHMARKS.md.

One invocation generates the workload (bench/workload.py), starts its own `docker-registry`
peers on free loopback ports in a temp folder, pushes the workload with skopeo, then runs each
scenario for several rounds, peer and gapkit alternating (the order rotates every round), and
reports medians, the ratio gapkit/skopeo, MB/s, CPU seconds and peak RSS of each tool. Every
gapkit result is checked: the destination names each image by its source digest and holds every
blob. Everything started is stopped and the temp folder removed at the end, also on failure.

Scenarios (`--only` picks some):

- `pull`: registry -> one OCI layout. skopeo: 12 `skopeo copy --all` then `sync` (gapkit fsyncs
  every blob, so durable is compared with durable). gapkit: 12 `gapkit copy --all-platforms`
  (one per image, as a user would, since a registry source takes one image per invocation),
  and one process copying all 12 through the library (`bench/multi_copy.py`).
- `push`: OCI layout -> a fresh, empty registry per run, one image per invocation for both, and
  gapkit's one-process form.
- `layout`: OCI layout -> OCI layout, all 12: 12 skopeo runs + sync against ONE
  `gapkit copy --all-platforms oci:SRC oci:DST` (the CLI's many-images form).
- `startup`: 12 copies of the smallest image, for the cost of one run of each tool.
- `big`: one image with one `--big-layer-mb` layer, pulled and pushed: peak RSS stays flat.
- `sweep`: `--jobs` values for the pull (one process and 12 CLI runs) and the push (one process).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import pstats
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.workload import (
    MB,
    ImageInfo,
    MiB,
    Workload,
    build_workload,
    describe,
    index_digests,
    push_workload,
)
from tests.support.peers import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
#: BENCHMARKS.md's physical floors for 1 GB on the reference machine (seconds).
DOC_FLOORS_PER_GB = {"hash_2_threads": 0.35, "loopback_transfer": 1.4, "durable_write": 4.4}
#: BENCHMARKS.md's skopeo results on the reference machine (seconds, for ~1 GB).
DOC_SKOPEO = {"pull": 5.39, "push": 12.47}
TARGETS = {"pull": 0.6, "push": 0.5, "rss_mb": 100.0}
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


class BenchFailure(Exception):
    """A copy failed, or its result was wrong."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- running and measuring commands ---------------------------------------------------------------

@dataclass
class Sample:
    """One timed run of one contender."""

    seconds: float
    #: user + system CPU of the tool's own processes (not the registry's).
    cpu_s: float
    #: The largest peak RSS of any of the tool's processes.
    peak_rss_mb: float
    #: CPU the registry used meanwhile (when a registry takes part).
    server_cpu_s: float | None = None


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: GNU time reports the peak RSS of the process it forks itself. `wait4()` from here would not
#: do: subprocess starts children with vfork, and Linux then counts the benchmark's own RSS at
#: the moment of exec into the child's ru_maxrss (a ~55 MB floor under every number).
TIME = shutil.which("time", path="/usr/bin:/bin")


def rss_method() -> str:
    if TIME:
        return "GNU time (/usr/bin/time -f %M) around each process"
    return ("wait4() (no /usr/bin/time: every RSS is at least the benchmark's own RSS; "
            "apt-get install time)")


def run_commands(commands: list[list[str]], log_file: Path, *, sync: bool = False,
                 server: Registry | None = None, cwd: Path | None = None) -> Sample:
    """Run `commands` one after another (then `sync(2)` when asked); time them as one.

    Peak RSS and CPU come from GNU time around each process (from `wait4` without it).
    """
    server_pid = server.process.pid if server is not None and server.process is not None else None
    server_before = _proc_cpu_s(server_pid) if server_pid else 0.0
    cpu = 0.0
    rss_kib = 0
    usage_file = log_file.with_suffix(".time")
    with open(log_file, "ab") as out:
        start = time.perf_counter()
        for command in commands:
            wrapped = ([TIME, "-f", "%U %S %M", "-o", str(usage_file), *command] if TIME
                       else command)
            proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd=cwd)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if TIME:
                user, system, peak = usage_file.read_text().split()[-3:]
                cpu += float(user) + float(system)
                rss_kib = max(rss_kib, int(peak))
            else:
                cpu += usage.ru_utime + usage.ru_stime
                rss_kib = max(rss_kib, usage.ru_maxrss)
            if proc.returncode != 0:
                out.flush()
                tail = log_file.read_bytes()[-3000:].decode(errors="replace")
                raise BenchFailure(f"exit {proc.returncode}: {shlex.join(command)}\n{tail}")
        if sync:
            os.sync()
        seconds = time.perf_counter() - start
    server_cpu = _proc_cpu_s(server_pid) - server_before if server_pid else None
    return Sample(seconds, cpu, rss_kib * 1024 / MB, server_cpu)


def gapkit_command() -> list[str]:
    """The installed `gapkit` script, called directly (a pyenv shim would add ~0.1 s a run)."""
    beside = Path(sys.executable).parent / "gapkit"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("gapkit")
    return [found] if found else [sys.executable, "-c", "from gapkit.cli import main; main()"]


# -- checking results -------------------------------------------------------------------------

def verify_layout(dest: Path, images: list[ImageInfo]) -> None:
    """Each image is named by its source digest, and every blob it needs is there, whole."""
    names = index_digests(dest)
    for image in images:
        if names.get(image.name) != image.digest:
            raise BenchFailure(f"{dest}: {image.name} is {names.get(image.name)}, "
                               f"the source has {image.digest}")
        for digest, size in image.blobs.items():
            path = dest / "blobs" / "sha256" / digest.split(":", 1)[1]
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise BenchFailure(f"{dest}: blob {digest} of {image.name} is missing") from None
            if actual != size:
                raise BenchFailure(f"{dest}: blob {digest} is {actual} bytes, not {size}")


def verify_registry(registry: Registry, images: list[ImageInfo]) -> None:
    """Each tag names the source digest; each manifest, config and layer is there."""
    for image in images:
        status, _, headers = registry.request(f"/v2/{image.repo}/manifests/{image.tag}", "HEAD",
                                              {"Accept": MANIFEST_ACCEPT})
        got = headers.get("Docker-Content-Digest")
        if status != 200 or got != image.digest:
            raise BenchFailure(f"registry: {image.repo_path} is {got} (HTTP {status}), "
                               f"the source has {image.digest}")
        for digest in image.manifests:
            status, _, _ = registry.request(f"/v2/{image.repo}/manifests/{digest}", "HEAD",
                                            {"Accept": MANIFEST_ACCEPT})
            if status != 200:
                raise BenchFailure(f"registry: manifest {digest} of {image.repo} is missing")
        for digest, size in image.layers_and_configs.items():
            status, _, headers = registry.request(f"/v2/{image.repo}/blobs/{digest}", "HEAD")
            if status != 200 or int(headers.get("Content-Length", -1)) != size:
                raise BenchFailure(f"registry: blob {digest} of {image.repo} is missing or "
                                   f"has the wrong size (HTTP {status})")


# -- scenarios --------------------------------------------------------------------------------

@dataclass
class Contender:
    key: str
    label: str
    #: Exactly what the timer covers.
    timed: str
    is_peer: bool
    run: Callable[[], Sample]
    samples: list[Sample] = field(default_factory=list)
    failure: str | None = None

    def median(self, attr: str = "seconds") -> float | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return statistics.median(values) if values else None

    def peak_rss_mb(self) -> float | None:
        return max((s.peak_rss_mb for s in self.samples), default=None)


@dataclass
class Scenario:
    key: str
    title: str
    nbytes: int
    contenders: list[Contender]
    target_ratio: float | None = None
    floor_s: float | None = None
    floor_what: str = ""
    rounds: int = 1

    @property
    def peer(self) -> Contender | None:
        return next((c for c in self.contenders if c.is_peer), None)


class Bench:
    """The temp folder, the workload, the source registry, and the contenders' commands."""

    def __init__(self, tmp: Path, workload: Workload, source_registry: Registry) -> None:
        self.tmp = tmp
        self.workload = workload
        self.source = source_registry
        self.gapkit = gapkit_command()
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self._runs = 0
        self._registries: list[Registry] = []

    def _log_file(self, key: str) -> Path:
        self._runs += 1
        return self.logs / f"{self._runs:03d}-{key}.log"

    # fresh destinations, made and removed outside the timer

    @contextmanager
    def fresh_layout(self) -> Iterator[Path]:
        dest = self.tmp / "dst-layout"
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()  # nothing of earlier runs left to write back while this one is timed
        try:
            yield dest
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    @contextmanager
    def fresh_registry(self) -> Iterator[Registry]:
        registry = Registry(self.tmp / f"dst-registry-{self._runs}")
        self._registries.append(registry)
        try:
            registry.start()
            os.sync()
            yield registry
        finally:
            registry.stop()
            shutil.rmtree(registry.folder, ignore_errors=True)
            self._registries.remove(registry)

    def stop_all(self) -> None:
        for registry in list(self._registries):
            registry.stop()

    # commands

    def skopeo_copy(self, source: str, destination: str, *, plain_src: bool = False,
                    plain_dest: bool = False) -> list[str]:
        command = ["skopeo", "copy", "--quiet", "--all"]
        if plain_src:
            command.append("--src-tls-verify=false")
        if plain_dest:
            command.append("--dest-tls-verify=false")
        return [*command, source, destination]

    def gapkit_copy(self, src: str, dst: str, plain_http: str | None,
                    jobs: int | None = None) -> list[str]:
        command = [*self.gapkit, "copy", "--json", "--all-platforms"]
        if plain_http:
            command += ["--plain-http", plain_http]
        if jobs:
            command += ["--jobs", str(jobs)]
        return [*command, src, dst]

    def multi_copy(self, src: str, dst: str, names: list[str], plain_http: str | None,
                   jobs: int | None = None, cprofile: Path | None = None) -> list[str]:
        command = [sys.executable, "-m", "bench.multi_copy", "--src", src, "--dst", dst]
        if plain_http:
            command += ["--plain-http", plain_http]
        if jobs:
            command += ["--jobs", str(jobs)]
        if cprofile:
            command += ["--cprofile", str(cprofile)]
        return [*command, *names]

    # contenders

    def pull_skopeo(self, images: list[ImageInfo]) -> Contender:
        host = self.source.host

        def run() -> Sample:
            with self.fresh_layout() as dest:
                sample = run_commands(
                    [self.skopeo_copy(f"docker://{host}/{i.repo_path}", f"oci:{dest}:{i.name}",
                                      plain_src=True) for i in images],
                    self._log_file("pull-skopeo"), sync=True, server=self.source)
                verify_layout(dest, images)
            return sample

        return Contender("skopeo", f"skopeo x{len(images)} + sync",
                         f"{len(images)} x `skopeo copy --all docker://REG/IMAGE oci:DIR:NAME`, "
                         "then sync(2)", True, run)

    def pull_gapkit_cli(self, images: list[ImageInfo], jobs: int | None = None) -> Contender:
        host = self.source.host

        def run() -> Sample:
            with self.fresh_layout() as dest:
                sample = run_commands(
                    [self.gapkit_copy(f"docker://{host}/{i.repo_path}", f"oci:{dest}:{i.name}",
                                      host, jobs) for i in images],
                    self._log_file("pull-gapkit"), server=self.source)
                verify_layout(dest, images)
            return sample

        jobs_text = f" --jobs {jobs}" if jobs else ""
        return Contender("gapkit-cli", f"gapkit x{len(images)}{jobs_text}",
                         f"{len(images)} x `gapkit copy --all-platforms{jobs_text} docker://REG/IMAGE "
                         "oci:DIR:NAME` (each fsyncs its blobs)", False, run)

    def pull_gapkit_one(self, images: list[ImageInfo], jobs: int | None = None) -> Contender:
        host = self.source.host

        def run() -> Sample:
            with self.fresh_layout() as dest:
                sample = run_commands(
                    [self.multi_copy(f"docker://{host}/{{repo}}", f"oci:{dest}:{{name}}",
                                     [i.name for i in images], host, jobs)],
                    self._log_file("pull-gapkit-one"), server=self.source, cwd=REPO_ROOT)
                verify_layout(dest, images)
            return sample

        jobs_text = f" --jobs {jobs}" if jobs else ""
        return Contender("gapkit-1proc", f"gapkit 1 process{jobs_text}",
                         f"one process, one copy() of all {len(images)} images "
                         f"(`python -m bench.multi_copy{jobs_text}`, fsyncs its blobs)", False, run)

    def push_skopeo(self, images: list[ImageInfo]) -> Contender:
        def run() -> Sample:
            with self.fresh_registry() as registry:
                sample = run_commands(
                    [self.skopeo_copy(f"oci:{i.layout}:{i.name}",
                                      f"docker://{registry.host}/{i.repo_path}", plain_dest=True)
                     for i in images], self._log_file("push-skopeo"), server=registry)
                verify_registry(registry, images)
            return sample

        return Contender("skopeo", f"skopeo x{len(images)}",
                         f"{len(images)} x `skopeo copy --all oci:DIR:NAME docker://REG/IMAGE` "
                         "into a fresh empty registry", True, run)

    def push_gapkit_cli(self, images: list[ImageInfo], jobs: int | None = None) -> Contender:
        def run() -> Sample:
            with self.fresh_registry() as registry:
                sample = run_commands(
                    [self.gapkit_copy(f"oci:{i.layout}:{i.name}",
                                      f"docker://{registry.host}/{i.repo_path}", registry.host, jobs)
                     for i in images], self._log_file("push-gapkit"), server=registry)
                verify_registry(registry, images)
            return sample

        jobs_text = f" --jobs {jobs}" if jobs else ""
        return Contender("gapkit-cli", f"gapkit x{len(images)}{jobs_text}",
                         f"{len(images)} x `gapkit copy --all-platforms{jobs_text} oci:DIR:NAME "
                         "docker://REG/IMAGE` into a fresh empty registry", False, run)

    def push_gapkit_one(self, images: list[ImageInfo], jobs: int | None = None) -> Contender:
        layout = images[0].layout

        def run() -> Sample:
            with self.fresh_registry() as registry:
                sample = run_commands(
                    [self.multi_copy(f"oci:{layout}:{{name}}", f"docker://{registry.host}/{{repo}}",
                                     [i.name for i in images], registry.host, jobs)],
                    self._log_file("push-gapkit-one"), server=registry, cwd=REPO_ROOT)
                verify_registry(registry, images)
            return sample

        jobs_text = f" --jobs {jobs}" if jobs else ""
        return Contender("gapkit-1proc", f"gapkit 1 process{jobs_text}",
                         f"one process, one copy() of all {len(images)} images "
                         f"(`python -m bench.multi_copy{jobs_text}`) into a fresh empty registry",
                         False, run)

    def layout_skopeo(self, images: list[ImageInfo]) -> Contender:
        def run() -> Sample:
            with self.fresh_layout() as dest:
                sample = run_commands(
                    [self.skopeo_copy(f"oci:{i.layout}:{i.name}", f"oci:{dest}:{i.name}")
                     for i in images], self._log_file("layout-skopeo"), sync=True)
                verify_layout(dest, images)
            return sample

        return Contender("skopeo", f"skopeo x{len(images)} + sync",
                         f"{len(images)} x `skopeo copy --all oci:SRC:NAME oci:DST:NAME`, then sync(2)",
                         True, run)

    def layout_gapkit_cli(self, images: list[ImageInfo]) -> Contender:
        layout = images[0].layout

        def run() -> Sample:
            with self.fresh_layout() as dest:
                sample = run_commands([self.gapkit_copy(f"oci:{layout}", f"oci:{dest}", None)],
                                      self._log_file("layout-gapkit"))
                verify_layout(dest, images)
            return sample

        return Contender("gapkit-cli", "gapkit x1 (all images)",
                         "ONE `gapkit copy --all-platforms oci:SRC oci:DST` (every image the source "
                         "names; fsyncs its blobs)", False, run)


def run_scenario(scenario: Scenario, failures: list[str]) -> None:
    """`rounds` rounds; each round runs every contender once, starting one further along."""
    contenders = scenario.contenders
    for round_no in range(scenario.rounds):
        shift = round_no % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            if contender.failure is not None:
                continue
            try:
                sample = contender.run()
            except (BenchFailure, OSError, subprocess.SubprocessError, TimeoutError) as exc:
                contender.failure = f"{type(exc).__name__}: {exc}"
                failures.append(f"{scenario.title} / {contender.label}: {contender.failure}")
                log(f"FAILED {scenario.key} / {contender.label}: {contender.failure}")
                continue
            contender.samples.append(sample)
            server = (f", registry {sample.server_cpu_s:.1f} CPU-s"
                      if sample.server_cpu_s is not None else "")
            round_text = f" round {round_no + 1}/{scenario.rounds}" if scenario.rounds > 1 else ""
            log(f"{scenario.key}{round_text} {contender.label}: "
                f"{sample.seconds:.2f} s, {sample.cpu_s:.1f} CPU-s, "
                f"peak RSS {sample.peak_rss_mb:.0f} MB{server}")


# -- the floors -------------------------------------------------------------------------------

def measure_floors(bench: Bench, images: list[ImageInfo]) -> dict[str, float]:
    """This machine's physical limits for the workload's unique bytes (seconds)."""
    blobs: dict[str, tuple[str, int]] = {}
    for image in images:
        for digest, size in image.layers_and_configs.items():
            blobs.setdefault(digest, (image.repo, size))
    nbytes = sum(size for _, size in blobs.values())
    paths = [bench.workload.layout / "blobs" / "sha256" / d.split(":", 1)[1] for d in blobs]
    out: dict[str, float] = {}

    # hashing: hashlib.sha256 on two threads, 1 MiB reads from the (warm) page cache
    import hashlib

    def hash_files(files: list[Path]) -> None:
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    digest.update(chunk)

    ordered = sorted(paths, key=lambda p: -p.stat().st_size)
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(hash_files, [ordered[0::2], ordered[1::2]]))
    out["hash_2_threads"] = time.perf_counter() - start

    # loopback transfer: curl GET of every blob from the registry, 8 at once
    config = bench.tmp / "curl-get.cfg"
    config.write_text("".join(
        f'url = "http://{bench.source.host}/v2/{repo}/blobs/{digest}"\noutput = "/dev/null"\n'
        for digest, (repo, _) in blobs.items()))
    start = time.perf_counter()
    fetched = subprocess.run(["curl", "--silent", "--fail", "--no-progress-meter", "--parallel",
                              "--parallel-max", "8", "-K", str(config)],
                             capture_output=True, text=True, check=False)
    if fetched.returncode != 0:
        raise BenchFailure(f"curl could not fetch the blobs: {fetched.stderr[-2000:]}")
    out["loopback_transfer"] = time.perf_counter() - start

    # durable write of new blocks: like `dd bs=1M conv=fsync`, as one file and as 4 files at once
    # (some disks only reach their speed with several writes in flight; gapkit has --jobs)
    buffer = os.urandom(MiB)

    def write_durably(path: Path, nbytes: int) -> None:
        with open(path, "wb", buffering=0) as f:
            for _ in range(max(1, nbytes // MiB)):
                f.write(buffer)
            os.fsync(f.fileno())

    for streams in (1, 4):
        targets = [bench.tmp / f"floor-write-{i}" for i in range(streams)]
        os.sync()
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(write_durably, targets, [nbytes // streams] * streams))
        out[f"durable_write_{streams}_stream{'s' if streams > 1 else ''}"] = (
            time.perf_counter() - start)
        for path in targets:
            path.unlink()
        os.sync()
    out["durable_write"] = min(out["durable_write_1_stream"], out["durable_write_4_streams"])

    # registry ingest: every blob uploaded as one monolithic PUT each, 8 at once, fresh registry
    with bench.fresh_registry() as registry:
        def upload(item: tuple[str, tuple[str, int]]) -> None:
            digest, (repo, size) = item
            conn = http.client.HTTPConnection(registry.host, timeout=120, blocksize=MiB)
            try:
                conn.request("POST", f"/v2/{repo}/blobs/uploads/")
                response = conn.getresponse()
                response.read()
                where = urlsplit(response.headers["Location"])
                query = f"{where.query}&digest={digest}" if where.query else f"digest={digest}"
                with open(bench.workload.layout / "blobs" / "sha256" / digest.split(":", 1)[1],
                          "rb") as body:
                    conn.request("PUT", f"{where.path}?{query}", body=body,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)})
                    response = conn.getresponse()
                    response.read()
                if response.status != 201:
                    raise BenchFailure(f"floor upload of {digest}: HTTP {response.status}")
            finally:
                conn.close()

        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, sorted(blobs.items(), key=lambda kv: -kv[1][1])))
        out["registry_ingest"] = time.perf_counter() - start
    return out


# -- reporting --------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def scenario_rows(scenario: Scenario) -> list[dict[str, Any]]:
    peer = scenario.peer
    peer_s = peer.median() if peer else None
    rows = []
    for contender in scenario.contenders:
        if contender.is_peer:
            continue
        gapkit_s = contender.median()
        ratio = gapkit_s / peer_s if gapkit_s and peer_s else None
        rows.append({
            "scenario": scenario.key,
            "title": scenario.title,
            "gapkit": contender.label,
            "peer_s": peer_s,
            "gapkit_s": gapkit_s,
            "ratio": ratio,
            "target_ratio": scenario.target_ratio,
            "meets_target": (ratio <= scenario.target_ratio
                             if ratio is not None and scenario.target_ratio else None),
            "gapkit_mb_s": scenario.nbytes / MB / gapkit_s if gapkit_s else None,
            "peer_rss_mb": peer.peak_rss_mb() if peer else None,
            "gapkit_rss_mb": contender.peak_rss_mb(),
            "rss_under_target": (contender.peak_rss_mb() or 0) < TARGETS["rss_mb"],
            "peer_cpu_s": peer.median("cpu_s") if peer else None,
            "gapkit_cpu_s": contender.median("cpu_s"),
            "peer_server_cpu_s": peer.median("server_cpu_s") if peer else None,
            "gapkit_server_cpu_s": contender.median("server_cpu_s"),
            "floor_s": scenario.floor_s,
            "floor_what": scenario.floor_what,
            "gapkit_over_floor": gapkit_s / scenario.floor_s if gapkit_s and scenario.floor_s else None,
        })
    return rows


def render_table(scenarios: list[Scenario]) -> str:
    head = ("| scenario | gapkit run as | skopeo s | gapkit s | ratio (target) | gapkit MB/s "
            "| RSS MB skopeo / gapkit | CPU-s skopeo / gapkit | registry CPU-s skopeo / gapkit "
            "| floor s | gapkit / floor |")
    lines = [head, "|" + "---|" * 11]
    for scenario in scenarios:
        for row in scenario_rows(scenario):
            target = f" (<= {row['target_ratio']})" if row["target_ratio"] else ""
            verdict = {True: " ok", False: " MISSED", None: ""}[row["meets_target"]]
            lines.append(
                f"| {row['title']} | {row['gapkit']} | {_fmt(row['peer_s'])} | {_fmt(row['gapkit_s'])} "
                f"| {_fmt(row['ratio'])}{target}{verdict} | {_fmt(row['gapkit_mb_s'], '.0f')} "
                f"| {_fmt(row['peer_rss_mb'], '.0f')} / {_fmt(row['gapkit_rss_mb'], '.0f')}"
                f"{'' if row['rss_under_target'] else ' (over ' + format(TARGETS['rss_mb'], '.0f') + ')'} "
                f"| {_fmt(row['peer_cpu_s'], '.1f')} / {_fmt(row['gapkit_cpu_s'], '.1f')} "
                f"| {_fmt(row['peer_server_cpu_s'], '.1f')} / {_fmt(row['gapkit_server_cpu_s'], '.1f')} "
                f"| {_fmt(row['floor_s'])} | {_fmt(row['gapkit_over_floor'])} |")
    return "\n".join(lines)


def render_sweep(sweep: list[Scenario], nbytes: int) -> str:
    by_label: dict[str, dict[int, float | None]] = {}
    jobs_values: list[int] = []
    for scenario in sweep:
        jobs = int(scenario.key.rsplit("-", 1)[1])
        jobs_values.append(jobs)
        for contender in scenario.contenders:
            by_label.setdefault(contender.key, {})[jobs] = contender.median()
    names = {"pull-1proc": "pull (registry -> layout), 1 process",
             "pull-cli": "pull, 12 CLI runs", "push-1proc": "push (layout -> registry), 1 process"}
    lines = ["| --jobs | " + " | ".join(f"{names.get(k, k)} s (MB/s)" for k in by_label) + " |",
             "|---|" + "---|" * len(by_label)]
    for jobs in jobs_values:
        cells = []
        for values in by_label.values():
            seconds = values.get(jobs)
            cells.append(f"{_fmt(seconds)} ({_fmt(nbytes / MB / seconds if seconds else None, '.0f')})")
        lines.append(f"| {jobs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scenario_json(scenario: Scenario) -> dict[str, Any]:
    return {
        "key": scenario.key, "title": scenario.title, "bytes": scenario.nbytes,
        "rounds": scenario.rounds, "target_ratio": scenario.target_ratio,
        "floor_s": scenario.floor_s, "floor_what": scenario.floor_what,
        "contenders": [{
            "key": c.key, "label": c.label, "timed": c.timed, "is_peer": c.is_peer,
            "median_s": c.median(), "median_cpu_s": c.median("cpu_s"),
            "median_server_cpu_s": c.median("server_cpu_s"), "peak_rss_mb": c.peak_rss_mb(),
            "failure": c.failure,
            "samples": [vars(s) for s in c.samples],
        } for c in scenario.contenders],
        "rows": scenario_rows(scenario),
    }


def _versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True,
                                  check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    from gapkit import __version__
    return {"gapkit": f"{__version__} ({commit})", "skopeo": first_line(["skopeo", "--version"]),
            "docker-registry": first_line(["docker-registry", "--version"]),
            "python": platform.python_version(), "cpus": str(os.cpu_count())}


# -- profiling --------------------------------------------------------------------------------

def profile_runs(bench: Bench, images: list[ImageInfo], out_dir: Path) -> dict[str, str]:
    """One cProfile'd one-process pull and push; the top functions by own time, as text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [i.name for i in images]
    texts: dict[str, str] = {}
    with bench.fresh_layout() as dest:
        stats_file = out_dir / "pull.prof"
        run_commands([bench.multi_copy(f"docker://{bench.source.host}/{{repo}}", f"oci:{dest}:{{name}}",
                                       names, bench.source.host, cprofile=stats_file)],
                     bench._log_file("profile-pull"), cwd=REPO_ROOT)
        texts["pull"] = _top_stats(stats_file)
    with bench.fresh_registry() as registry:
        stats_file = out_dir / "push.prof"
        run_commands([bench.multi_copy(f"oci:{bench.workload.layout}:{{name}}",
                                       f"docker://{registry.host}/{{repo}}", names, registry.host,
                                       cprofile=stats_file)],
                     bench._log_file("profile-push"), cwd=REPO_ROOT)
        texts["push"] = _top_stats(stats_file)
    return texts


def _top_stats(path: Path, limit: int = 25) -> str:
    import io
    buffer = io.StringIO()
    stats = pstats.Stats(str(path), stream=buffer)
    stats.sort_stats("tottime").print_stats(limit)
    return buffer.getvalue()


# -- the command ------------------------------------------------------------------------------

@dataclass
class Options:
    size_mb: float = 1000
    rounds: int = 3
    jobs: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 12])
    big_layer_mb: int = 0
    big_rounds: int = 1
    smoke: bool = False
    as_json: bool = False
    keep: bool = False
    floors: bool = True
    only: set[str] = field(default_factory=lambda: {"pull", "push", "layout", "startup", "big",
                                                    "sweep"})
    profile: Path | None = None
    tmp: Path | None = None
    save: Path | None = None


def main(options: Options) -> int:
    if options.smoke:
        options.size_mb, options.rounds, options.floors = min(options.size_mb, 20), 1, False
        options.only -= {"sweep", "startup"}
    for tool in ("skopeo", "docker-registry", "curl"):
        if shutil.which(tool) is None and (tool != "curl" or options.floors):
            print(f"bench: {tool} is not installed (see bench/README.md)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="gapkit-bench-", dir=options.tmp))
    source = Registry(tmp / "src-registry")
    benches: list[Bench] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(options, tmp, source, benches)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for bench in benches:
            bench.stop_all()
        source.stop()
        if options.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run(options: Options, tmp: Path, source: Registry, benches: list[Bench]) -> int:
    started = time.perf_counter()
    log(f"workload: {options.size_mb:g} MB"
        + (f" + one {options.big_layer_mb} MiB layer" if options.big_layer_mb else "") + f" in {tmp}")
    t0 = time.perf_counter()
    big_mb = options.big_layer_mb if "big" in options.only else 0
    workload = build_workload(tmp / "src-layout", options.size_mb, big_mb)
    shape = describe(workload)
    log(f"generated {shape['images']} images, {shape['unique_layers']} unique layers, "
        f"{shape['unique_mb']} MB unique ({shape['mb_without_sharing']} MB without sharing) "
        f"in {time.perf_counter() - t0:.1f} s")
    source.start()
    t0 = time.perf_counter()
    push_workload(workload, source)
    os.sync()  # setup's dirty pages are written back now, not during the timed runs
    log(f"pushed the workload into the source registry {source.host} with skopeo "
        f"in {time.perf_counter() - t0:.1f} s")
    bench = Bench(tmp, workload, source)
    benches.append(bench)
    failures: list[str] = []
    images = workload.images
    nbytes = workload.unique_bytes()
    gb = nbytes / 1e9

    floors: dict[str, float] = {}
    if options.floors:
        floors = measure_floors(bench, images)
        log("floors on this machine: " + ", ".join(f"{k} {v:.2f} s" for k, v in floors.items()))
    doc_floors = {k: v * gb for k, v in DOC_FLOORS_PER_GB.items()}
    pull_floor = max((floors.get(k, doc_floors.get(k, 0.0))
                      for k in ("hash_2_threads", "loopback_transfer", "durable_write")), default=None)
    push_floor = floors.get("registry_ingest")

    scenarios: list[Scenario] = []
    if "pull" in options.only:
        scenarios.append(Scenario(
            "pull", "registry -> OCI layout (durable)", nbytes,
            [bench.pull_skopeo(images), bench.pull_gapkit_cli(images), bench.pull_gapkit_one(images)],
            TARGETS["pull"], pull_floor,
            "max(hash on 2 threads, loopback GET, durable write)" + ("" if floors else " (BENCHMARKS.md)"),
            options.rounds))
    if "push" in options.only:
        scenarios.append(Scenario(
            "push", "OCI layout -> empty registry", nbytes,
            [bench.push_skopeo(images), bench.push_gapkit_cli(images), bench.push_gapkit_one(images)],
            TARGETS["push"], push_floor, "monolithic PUT of every blob, 8 at once", options.rounds))
    if "layout" in options.only:
        scenarios.append(Scenario(
            "layout", "OCI layout -> OCI layout (durable)", nbytes,
            [bench.layout_skopeo(images), bench.layout_gapkit_cli(images)], None,
            floors.get("durable_write", doc_floors["durable_write"]),
            "durable write" + ("" if floors else " (BENCHMARKS.md)"), options.rounds))
    if "startup" in options.only:
        smallest = min(images, key=lambda i: sum(i.blobs.values()))
        twelve = [smallest] * len(images)
        scenarios.append(Scenario(
            "startup", f"per-run overhead: {len(twelve)} x {smallest.repo_path}, registry -> layout",
            workload.unique_bytes([smallest]),
            [bench.pull_skopeo(twelve), bench.pull_gapkit_cli(twelve)], None, None,
            "", options.rounds))
    if workload.big is not None:
        big = [workload.big]
        big_bytes = workload.unique_bytes(big)
        scenarios.append(Scenario(
            "big-pull", f"1 layer of {big_mb} MiB: registry -> layout", big_bytes,
            [bench.pull_skopeo(big), bench.pull_gapkit_cli(big)], None,
            None, "", options.big_rounds))
        scenarios.append(Scenario(
            "big-push", f"1 layer of {big_mb} MiB: layout -> registry", big_bytes,
            [bench.push_skopeo(big), bench.push_gapkit_cli(big)], None,
            None, "", options.big_rounds))

    for scenario in scenarios:
        log(f"== {scenario.title}: {scenario.rounds} round(s)")
        run_scenario(scenario, failures)

    sweep: list[Scenario] = []
    if "sweep" in options.only and options.jobs:
        log(f"== --jobs sweep {options.jobs}: {options.rounds} round(s)")
        for jobs in options.jobs:
            pull_one = bench.pull_gapkit_one(images, jobs)
            pull_cli = bench.pull_gapkit_cli(images, jobs)
            push_one = bench.push_gapkit_one(images, jobs)
            for contender, key, label in ((pull_one, "pull-1proc", "pull, 1 process"),
                                          (pull_cli, "pull-cli", "pull, 12 CLI runs"),
                                          (push_one, "push-1proc", "push, 1 process")):
                contender.key, contender.label = key, f"{label}, --jobs {jobs}"
            sweep.append(Scenario(f"jobs-{jobs}", f"--jobs {jobs}", nbytes,
                                  [pull_one, pull_cli, push_one], rounds=options.rounds))
        # round-robin over the jobs values too, so drift spreads over all of them
        for round_no in range(options.rounds):
            shift = round_no % len(sweep)
            for scenario in sweep[shift:] + sweep[:shift]:
                run_scenario(Scenario(f"sweep round {round_no + 1}/{options.rounds}", scenario.title,
                                      nbytes, scenario.contenders), failures)

    profiles: dict[str, str] = {}
    if options.profile is not None:
        log(f"== cProfile of one pull and one push (one process), into {options.profile}")
        profiles = profile_runs(bench, images, options.profile)

    report: dict[str, Any] = {
        "versions": _versions(),
        "workload": shape,
        "options": {"size_mb": options.size_mb, "rounds": options.rounds, "jobs": options.jobs,
                    "big_layer_mb": big_mb, "smoke": options.smoke},
        "durability": "gapkit fsyncs every blob it writes to a layout; skopeo's layout runs are "
                      "timed up to the end of a sync(2) after its last copy",
        "peak_rss_from": rss_method(),
        "floors_measured_s": floors,
        "floors_benchmarks_md_s": doc_floors,
        "benchmarks_md_skopeo_s": DOC_SKOPEO,
        "scenarios": [scenario_json(s) for s in scenarios],
        "jobs_sweep": [scenario_json(s) for s in sweep],
        "profiles": profiles,
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }
    if options.save is not None:
        options.save.write_text(json.dumps(report, indent=2) + "\n")
    if options.as_json:
        print(json.dumps(report, indent=2))
    else:
        print(render_report(report, scenarios, sweep, nbytes))
    log(f"done in {report['seconds']:.0f} s" + (f", {len(failures)} failure(s)" if failures else ""))
    return 1 if failures else 0


def render_report(report: dict[str, Any], scenarios: list[Scenario], sweep: list[Scenario],
                  nbytes: int) -> str:
    shape = report["workload"]
    out = [
        f"gapkit copy benchmark: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        f"workload: {shape['images']} images, {shape['unique_layers']} unique layers, "
        f"{shape['unique_mb']} MB unique ({shape['mb_without_sharing']} MB without sharing)"
        + (f", plus one image of one {shape['big_layer_mb']} MB layer" if shape["big_layer_mb"] else ""),
        f"medians of {report['options']['rounds']} round(s), peer and gapkit alternating; warm page "
        "cache; fresh empty destination every run.",
        f"durability: {report['durability']}.",
        f"peak RSS (MB = 10^6 bytes) and CPU from: {report['peak_rss_from']}.",
        "",
        render_table(scenarios),
        "",
        "What was timed:",
    ]
    for scenario in scenarios:
        for contender in scenario.contenders:
            out.append(f"- {scenario.title} / {contender.label}: {contender.timed}")
    floors = report["floors_measured_s"]
    out += ["", "Physical floors for these bytes (s): "
            + ", ".join(f"{k} {v:.2f} here / {report['floors_benchmarks_md_s'][k]:.2f} BENCHMARKS.md"
                        if k in report["floors_benchmarks_md_s"] else f"{k} {v:.2f} here"
                        for k, v in floors.items())
            if floors else "Physical floors (BENCHMARKS.md, scaled to these bytes, s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in report["floors_benchmarks_md_s"].items())]
    if sweep:
        out += ["", "--jobs sweep (medians):", render_sweep(sweep, nbytes)]
    for name, text in report["profiles"].items():
        out += ["", f"cProfile, one-process {name} (event-loop thread only), top by own time:", text]
    if report["failures"]:
        out += ["", "FAILURES:", *report["failures"]]
    return "\n".join(out)

