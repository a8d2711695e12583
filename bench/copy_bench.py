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
  (one per image), ONE `gapkit copy` with all 12 images as sources (`gapkit copy SRC... DST`,
  cp-style), and one process copying all 12 through the library (`bench/multi_copy.py`).
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
import os
import pstats
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    PREFAULT_FACTOR,
    REPO_ROOT,
    RSS_TARGET_MB,
    BenchFailure,
    BenchOptions,
    Contender,
    Logs,
    Sample,
    Scenario,
    Setup,
    fmt,
    gapkit_command,
    hash_files,
    log,
    prefault,
    require_tools,
    rss_method,
    run_commands,
    run_scenario,
    versions,
    workload_setup,
    write_report,
)
from bench.workload import MB, ImageInfo, MiB, Workload, describe, index_digests
from tests.support.peers import Registry

#: BENCHMARKS.md's physical floors for 1 GB on the reference machine (seconds).
DOC_FLOORS_PER_GB = {"hash_2_threads": 0.35, "loopback_transfer": 1.4, "durable_write": 4.4}
#: BENCHMARKS.md's skopeo results on the reference machine (seconds, for ~1 GB).
DOC_SKOPEO = {"pull": 5.39, "push": 12.47}
TARGETS = {"pull": 0.6, "push": 0.5, "rss_mb": RSS_TARGET_MB}
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def verify_layout(dest: Path, images: list[ImageInfo],
                  name_of: Callable[[ImageInfo], str] | None = None) -> None:
    """Each image is named by its source digest, and every blob it needs is there, whole.

    `name_of` gives the name an image has in `dest` (default: its name in the workload)."""
    names = index_digests(dest)
    for image in images:
        name = name_of(image) if name_of else image.name
        if names.get(name) != image.digest:
            raise BenchFailure(f"{dest}: {name} is {names.get(name)}, "
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

class Bench:
    """The temp folder, the workload, the source registry, and the contenders' commands."""

    def __init__(self, tmp: Path, workload: Workload, source_registry: Registry,
                 logs: Path | None = None, prefault_bytes: int = 0) -> None:
        self.tmp = tmp
        self.workload = workload
        self.source = source_registry
        #: Memory touched before each timed run (`bench.common.prefault`).
        self.prefault_bytes = prefault_bytes
        self.gapkit = gapkit_command()
        self.logs = Logs(logs or tmp / "logs")
        self._registries: list[Registry] = []

    def _log_file(self, key: str) -> Path:
        return self.logs.next(key)

    # fresh destinations, made and removed outside the timer

    @contextmanager
    def fresh_layout(self) -> Iterator[Path]:
        dest = self.tmp / "dst-layout"
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()  # nothing of earlier runs left to write back while this one is timed
        prefault(self.tmp, self.prefault_bytes)
        try:
            yield dest
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    @contextmanager
    def fresh_registry(self) -> Iterator[Registry]:
        registry = Registry(self.tmp / f"dst-registry-{self.logs.runs}")
        self._registries.append(registry)
        try:
            registry.start()
            os.sync()
            prefault(self.tmp, self.prefault_bytes)
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

    def gapkit_copy(self, src: str | list[str], dst: str, plain_http: str | None,
                    jobs: int | None = None) -> list[str]:
        """`gapkit copy` of one source, or of several into one destination (cp-style)."""
        command = [*self.gapkit, "copy", "--json", "--all-platforms"]
        if plain_http:
            command += ["--plain-http", plain_http]
        if jobs:
            command += ["--jobs", str(jobs)]
        return [*command, *([src] if isinstance(src, str) else src), dst]

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

    def pull_gapkit_many_sources(self, images: list[ImageInfo]) -> Contender:
        """ONE `gapkit copy` with every image as a source: one start-up, one copy run, shared
        blobs fetched once. Each image keeps its source name (`REG/calico/cni:v3.28.1`)."""
        host = self.source.host

        def run() -> Sample:
            with self.fresh_layout() as dest:
                sample = run_commands(
                    [self.gapkit_copy([f"docker://{host}/{i.repo_path}" for i in images],
                                      f"oci:{dest}", host)],
                    self._log_file("pull-gapkit-many"), server=self.source)
                verify_layout(dest, images, lambda i: f"{host}/{i.repo_path}")
            return sample

        return Contender("gapkit-cli-many", f"gapkit x1 ({len(images)} sources)",
                         f"ONE `gapkit copy --all-platforms docker://REG/IMAGE1 ... "
                         f"docker://REG/IMAGE{len(images)} oci:DIR` (cp-style, shared blobs "
                         "fetched once; fsyncs its blobs)", False, run)

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
    out["hash_2_threads"] = hash_files(paths, 2)

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
                f"| {row['title']} | {row['gapkit']} | {fmt(row['peer_s'])} | {fmt(row['gapkit_s'])} "
                f"| {fmt(row['ratio'])}{target}{verdict} | {fmt(row['gapkit_mb_s'], '.0f')} "
                f"| {fmt(row['peer_rss_mb'], '.0f')} / {fmt(row['gapkit_rss_mb'], '.0f')}"
                f"{'' if row['rss_under_target'] else ' (over ' + format(TARGETS['rss_mb'], '.0f') + ')'} "
                f"| {fmt(row['peer_cpu_s'], '.1f')} / {fmt(row['gapkit_cpu_s'], '.1f')} "
                f"| {fmt(row['peer_server_cpu_s'], '.1f')} / {fmt(row['gapkit_server_cpu_s'], '.1f')} "
                f"| {fmt(row['floor_s'])} | {fmt(row['gapkit_over_floor'])} |")
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
            cells.append(f"{fmt(seconds)} ({fmt(nbytes / MB / seconds if seconds else None, '.0f')})")
        lines.append(f"| {jobs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scenario_json(scenario: Scenario) -> dict[str, Any]:
    return {
        "key": scenario.key, "title": scenario.title, "bytes": scenario.nbytes,
        "rounds": scenario.rounds, "target_ratio": scenario.target_ratio,
        "floor_s": scenario.floor_s, "floor_what": scenario.floor_what,
        "contenders": [c.to_json() for c in scenario.contenders],
        "rows": scenario_rows(scenario),
    }


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
class Options(BenchOptions):
    jobs: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 12])
    big_layer_mb: int = 0
    big_rounds: int = 1
    floors: bool = True
    only: set[str] = field(default_factory=lambda: {"pull", "push", "layout", "startup", "big",
                                                    "sweep"})
    profile: Path | None = None

    def apply_smoke(self) -> None:
        """`--smoke`: ~20 MB, 1 round, no sweep, start-up or floors."""
        super().apply_smoke()
        self.floors = False
        self.only -= {"sweep", "startup"}


