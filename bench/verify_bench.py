"""`python -m bench verify`: `gapkit bundle verify` against `sha256sum` of the same bytes.

One invocation sets up the workload and a registry (bench/common.py), builds one images-only
bundle of all 12 images with `gapkit bundle create` (not timed), extracts the bundle's blob
members once into a folder (not timed), and reads the bundle and the extracted files once, so
every timed run finds them in the page cache. Then, for several rounds, taking turns:

- `gapkit bundle verify --json BUNDLE`: hashes every blob member in place (one thread per
  core), walks every image, checks bundle.json. Its `--json` report also gives its own time
  from opening the bundle to the end (no interpreter start-up, imports or exit), recorded as
  the in-process time.
- `sha256sum --quiet --strict -c LIST` over the extracted blob files: the same bytes, checked
  against the digests their names carry. One process (one core), and two processes, each on
  half of the bytes (split by size), for two cores.
- hashlib on two threads over the extracted files, in this process: the hashing floor.
- `gapkit version`: the fixed cost of any gapkit run (interpreter, imports, exit).

GB/s is the blob bytes (10^9 bytes per GB) over the median time. The target (from the issue):
`gapkit bundle verify` at 2 GB/s or more, warm, on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchFailure,
    BenchOptions,
    Contender,
    Logs,
    Sample,
    Scenario,
    Setup,
    bundle_create_command,
    check_archive,
    fmt,
    gapkit_command,
    hash_files,
    log,
    ratio,
    read_through,
    require_tools,
    rss_method,
    run_commands,
    run_scenario,
    versions,
    workload_setup,
    write_report,
)
from bench.workload import MB, describe

#: `gapkit bundle verify`, warm, two cores (GB/s, 10^9 bytes).
TARGET_GB_S = 2.0
GB = 1e9


#: verify reads a warm cache and writes nothing, so `prefault` does not apply to it.
VerifyOptions = BenchOptions


def main(options: VerifyOptions) -> int:
    if options.smoke:
        options.apply_smoke()
    if not require_tools("skopeo", "docker-registry", "sha256sum", "tar"):
        return 2
    with workload_setup(options.size_mb, tmp=options.tmp, keep=options.keep) as setup:
        return run(options, setup)


def _split_by_size(files: list[Path], parts: int) -> list[list[Path]]:
    """Biggest first into the part with the fewest bytes so far: parts of about equal bytes."""
    bins: list[list[Path]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for path in sorted(files, key=lambda p: -p.stat().st_size):
        smallest = totals.index(min(totals))
        bins[smallest].append(path)
        totals[smallest] += path.stat().st_size
    return bins


def _checklist(path: Path, files: list[Path]) -> Path:
    """A `sha256sum -c` list: each blob file's expected digest is its name."""
    path.write_text("".join(f"{f.name}  {f}\n" for f in files))
    return path


