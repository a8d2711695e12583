"""What every benchmark in bench/ shares: the setup (temp folder, workload, source registry),
running and measuring commands, contenders taking turns, the hashing floor, and checks.

The rules are shared/BENCHMARKS.md's: peer and gapkit run in the same invocation, alternating,
several rounds; medians and the ratio gapkit/peer; peak RSS beside the time; the physical
floors. Everything a benchmark starts is stopped, and its temp folder removed, at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.workload import (
    MB,
    ImageInfo,
    MiB,
    Workload,
    build_workload,
    describe,
    push_workload,
)
from tests.support.peers import Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Peak RSS above this is flagged in the tables (the issue's memory target).
RSS_TARGET_MB = 100.0


class BenchFailure(Exception):
    """A run failed, or its result was wrong."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def require_tools(*tools: str) -> bool:
    """Whether every tool is on PATH; says which is not (exit code 2 for the caller)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    for tool in missing:
        print(f"bench: {tool} is not installed (see bench/README.md)", file=sys.stderr)
    return not missing


# -- running and measuring commands ---------------------------------------------------------------

@dataclass
class BenchOptions:
    """What every benchmark takes; each adds its own fields in a subclass."""

    size_mb: float = 1000
    rounds: int = 3
    smoke: bool = False
    as_json: bool = False
    keep: bool = False
    tmp: Path | None = None
    save: Path | None = None
    #: Touch memory before each timed run (`prefault`).
    prefault: bool = True

    def apply_smoke(self) -> None:
        """`--smoke`: ~20 MB, 1 round: a check that everything runs, in seconds."""
        self.size_mb, self.rounds = min(self.size_mb, 20), 1


@dataclass
class Sample:
    """One timed run of one contender."""

    seconds: float
    #: user + system CPU of the tool's own processes (not the registry's).
    cpu_s: float
    #: The largest peak RSS of any of the tool's processes (None: not a process of its own).
    peak_rss_mb: float | None
    #: CPU the registry used meanwhile (when a registry takes part).
    server_cpu_s: float | None = None
    #: Other numbers of this run (e.g. `sync_s`, a tool's own report of its time).
    extra: dict[str, float] = field(default_factory=dict)


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
                 sync_apart: bool = False, server: Registry | None = None,
                 cwd: Path | None = None, stdout: Path | None = None) -> Sample:
    """Run `commands` one after another (then `sync(2)` when asked); time them as one.

    `sync_apart` runs `sync(2)` after the timer stops and records its time as
    `extra["sync_s"]`, for a tool that makes some of its output durable and leaves the rest.
    `stdout` sends the commands' standard output to that file instead of the log.
    Peak RSS and CPU come from GNU time around each process (from `wait4` without it); for a
    shell that runs several processes they cover the shell and every child it waited for.
    """
    server_pid = server.process.pid if server is not None and server.process is not None else None
    server_before = _proc_cpu_s(server_pid) if server_pid else 0.0
    cpu = 0.0
    rss_kib = 0
    usage_file = log_file.with_suffix(".time")
    extra: dict[str, float] = {}
    with open(log_file, "ab") as out, open(stdout or os.devnull, "wb") as captured:
        start = time.perf_counter()
        for command in commands:
            wrapped = ([TIME, "-f", "%U %S %M", "-o", str(usage_file), *command] if TIME
                       else command)
            proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL,
                                    stdout=captured if stdout else out, stderr=out, cwd=cwd)
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
    if sync_apart:
        start = time.perf_counter()
        os.sync()
        extra["sync_s"] = time.perf_counter() - start
    server_cpu = _proc_cpu_s(server_pid) - server_before if server_pid else None
    return Sample(seconds, cpu, rss_kib * 1024 / MB, server_cpu, extra)


def gapkit_command() -> list[str]:
    """The installed `gapkit` script, called directly (a pyenv shim would add ~0.1 s a run)."""
    beside = Path(sys.executable).parent / "gapkit"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("gapkit")
    return [found] if found else [sys.executable, "-c", "from gapkit.cli import main; main()"]


class Logs:
    """Numbered log files, one per run, in the temp folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.runs = 0

    def next(self, key: str) -> Path:
        self.runs += 1
        return self.folder / f"{self.runs:03d}-{key}.log"