def main(options: Options) -> int:
    if options.smoke:
        options.apply_smoke()
    if not require_tools("skopeo", "docker-registry", *(["curl"] if options.floors else [])):
        return 2
    big_mb = options.big_layer_mb if "big" in options.only else 0
    with workload_setup(options.size_mb, big_layer_mb=big_mb, tmp=options.tmp,
                        keep=options.keep) as setup:
        return run(options, setup)


def run(options: Options, setup: Setup) -> int:
    """Every scenario `options` asks for, on a workload and source registry already set up."""
    prefault_bytes = int(PREFAULT_FACTOR * setup.workload.unique_bytes()) if options.prefault else 0
    bench = Bench(setup.tmp, setup.workload, setup.source, setup.tmp / "logs-copy", prefault_bytes)
    try:
        return _run(options, bench)
    finally:
        bench.stop_all()


def _run(options: Options, bench: Bench) -> int:
    started = time.perf_counter()
    workload = bench.workload
    shape = describe(workload)
    big_mb = options.big_layer_mb if workload.big is not None else 0
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
            [bench.pull_skopeo(images), bench.pull_gapkit_cli(images), bench.pull_gapkit_one(images),
             bench.pull_gapkit_many_sources(images)],
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
        "versions": versions(),
        "workload": shape,
        "options": {"size_mb": options.size_mb, "rounds": options.rounds, "jobs": options.jobs,
                    "big_layer_mb": big_mb, "smoke": options.smoke},
        "durability": "gapkit fsyncs every blob it writes to a layout; skopeo's layout runs are "
                      "timed up to the end of a sync(2) after its last copy",
        "prefault_mb": bench.prefault_bytes / MB,
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
    write_report(report, render_report(report, scenarios, sweep, nbytes), as_json=options.as_json,
                 save=options.save)
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
        f"memory touched before each timed run (bench.common.prefault): "
        f"{report['prefault_mb']:.0f} MB.",
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

