"""`python -m bench registry`: `gapkit registry serve` and `gapkit registry push` against
CNCF distribution (`docker-registry`) and skopeo, on the same images, in one invocation.

Setup (bench/common.py): the workload is pushed into a `docker-registry` on loopback with
skopeo (the peer server), then one images-only bundle of it is built with `gapkit bundle create`
(not timed), and `gapkit registry serve BUNDLE --tls off --listen 127.0.0.1:PORT` is started
(the gapkit server). Both servers then hold the same images and stay up for the whole run.

Scenarios, each several rounds, contenders taking turns (the starting one moves each round):

- `pull`: a fresh containerd (own root, started and stopped outside the timer, the way
  tests/support/containerd.py does) runs `ctr -n k8s.io image pull --hosts-dir DIR --platform
  linux/amd64 NAME` for every image, one after another. `DIR/<upstream>/hosts.toml` has
  `server` on a closed loopback port and one mirror host, the server under test, so only the
  mirror can answer (containerd adds `?ns=<upstream>`). Pull includes unpacking into the
  overlayfs snapshotter, which costs most of the time (BENCHMARKS.md).
- `fetch`: the same with `ctr content fetch` (fetch only, no unpack).
- `blobs`: 32 concurrent HTTP clients (one aiohttp process, `bench/blob_clients.py`) GET the
  workload's biggest layers again and again from the server for a fixed time; GB/s.
- `push`: `gapkit registry push BUNDLE --to REG --plain-http` (and from the OCI layout) into a
  fresh, empty `docker-registry` against 12 x `skopeo copy --all oci:LAYOUT:NAME docker://REG/..`.
- `load`: 64 concurrent clients in a process of their own (`tests/support/load.py`) GET every
  image's manifests (by tag and by digest), configs and small layers from the server, again
  and again for a fixed time, checking every body's digest; requests/s and p50/p99 latency.
  `python -m bench load` runs only this one.

The server's peak RSS is its `/proc/PID/status` VmHWM, reset (`clear_refs` 5) before each
scenario. Every result is checked (image digests in containerd; every blob in the registry).
Targets (issue 4): pull ratio gapkit/distribution <= 1.0; blob GB/s >= distribution's; push
<= 0.5x skopeo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    PREFAULT_FACTOR,
    REPO_ROOT,
    BenchFailure,
    BenchOptions,
    Contender,
    Logs,
    Sample,
    Scenario,
    Setup,
    bundle_create_command,
    fmt,
    gapkit_command,
    log,
    prefault,
    ratio,
    registry_hosts,
    require_tools,
    rss_method,
    run_commands,
    run_scenario,
    versions,
    workload_setup,
    write_report,
)
from bench.copy_bench import Bench, verify_registry
from bench.workload import MB, ImageInfo, describe
from gapkit.oci.model import MANIFEST_MEDIA_TYPES
from tests.support.containerd import Containerd
from tests.support.peers import free_port, stop_process_group, wait_for_port

PULL_TARGET = 1.0
PUSH_TARGET = 0.5
CLIENTS = 32
LOAD_CLIENTS = 64
#: Layers up to this size are load targets (with every manifest and config): the load
#: measures requests, the `blobs` scenarios measure bytes.
LOAD_BLOB_MAX = 1024 * 1024
SCENARIOS = ("pull", "fetch", "blobs", "blobs-curl", "push", "load")


@dataclass
class RegistryOptions(BenchOptions):
    #: Seconds each 32-client blob run lasts.
    blob_seconds: float = 5.0
    clients: int = CLIENTS
    #: Seconds each load run lasts, and its concurrent clients.
    load_seconds: float = 5.0
    load_clients: int = LOAD_CLIENTS
    #: The scenarios to run (`python -m bench load`: only "load").
    only: tuple[str, ...] = SCENARIOS

    def apply_smoke(self) -> None:
        """`--smoke`: ~20 MB, 1 round, 1 s blob and load runs: a check that everything runs."""
        super().apply_smoke()
        self.blob_seconds = min(self.blob_seconds, 1.0)
        self.load_seconds = min(self.load_seconds, 1.0)




def main(options: RegistryOptions) -> int:
    if options.smoke:
        options.apply_smoke()
    tools = ["skopeo", "docker-registry"]
    if set(options.only) & {"pull", "fetch"}:
        tools += ["containerd", "ctr"]
    if "blobs-curl" in options.only:
        tools.append("curl")
    if not require_tools(*tools):
        return 2
    with workload_setup(options.size_mb, tmp=options.tmp, keep=options.keep) as setup:
        return run(options, setup)


# -- servers ----------------------------------------------------------------------------------

@dataclass
class Server:
    """A server under test: its label, `host:port` and process (for CPU and VmHWM)."""

    key: str
    label: str
    host: str
    process: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (`clear_refs` 5), so the next peak is this scenario's."""
        with suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_rss_mb(self) -> float | None:
        return _status_kib(self.pid, "VmHWM") * 1024 / MB

    def rss_mb(self) -> float | None:
        return _status_kib(self.pid, "VmRSS") * 1024 / MB


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class GapkitServe:
    """`gapkit registry serve SOURCE --tls off --listen 127.0.0.1:PORT`, stopped by its PID."""

    def __init__(self, source: Path, folder: Path) -> None:
        self.source = source
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GapkitServe:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        out = open(self.folder / "serve.log", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [*gapkit_command(), "registry", "serve", str(self.source), "--tls", "off",
             "--listen", self.host, "--state", str(self.folder / "state"),
             "--access-log", str(self.folder / "access.log")],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(self.port, timeout=30)
        except Exception:
            self.stop()
            log_tail = (self.folder / "serve.log").read_text(errors="replace")[-2000:]
            # The server's log says more than the timeout: it replaces the exception.
            raise BenchFailure(  # noqa: B904
                f"gapkit registry serve did not listen: {log_tail}")
        return self

    def stop(self) -> None:
        stop_process_group(self.process, timeout=10)
        self.process = None


# -- the benchmark ----------------------------------------------------------------------------

class RegistryBench:
    def __init__(self, setup: Setup, options: RegistryOptions, prefault_bytes: int) -> None:
        self.setup = setup
        self.options = options
        self.folder = setup.tmp / "registry"
        self.prefault_bytes = prefault_bytes
        self.copy = Bench(setup.tmp, setup.workload, setup.source, self.folder / "logs",
                          prefault_bytes)
        self.logs: Logs = self.copy.logs
        self.images = setup.workload.images
        self.gapkit = self.copy.gapkit
        self.bundle = self.folder / "bundle.tar"
        self.serve: GapkitServe | None = None
        self.servers: list[Server] = []
        self.containerds: list[Containerd] = []

    def prepare(self) -> None:
        """Build the bundle (not timed) and start gapkit's server beside the source registry."""
        started = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        run_commands([bundle_create_command(self.gapkit, self.images, self.setup.source.host,
                                            self.folder / "cache", self.bundle)],
                     self.logs.next("bundle-create"), sync=True)
        shutil.rmtree(self.folder / "cache", ignore_errors=True)
        log(f"built the bundle ({self.bundle.stat().st_size / MB:.0f} MB) "
            f"in {time.perf_counter() - started:.1f} s")
        self.serve = GapkitServe(self.bundle, self.folder / "serve").start()
        self.servers = [
            Server("gapkit", "gapkit registry serve", self.serve.host, self.serve.process),
            Server("distribution", "docker-registry 2.8", self.setup.source.host,
                   self.setup.source.process)]
        log(f"gapkit registry serve on {self.serve.host} "
            f"(RSS {self.servers[0].rss_mb():.0f} MB), docker-registry on "
            f"{self.setup.source.host}")

    def stop(self) -> None:
        for ctd in list(self.containerds):
            ctd.stop()
        if self.serve is not None:
            self.serve.stop()
        self.copy.stop_all()

    # ctr pull / content fetch

    def write_hosts(self, folder: Path, server: Server) -> None:
        """`<upstream>/hosts.toml`: a closed port as the server, the server under test as the
        only mirror, so only the mirror can answer."""
        closed = free_port()
        for upstream in registry_hosts(self.images):
            (folder / upstream).mkdir(parents=True, exist_ok=True)
            (folder / upstream / "hosts.toml").write_text(
                f'server = "http://127.0.0.1:{closed}"\n\n'
                f'[host."http://{server.host}"]\n'
                '  capabilities = ["pull", "resolve"]\n')

    @contextmanager
    def fresh_containerd(self, key: str, server: Server) -> Iterator[tuple[Containerd, Path]]:
        folder = self.folder / key
        shutil.rmtree(folder, ignore_errors=True)
        hosts = folder / "hosts"
        self.write_hosts(hosts, server)
        ctd = Containerd(folder / "containerd")
        self.containerds.append(ctd)
        try:
            ctd.start()
            os.sync()
            prefault(self.folder, self.prefault_bytes)
            yield ctd, hosts
        finally:
            ctd.stop()
            self.containerds.remove(ctd)
            shutil.rmtree(folder, ignore_errors=True)

    def ctr_contender(self, server: Server, mode: str) -> Contender:
        """`mode`: "pull" (`ctr image pull`, fetch + unpack) or "fetch" (`ctr content fetch`)."""
        images = self.images

        def run() -> Sample:
            with self.fresh_containerd(f"ctr-{mode}-{server.key}", server) as (ctd, hosts):
                sub = ["image", "pull"] if mode == "pull" else ["content", "fetch"]
                commands = [["ctr", "-a", ctd.address, "-n", "k8s.io", *sub, "--hosts-dir",
                             str(hosts), "--platform", "linux/amd64", image.name]
                            for image in images]
                sample = run_commands(commands, self.logs.next(f"{mode}-{server.key}"),
                                      server=server)  # type: ignore[arg-type]
                if mode == "pull":
                    check_containerd(ctd, images)
            return sample

        what = ("`ctr image pull` (fetch + unpack, overlayfs)" if mode == "pull"
                else "`ctr content fetch` (fetch only)")
        return Contender(server.key, f"ctr {mode} <- {server.label}",
                         f"{len(images)} x {what} --hosts-dir DIR --platform linux/amd64 NAME, "
                         f"the only mirror in DIR/<upstream>/hosts.toml being {server.label}; "
                         "a fresh containerd root every run", server.key != "gapkit", run)

    # 32 clients

    def blob_targets(self, count: int = 4) -> list[tuple[str, int]]:
        """The `count` biggest layers as `/v2/REPO/blobs/DIGEST?ns=UPSTREAM` paths, with sizes."""
        seen: dict[str, tuple[str, int]] = {}
        for image in self.images:
            upstream = image.name.split("/", 1)[0]
            for digest, size in image.layers_and_configs.items():
                seen.setdefault(digest, (f"/v2/{image.repo}/blobs/{digest}?ns={upstream}", size))
        return sorted(seen.values(), key=lambda t: -t[1])[:count]

    def _run_client(self, module: str, spec: str, log_name: str,
                    server: Server) -> tuple[Sample, dict[str, Any]]:
        """Run a client module (`python -m MODULE SPEC`) in a process of its own; its sample and
        the JSON result it printed."""
        log_file = self.logs.next(log_name)
        out = log_file.with_suffix(".json")
        sample = run_commands([[sys.executable, "-m", module, spec]], log_file,
                              server=server,  # type: ignore[arg-type]
                              stdout=out, cwd=REPO_ROOT)
        return sample, json.loads(out.read_text())

    def blobs_contender(self, server: Server) -> Contender:
        targets = self.blob_targets()
        spec = json.dumps({"base": f"http://{server.host}", "clients": self.options.clients,
                           "seconds": self.options.blob_seconds, "targets": targets})

        def run() -> Sample:
            sample, result = self._run_client("bench.blob_clients", spec, f"blobs-{server.key}",
                                              server)
            if result["errors"] or not result["bytes"]:
                raise BenchFailure(f"{server.label}: {result['errors']} failed requests, "
                                   f"{result['bytes']} bytes")
            sample.extra["gb_s"] = result["bytes"] / result["seconds"] / 1e9
            sample.extra["requests"] = result["requests"]
            return sample

        return Contender(server.key, f"{self.options.clients} clients <- {server.label}",
                         f"{self.options.clients} concurrent aiohttp clients (one process) GET "
                         f"the {len(targets)} biggest layers "
                         f"({', '.join(f'{s / MB:.0f}' for _, s in targets)} MB) again and again "
                         f"for {self.options.blob_seconds:g} s; GB/s of bodies received",
                         server.key != "gapkit", run)

    def curl_contender(self, server: Server) -> Contender:
        """The same 32 transfers in flight from ONE `curl -Z` (C, one thread), as a fixed
        amount of work: each of the 32 slots fetches its layer `repeat` times."""
        targets = self.blob_targets()
        clients = self.options.clients
        mean = sum(size for _, size in targets) / len(targets)
        repeat = max(1, round(self.options.blob_seconds * 1e9 / (clients * mean)))
        jobs = [targets[i % len(targets)] for i in range(clients)] * repeat
        total = sum(size for _, size in jobs)

        def run() -> Sample:
            command = ["curl", "-s", "-Z", "--parallel-max", str(clients),
                       "-w", "%{http_code} %{size_download}\\n"]
            for path, _ in jobs:
                command += ["-o", "/dev/null", f"http://{server.host}{path}"]
            log_file = self.logs.next(f"curl-{server.key}")
            out = log_file.with_suffix(".out")
            sample = run_commands([command], log_file, server=server,  # type: ignore[arg-type]
                                  stdout=out)
            lines = [line.split() for line in out.read_text().splitlines() if line.strip()]
            got = sum(int(size) for code, size in lines if code == "200")
            if len(lines) != len(jobs) or got != total:
                raise BenchFailure(f"{server.label}: curl got {got} of {total} bytes "
                                   f"in {len(lines)} of {len(jobs)} transfers")
            sample.extra["gb_s"] = total / sample.seconds / 1e9
            return sample

        return Contender(server.key, f"curl -Z x{clients} <- {server.label}",
                         f"ONE `curl -Z --parallel-max {clients}` of {len(jobs)} GETs "
                         f"({clients} in flight, each of the {len(targets)} biggest layers "
                         f"{len(jobs) // len(targets)} times: {total / 1e9:.1f} GB) to "
                         "/dev/null; GB/s = bytes / wall time", server.key != "gapkit", run)

    # load: many clients, many small requests

    def load_targets(self) -> list[dict[str, str]]:
        """Every image's top manifest by tag and each manifest by digest (`?ns=UPSTREAM`, as
        containerd asks; docker-registry ignores it), every config and every layer up to
        `LOAD_BLOB_MAX`, each with the digest its body must have."""
        accept = ", ".join(sorted(MANIFEST_MEDIA_TYPES))
        targets: list[dict[str, str]] = []
        seen: set[str] = set()
        for image in self.images:
            upstream = image.name.split("/", 1)[0]
            base = f"/v2/{image.repo}"
            targets.append({"path": f"{base}/manifests/{image.tag}?ns={upstream}",
                            "digest": image.digest, "accept": accept})
            for digest in image.manifests:
                targets.append({"path": f"{base}/manifests/{digest}?ns={upstream}",
                                "digest": digest, "accept": accept})
            for digest, size in image.layers_and_configs.items():
                if size <= LOAD_BLOB_MAX and digest not in seen:
                    seen.add(digest)
                    targets.append({"path": f"{base}/blobs/{digest}?ns={upstream}",
                                    "digest": digest})
        return targets

    def load_contender(self, server: Server) -> Contender:
        targets = self.load_targets()
        clients, seconds = self.options.load_clients, self.options.load_seconds
        spec = json.dumps({"base": f"http://{server.host}", "clients": clients,
                           "seconds": seconds, "targets": targets})

        def run() -> Sample:
            sample, result = self._run_client("tests.support.load", spec, f"load-{server.key}",
                                              server)
            if result["errors"] or not result["requests"]:
                raise BenchFailure(f"{server.label}: {result['errors']} failed of "
                                   f"{result['requests']} requests: {result['error_samples'][:3]}")
            for key in ("rps", "p50_ms", "p99_ms", "max_ms", "requests"):
                sample.extra[key] = result[key]
            return sample

        manifests = sum("/manifests/" in t["path"] for t in targets)
        return Contender(server.key, f"{clients} clients <- {server.label}",
                         f"{clients} concurrent aiohttp clients (one process, keep-alive) GET "
                         f"{len(targets)} targets in turn ({manifests} manifests by tag and "
                         f"digest, {len(targets) - manifests} configs and layers <= "
                         f"{LOAD_BLOB_MAX >> 20} MiB) for {seconds:g} s, every body's digest "
                         "checked; requests/s and latency", server.key != "gapkit", run)

    # push

    def push_gapkit(self, source: Path, key: str, label: str) -> Contender:
        def run() -> Sample:
            with self.copy.fresh_registry() as registry:
                sample = run_commands(
                    [[*self.gapkit, "registry", "push", str(source), "--to", registry.host,
                      "--plain-http", "--json"]], self.logs.next(f"push-{key}"),
                    server=registry)
                verify_registry(registry, self.images)
            return sample

        return Contender(key, label, f"`gapkit registry push {source.name} --to REG "
                         "--plain-http` into a fresh, empty docker-registry", False, run)

    def push_skopeo(self) -> Contender:
        contender = self.copy.push_skopeo(self.images)
        contender.label = f"skopeo x{len(self.images)} from the OCI layout"
        return contender


def check_containerd(ctd: Containerd, images: list[ImageInfo]) -> None:
    """Every image is in containerd under its name, with the source's digest."""
    out = ctd.ctr("image", "ls").stdout.splitlines()
    digests = {}
    for line in out[1:]:
        fields = line.split()
        if len(fields) >= 3:
            digests[fields[0]] = fields[2]
    for image in images:
        if digests.get(image.name) != image.digest:
            raise BenchFailure(f"containerd: {image.name} is {digests.get(image.name)}, "
                               f"the source has {image.digest}")


# -- running and reporting --------------------------------------------------------------------

def run(options: RegistryOptions, setup: Setup) -> int:
    started = time.perf_counter()
    nbytes = setup.workload.unique_bytes()
    bench = RegistryBench(setup, options,
                          int(PREFAULT_FACTOR * nbytes) if options.prefault else 0)
    failures: list[str] = []
    scenarios: list[Scenario] = []
    peaks: dict[str, dict[str, float | None]] = {}
    try:
        bench.prepare()
        gapkit, dist = bench.servers
        scenarios = [
            Scenario("pull", "ctr image pull of every image (fetch + unpack)", nbytes,
                     [bench.ctr_contender(gapkit, "pull"), bench.ctr_contender(dist, "pull")],
                     PULL_TARGET, rounds=options.rounds),
            Scenario("fetch", "ctr content fetch of every image (fetch only)", nbytes,
                     [bench.ctr_contender(gapkit, "fetch"), bench.ctr_contender(dist, "fetch")],
                     PULL_TARGET, rounds=options.rounds),
            Scenario("blobs", f"{options.clients} concurrent clients, biggest blobs", 0,
                     [bench.blobs_contender(gapkit), bench.blobs_contender(dist)],
                     1.0, rounds=options.rounds),
            Scenario("blobs-curl", f"{options.clients} transfers in flight from one curl -Z",
                     0, [bench.curl_contender(gapkit), bench.curl_contender(dist)],
                     1.0, rounds=options.rounds),
            Scenario("push", "push every image into an empty docker-registry", nbytes,
                     [bench.push_gapkit(bench.bundle, "gapkit-bundle",
                                        "gapkit registry push BUNDLE"),
                      bench.push_skopeo(),
                      bench.push_gapkit(setup.workload.images[0].layout, "gapkit-layout",
                                        "gapkit registry push LAYOUT")],
                     PUSH_TARGET, rounds=options.rounds),
            Scenario("load", f"{options.load_clients} clients pulling manifests and small "
                     "blobs", 0, [bench.load_contender(gapkit), bench.load_contender(dist)],
                     None, rounds=options.rounds),
        ]
        scenarios = [s for s in scenarios if s.key in options.only]
        for scenario in scenarios:
            log(f"== {scenario.title}: {scenario.rounds} round(s)")
            for server in bench.servers:
                server.reset_peak()
            run_scenario(scenario, failures)
            if scenario.key != "push":
                peaks[scenario.key] = {s.key: s.peak_rss_mb() for s in bench.servers}
        peaks["end, RSS now"] = {s.key: s.rss_mb() for s in bench.servers}
    except (BenchFailure, OSError, subprocess.SubprocessError, TimeoutError,
            RuntimeError) as exc:
        failures.append(f"setup: {type(exc).__name__}: {exc}")
        log(f"FAILED: {exc}")
    finally:
        bench.stop()
    report: dict[str, Any] = {
        "versions": {**versions(), "containerd": _first_line(["containerd", "--version"])},
        "workload": describe(setup.workload),
        "options": {"size_mb": options.size_mb, "rounds": options.rounds,
                    "smoke": options.smoke, "blob_seconds": options.blob_seconds,
                    "clients": options.clients, "load_seconds": options.load_seconds,
                    "load_clients": options.load_clients, "scenarios": list(options.only)},
        "bundle_mb": bench.bundle.stat().st_size / MB if bench.bundle.exists() else None,
        "peak_rss_from": rss_method(),
        "prefault_mb": bench.prefault_bytes / MB,
        "server_peak_rss_mb": peaks,
        "scenarios": [scenario_json(s) for s in scenarios],
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }
    write_report(report, render(report), as_json=options.as_json, save=options.save)
    log(f"registry bench done in {report['seconds']:.0f} s"
        + (f", {len(failures)} failure(s)" if failures else ""))
    return 1 if failures else 0


def _first_line(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True,
                              check=False).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def _gb_s(sample: Sample) -> float | None:
    return sample.extra.get("gb_s")


def _extra(key: str) -> Callable[[Sample], float | None]:
    return lambda sample: sample.extra.get(key)


def load_json(scenario: Scenario) -> dict[str, Any]:
    """The load scenario: medians of requests/s and latencies; ratios gapkit/peer of each
    (requests/s: higher is better; latency: lower is better)."""
    peer = scenario.peer
    rows = []
    for c in scenario.contenders:
        values = {key: c.median_of(_extra(key))
                  for key in ("rps", "p50_ms", "p99_ms", "max_ms", "requests")}
        ratios = {key: (ratio(values[key], peer.median_of(_extra(key)))
                        if peer is not None and not c.is_peer else None)
                  for key in ("rps", "p50_ms", "p99_ms")}
        rows.append({"key": c.key, "what": c.label, "timed": c.timed, "is_peer": c.is_peer,
                     **values, "ratios": ratios, "cpu_s": c.median("cpu_s"),
                     "server_cpu_s": c.median("server_cpu_s"),
                     "client_peak_rss_mb": c.peak_rss_mb(), "failure": c.failure,
                     "samples": [vars(s) for s in c.samples]})
    return {"key": scenario.key, "title": scenario.title, "target": None, "rows": rows}


def render_load(scenario: dict[str, Any]) -> list[str]:
    out = ["", f"### {scenario['title']} (no target; ratios gapkit/peer)", "",
           "| what | requests/s | p50 ms | p99 ms | max ms | requests | client CPU-s "
           "| server CPU-s | ratio req/s | ratio p50 | ratio p99 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in scenario["rows"]:
        failed = f" FAILED: {row['failure'].splitlines()[0]}" if row["failure"] else ""
        ratios = row["ratios"]
        out.append(
            f"| {row['what']}{failed} | {fmt(row['rps'], '.0f')} | {fmt(row['p50_ms'], '.1f')} "
            f"| {fmt(row['p99_ms'], '.1f')} | {fmt(row['max_ms'], '.0f')} "
            f"| {fmt(row['requests'], '.0f')} | {fmt(row['cpu_s'], '.1f')} "
            f"| {fmt(row['server_cpu_s'], '.1f')} | {fmt(ratios['rps'])} "
            f"| {fmt(ratios['p50_ms'])} | {fmt(ratios['p99_ms'])} |")
    return out


def scenario_json(scenario: Scenario) -> dict[str, Any]:
    if scenario.key == "load":
        return load_json(scenario)
    peer = scenario.peer
    rows = []
    for c in scenario.contenders:
        seconds = c.median()
        gb_s = c.median_of(_gb_s)
        if scenario.key.startswith("blobs"):
            # throughput: higher is better; the ratio is gapkit / peer, target >= 1
            value = ratio(gb_s, peer.median_of(_gb_s)) if peer and not c.is_peer else None
            meets = (value >= scenario.target_ratio
                     if value is not None and scenario.target_ratio else None)
        else:
            value = ratio(seconds, peer.median()) if peer and not c.is_peer else None
            meets = (value <= scenario.target_ratio
                     if value is not None and scenario.target_ratio else None)
        rows.append({
            "key": c.key, "what": c.label, "timed": c.timed, "is_peer": c.is_peer,
            "median_s": seconds, "gb_s": gb_s,
            "mb_s": scenario.nbytes / MB / seconds if seconds and scenario.nbytes else None,
            "cpu_s": c.median("cpu_s"), "server_cpu_s": c.median("server_cpu_s"),
            "client_peak_rss_mb": c.peak_rss_mb(), "ratio": value, "meets_target": meets,
            "failure": c.failure, "samples": [vars(s) for s in c.samples]})
    return {"key": scenario.key, "title": scenario.title, "target": scenario.target_ratio,
            "rows": rows}


def render(report: dict[str, Any]) -> str:
    shape = report["workload"]
    out = [
        "gapkit registry benchmark: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"workload: {shape['images']} images, {shape['unique_layers']} unique layers, "
        f"{shape['unique_mb']} MB unique ({shape['mb_without_sharing']} MB without sharing); "
        f"bundle {fmt(report['bundle_mb'], '.0f')} MB",
        f"medians of {report['options']['rounds']} round(s), taking turns; warm page cache; "
        f"memory touched before each ctr/push run: {report['prefault_mb']:.0f} MB.",
        f"client peak RSS and CPU from: {report['peak_rss_from']}; server CPU from "
        "/proc/PID/stat, server peak RSS from /proc/PID/status VmHWM (reset per scenario).",
    ]
    for scenario in report["scenarios"]:
        if scenario["key"] == "load":
            out += render_load(scenario)
            continue
        blobs = scenario["key"].startswith("blobs")
        sense = ">=" if blobs else "<="
        out += ["", f"### {scenario['title']} (target gapkit/peer {sense} "
                f"{scenario['target']})", "",
                "| what | median s | GB/s | MB/s | client CPU-s | server CPU-s "
                "| client peak RSS MB | ratio | target |",
                "|---|---|---|---|---|---|---|---|---|"]
        for row in scenario["rows"]:
            failed = f" FAILED: {row['failure'].splitlines()[0]}" if row["failure"] else ""
            verdict = {True: "ok", False: "MISSED", None: "-"}[row["meets_target"]]
            out.append(
                f"| {row['what']}{failed} | {'-' if blobs else fmt(row['median_s'])} "
                f"| {fmt(row['gb_s'])} | {fmt(row['mb_s'], '.0f')} | {fmt(row['cpu_s'], '.1f')} "
                f"| {fmt(row['server_cpu_s'], '.1f')} | {fmt(row['client_peak_rss_mb'], '.0f')} "
                f"| {fmt(row['ratio'])} | {verdict} |")
    peaks = report["server_peak_rss_mb"]
    if peaks:
        out += ["", "Server peak RSS MB (VmHWM during each scenario):", "",
                "| scenario | gapkit registry serve | docker-registry |", "|---|---|---|"]
        for key, values in peaks.items():
            out.append(f"| {key} | {fmt(values.get('gapkit'), '.0f')} "
                       f"| {fmt(values.get('distribution'), '.0f')} |")
    out += ["", "What was timed:"]
    for scenario in report["scenarios"]:
        out += [f"- {row['what']}: {row['timed']}" for row in scenario["rows"]]
    if report["failures"]:
        out += ["", "FAILURES:", *report["failures"]]
    return "\n".join(out)