# -- contenders taking turns ----------------------------------------------------------------

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

    def median_of(self, value: Callable[[Sample], float | None]) -> float | None:
        values = [v for v in map(value, self.samples) if v is not None]
        return statistics.median(values) if values else None

    def peak_rss_mb(self) -> float | None:
        return max((s.peak_rss_mb for s in self.samples if s.peak_rss_mb is not None),
                   default=None)

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "label": self.label, "timed": self.timed,
                "is_peer": self.is_peer, "median_s": self.median(),
                "median_cpu_s": self.median("cpu_s"),
                "median_server_cpu_s": self.median("server_cpu_s"),
                "peak_rss_mb": self.peak_rss_mb(), "failure": self.failure,
                "samples": [vars(s) for s in self.samples]}


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
            rss = f", peak RSS {sample.peak_rss_mb:.0f} MB" if sample.peak_rss_mb is not None else ""
            extra = "".join(f", {k} {v:.2f}" for k, v in sample.extra.items())
            round_text = f" round {round_no + 1}/{scenario.rounds}" if scenario.rounds > 1 else ""
            log(f"{scenario.key}{round_text} {contender.label}: "
                f"{sample.seconds:.2f} s, {sample.cpu_s:.1f} CPU-s{rss}{server}{extra}")


# -- the setup: workload and source registry ------------------------------------------------------

@dataclass
class Setup:
    """A temp folder holding the workload's layout and a registry that serves it."""

    tmp: Path
    workload: Workload
    source: Registry


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def compile_gapkit() -> None:
    """Byte-compile gapkit once, as `pip install` does. With PYTHONDONTWRITEBYTECODE set (as on
    these machines) an editable install would otherwise compile every module at every start,
    and each gapkit run would pay for it."""
    import compileall

    import gapkit

    compileall.compile_dir(str(Path(gapkit.__file__).parent), quiet=1)


@contextmanager
def workload_setup(size_mb: float, *, big_layer_mb: int = 0, tmp: Path | None = None,
                   keep: bool = False) -> Iterator[Setup]:
    """Generate the workload, start a registry on loopback and push the workload into it.

    On leaving (also on failure, Ctrl-C or SIGTERM) the registry is stopped by its PID and the
    temp folder removed, unless `keep`.
    """
    compile_gapkit()
    folder = Path(tempfile.mkdtemp(prefix="gapkit-bench-", dir=tmp))
    source = Registry(folder / "src-registry")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        log(f"workload: {size_mb:g} MB"
            + (f" + one {big_layer_mb} MiB layer" if big_layer_mb else "") + f" in {folder}")
        started = time.perf_counter()
        workload = build_workload(folder / "src-layout", size_mb, big_layer_mb)
        shape = describe(workload)
        log(f"generated {shape['images']} images, {shape['unique_layers']} unique layers, "
            f"{shape['unique_mb']} MB unique ({shape['mb_without_sharing']} MB without sharing) "
            f"in {time.perf_counter() - started:.1f} s")
        source.start()
        started = time.perf_counter()
        push_workload(workload, source)
        os.sync()  # setup's dirty pages are written back now, not during the timed runs
        log(f"pushed the workload into the source registry {source.host} with skopeo "
            f"in {time.perf_counter() - started:.1f} s")
        yield Setup(folder, workload, source)
    finally:
        signal.signal(signal.SIGTERM, previous)
        source.stop()
        if keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def registry_hosts(images: list[ImageInfo]) -> list[str]:
    """The upstream registries the workload's names point at (docker.io, registry.k8s.io)."""
    return sorted({image.name.split("/", 1)[0] for image in images})


def platforms_of(images: list[ImageInfo]) -> list[str]:
    return sorted({p for image in images for p in image.platforms})


def bundle_create_command(gapkit: list[str], images: list[ImageInfo], registry: str,
                          cache: Path, output: Path) -> list[str]:
    """`gapkit bundle create` of every image (all platforms), images only, from `registry`
    (plain HTTP) as the mirror of each image's upstream, so the bundle names them as the
    workload does (`docker.io/calico/cni:v3.28.1`). Prints bundle.json and fetch counts."""
    command = [*gapkit, "bundle", "create", "--json", "--no-snaps"]
    for image in images:
        command += ["--image", image.name]
    for upstream in registry_hosts(images):
        command += ["--mirror", f"{upstream}=http://{registry}"]
    command += ["--plain-http", registry]
    for name in platforms_of(images):
        command += ["--platform", name]
    return [*command, "--cache", str(cache), "--output", str(output)]