def run(options: VerifyOptions, setup: Setup) -> int:
    started = time.perf_counter()
    folder = setup.tmp / "verify"
    logs = Logs(folder / "logs")
    gapkit = gapkit_command()
    images = setup.workload.images
    failures: list[str] = []

    bundle = folder / "bundle.tar"
    log("building the bundle with `gapkit bundle create` (not timed)")
    made = run_commands([bundle_create_command(gapkit, images, setup.source.host,
                                               folder / "cache", bundle)],
                        logs.next("bundle-create"), server=setup.source)
    log(f"bundle {bundle.stat().st_size / MB:.1f} MB in {made.seconds:.2f} s")
    shutil.rmtree(folder / "cache", ignore_errors=True)
    check_archive(bundle, images, ("gapkit/bundle.json",))

    extracted = folder / "extracted"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(extracted), "blobs"], check=True)
    files = sorted(p for p in (extracted / "blobs").rglob("*") if p.is_file())
    nbytes = sum(p.stat().st_size for p in files)
    whole = _checklist(folder / "all.sha256", files)
    halves = [_checklist(folder / f"half-{i}.sha256", part)
              for i, part in enumerate(_split_by_size(files, 2))]
    os.sync()
    read_through([bundle, *files])  # warm: every timed run reads from the page cache
    log(f"{len(files)} blob members, {nbytes / MB:.1f} MB, extracted to {extracted} and read once")

    def gapkit_verify() -> Sample:
        log_file = logs.next("verify-gapkit")
        out = log_file.with_suffix(".json")
        sample = run_commands([[*gapkit, "bundle", "verify", "--json", str(bundle)]], log_file,
                              stdout=out)
        report = json.loads(out.read_text())
        if not report.get("ok") or report.get("blob_bytes") != nbytes:
            raise BenchFailure(f"gapkit bundle verify: ok={report.get('ok')}, "
                               f"blob_bytes={report.get('blob_bytes')} (expected {nbytes}): "
                               f"{report.get('problems')}")
        sample.extra["in_process_s"] = float(report["seconds"])
        return sample

    def sha256sum_one() -> Sample:
        return run_commands([["sha256sum", "--quiet", "--strict", "-c", str(whole)]],
                            logs.next("verify-sha256sum"))

    def sha256sum_two() -> Sample:
        script = ('sha256sum --quiet --strict -c "$1" & first=$!; '
                  'sha256sum --quiet --strict -c "$2" || exit 1; wait "$first"')
        return run_commands([["sh", "-c", script, "sh", str(halves[0]), str(halves[1])]],
                            logs.next("verify-sha256sum-2"))

    def floor() -> Sample:
        cpu = time.process_time()
        seconds = hash_files(files, 2)
        return Sample(seconds, time.process_time() - cpu, None)

    def startup() -> Sample:
        return run_commands([[*gapkit, "version"]], logs.next("gapkit-version"))

    contenders = [
        Contender("gapkit", "gapkit bundle verify", "`gapkit bundle verify --json BUNDLE` "
                  "(hashes the blob members in place, one thread per core; walks the images; "
                  "checks bundle.json)", False, gapkit_verify),
        Contender("sha256sum", "sha256sum, 1 process",
                  "`sha256sum --quiet --strict -c LIST` of the extracted blob files", True,
                  sha256sum_one),
        Contender("sha256sum-2", "sha256sum, 2 processes",
                  "two `sha256sum -c` at once, each on half of the bytes", True, sha256sum_two),
        Contender("floor", "hashlib, 2 threads (floor)",
                  "hashlib.sha256 on 2 threads, 1 MiB reads, in the benchmark's process", True,
                  floor),
        Contender("startup", "gapkit version", "`gapkit version`: interpreter, imports, exit",
                  False, startup),
    ]
    scenario = Scenario("verify", "bundle verify, warm page cache", nbytes, contenders,
                        rounds=options.rounds)
    log(f"== {scenario.title}: {scenario.rounds} round(s)")
    run_scenario(scenario, failures)

    rows = verify_rows(contenders, nbytes)
    summary = verify_summary(contenders, nbytes)
    report: dict[str, Any] = {
        "versions": versions(),
        "workload": describe(setup.workload),
        "options": {"size_mb": options.size_mb, "rounds": options.rounds, "smoke": options.smoke},
        "bundle_bytes": bundle.stat().st_size,
        "blob_members": len(files),
        "blob_bytes": nbytes,
        "method": "warm page cache (bundle and extracted files read once before timing); "
                  "gapkit reads the bundle in place, sha256sum and the floor the extracted "
                  "blob files: the same bytes",
        "peak_rss_from": rss_method(),
        "contenders": [c.to_json() for c in contenders],
        "rows": rows,
        "summary": summary,
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }
    write_report(report, render(report), as_json=options.as_json, save=options.save)
    log(f"verify bench done in {report['seconds']:.0f} s"
        + (f", {len(failures)} failure(s)" if failures else ""))
    return 1 if failures else 0


def verify_rows(contenders: list[Contender], nbytes: int) -> list[dict[str, Any]]:
    by_key = {c.key: c for c in contenders}
    gapkit = by_key["gapkit"]
    gapkit_s = gapkit.median()
    in_process = gapkit.median_of(lambda s: s.extra.get("in_process_s"))
    overhead = gapkit.median_of(
        lambda s: s.seconds - s.extra["in_process_s"] if "in_process_s" in s.extra else None)

    def row(label: str, timed: str, seconds: float | None, contender: Contender | None,
            hashes: bool = True) -> dict[str, Any]:
        return {"what": label, "timed": timed, "median_s": seconds,
                "gb_s": nbytes / GB / seconds if seconds and hashes else None,
                "gapkit_over_this": gapkit_s / seconds if gapkit_s and seconds and hashes else None,
                "peak_rss_mb": contender.peak_rss_mb() if contender else None,
                "cpu_s": contender.median("cpu_s") if contender else None,
                "failure": contender.failure if contender else None}

    rows = [row(gapkit.label + " (CLI, wall)", gapkit.timed, gapkit_s, gapkit),
            row("gapkit bundle verify, in-process", "its own `seconds` (--json): open, hash, "
                "walk; no start-up", in_process, None),
            row("gapkit start-up + exit", "CLI wall minus in-process", overhead, None, False)]
    for key in ("startup", "sha256sum", "sha256sum-2", "floor"):
        c = by_key[key]
        rows.append(row(c.label, c.timed, c.median(), c, key != "startup"))
    return rows