#: Page cache to touch before each timed run that writes, per byte of the workload (see
#: `prefault`): more than any contender writes (a bundle and its cache, skopeo's temp folder
#: and archives: about 2.2x the workload).
PREFAULT_FACTOR = 2.5


def prefault(folder: Path, nbytes: int) -> None:
    """Write `nbytes` of page cache in `folder` and delete it again, just before a timed run.

    On these VMs (virtio-balloon with free page reporting), memory the guest frees goes back
    to the host about 2 s later, and the next write into the page cache faults each page in
    again: writing 1 GB of new data took 0.17 s of kernel time right after a delete and
    0.4-0.65 s after a 5 s pause, and a cold `bundle create` varied from 2.7 to 6.5 s with the
    same user CPU. Touching more memory than the run will write, and freeing it just before
    the timer starts, gives every contender the same start: free memory the host backs. The
    file is deleted before anything writes it back, so the disk does no work for it.
    """
    if nbytes <= 0:
        return
    chunk = bytes(MiB)
    path = folder / ".bench-prefault"
    try:
        with open(path, "wb", buffering=0) as f:
            for _ in range(-(-nbytes // MiB)):
                f.write(chunk)
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def fresh_folder(path: Path, prefault_bytes: int = 0) -> Iterator[Path]:
    """An empty folder, made and removed outside the timer, with nothing left to write back
    (`sync(2)`) when the timed run starts, and `prefault_bytes` of memory just touched."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()
    prefault(path.parent, prefault_bytes)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the hashing floor ------------------------------------------------------------------------

def hash_files(paths: list[Path], threads: int = 2) -> float:
    """Seconds to sha256 `paths` with hashlib on `threads` threads, 1 MiB reads, biggest file
    first (the GIL is released while hashing): the hashing floor of these bytes."""

    def hash_some(files: list[Path]) -> None:
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    digest.update(chunk)

    ordered = sorted(paths, key=lambda p: -p.stat().st_size)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(hash_some, [ordered[i::threads] for i in range(threads)]))
    return time.perf_counter() - start


def read_through(paths: list[Path]) -> None:
    """Read files once, so that what follows finds them in the page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


# -- checking results -------------------------------------------------------------------------

def check_archive(path: Path, images: list[ImageInfo], members: tuple[str, ...] = ()) -> None:
    """An OCI archive names each image by its source digest and holds every blob it needs at
    the right size, plus `members` (e.g. `gapkit/bundle.json`). Reads headers only."""
    try:
        with tarfile.open(path, "r:") as tar:
            files = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            sizes = {name: member.size for name, member in files.items()}
            index = tar.extractfile(files["index.json"]) if "index.json" in files else None
            if index is None:
                raise BenchFailure(f"{path}: no index.json")
            doc = json.loads(index.read())
    except (tarfile.TarError, KeyError) as exc:
        raise BenchFailure(f"{path}: not a whole OCI archive ({exc})") from None
    names: dict[str, str] = {}
    for entry in doc.get("manifests", []):
        notes = entry.get("annotations") or {}
        name = notes.get("io.containerd.image.name") or notes.get("org.opencontainers.image.ref.name")
        if name:
            names[name] = entry["digest"]
    for member in members:
        if member not in sizes:
            raise BenchFailure(f"{path}: member {member} is missing")
    for image in images:
        if names.get(image.name) != image.digest:
            raise BenchFailure(f"{path}: {image.name} is {names.get(image.name)}, "
                               f"the source has {image.digest}")
        for digest, size in image.blobs.items():
            got = sizes.get("blobs/" + digest.replace(":", "/", 1))
            if got != size:
                raise BenchFailure(f"{path}: blob {digest} of {image.name} is "
                                   f"{'missing' if got is None else f'{got} bytes, not {size}'}")


# -- reporting --------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True,
                                  check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "gapkit"])
    from gapkit import __version__
    return {"gapkit": f"{__version__} ({commit}{'+changes' if dirty not in ('', '?') else ''})",
            "skopeo": first_line(["skopeo", "--version"]),
            "docker-registry": first_line(["docker-registry", "--version"]),
            "python": platform.python_version(), "cpus": str(os.cpu_count())}


def write_report(report: dict[str, object], text: str, *, as_json: bool,
                 save: Path | None) -> None:
    if save is not None:
        save.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(text)