def verify_summary(contenders: list[Contender], nbytes: int) -> dict[str, Any]:
    by_key = {c.key: c for c in contenders}
    gapkit_s = by_key["gapkit"].median()
    in_process = by_key["gapkit"].median_of(lambda s: s.extra.get("in_process_s"))
    floor_s = by_key["floor"].median()
    cli_gb_s = nbytes / GB / gapkit_s if gapkit_s else None
    return {
        "gapkit_gb_s": cli_gb_s,
        "gapkit_in_process_gb_s": nbytes / GB / in_process if in_process else None,
        "floor_gb_s": nbytes / GB / floor_s if floor_s else None,
        "target_gb_s": TARGET_GB_S,
        "meets_target": cli_gb_s >= TARGET_GB_S if cli_gb_s is not None else None,
        "gapkit_over_sha256sum": ratio(gapkit_s, by_key["sha256sum"].median()),
        "gapkit_over_sha256sum_2": ratio(gapkit_s, by_key["sha256sum-2"].median()),
        "gapkit_over_floor": ratio(gapkit_s, floor_s),
        "in_process_over_floor": ratio(in_process, floor_s),
        "gapkit_peak_rss_mb": by_key["gapkit"].peak_rss_mb(),
    }


def render(report: dict[str, Any]) -> str:
    shape = report["workload"]
    summary = report["summary"]
    out = [
        f"gapkit bundle verify benchmark: "
        f"{', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        f"bundle of {shape['images']} images: {report['blob_members']} blob members, "
        f"{report['blob_bytes'] / MB:.1f} MB of blobs ({report['bundle_bytes'] / MB:.1f} MB tar)",
        f"medians of {report['options']['rounds']} round(s), taking turns; {report['method']}.",
        f"peak RSS (MB = 10^6 bytes) and CPU from: {report['peak_rss_from']}.",
        "",
        "| what | median s | GB/s | gapkit CLI / this | peak RSS MB | CPU-s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        failed = f" FAILED: {row['failure'].splitlines()[0]}" if row["failure"] else ""
        out.append(f"| {row['what']}{failed} | {fmt(row['median_s'], '.3f')} | {fmt(row['gb_s'])} "
                   f"| {fmt(row['gapkit_over_this'])} | {fmt(row['peak_rss_mb'], '.0f')} "
                   f"| {fmt(row['cpu_s'])} |")
    verdict = {True: "ok", False: "MISSED", None: "-"}[summary["meets_target"]]
    out += [
        "",
        f"gapkit bundle verify: {fmt(summary['gapkit_gb_s'])} GB/s end to end "
        f"(target >= {summary['target_gb_s']:g}: {verdict}), "
        f"{fmt(summary['gapkit_in_process_gb_s'])} GB/s in-process; "
        f"hashing floor on 2 threads {fmt(summary['floor_gb_s'])} GB/s "
        f"(CLI {fmt(summary['gapkit_over_floor'])}x the floor's time, in-process "
        f"{fmt(summary['in_process_over_floor'])}x); "
        f"gapkit/sha256sum {fmt(summary['gapkit_over_sha256sum'])} (1 process), "
        f"{fmt(summary['gapkit_over_sha256sum_2'])} (2 processes); "
        f"peak RSS {fmt(summary['gapkit_peak_rss_mb'], '.0f')} MB.",
        "",
        "What was timed:",
        *(f"- {c['label']}: {c['timed']}" for c in report["contenders"]),
    ]
    if report["failures"]:
        out += ["", "FAILURES:", *report["failures"]]
    return "\n".join(out)
