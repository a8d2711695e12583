"""`python -m bench bundle`: `gapkit bundle create` against skopeo fetching the same 12 images.

One invocation sets up the workload and a registry (bench/common.py). Then, for several
rounds, taking turns, every destination fresh and made and removed outside the timer, with a
`sync(2)` before each timed run:

- gapkit, cold cache: `gapkit bundle create --no-snaps --image ... (x12) --mirror
  UPSTREAM=http://REG ... --platform linux/amd64 --platform linux/arm64 --cache EMPTY -o
  BUNDLE`. It fetches every blob straight into the bundle, which it writes in the cache's
  `partial/` folder, fsyncs and renames onto BUNDLE. The run is timed to the command's end; a
  `sync(2)` after it is timed apart and reported as "+ sync" (it has little left to write).
- gapkit, warm cache: the same with a cache whose record names a bundle of the same images
  built once before the first round and kept: every blob is taken from that bundle (checked
  on the way) instead of the registry. This is what the cache saves.
- skopeo -> one OCI layout + sync: 12 x `skopeo copy --all docker://REG/IMAGE oci:DIR:NAME`,
  then `sync(2)` (the copy benchmark's pull; durable output against durable output).
- skopeo -> layout, tar, sync: the same, then `tar -cf` of the layout into one file (one file
  to carry, as a bundle is), then `sync(2)`.
- skopeo -> one oci-archive per image + sync: 12 x `skopeo copy --all docker://REG/IMAGE
  oci-archive:FILE:NAME`, then `sync(2)`. skopeo cannot put several images into one archive,
  so this is 12 files, shared layers in each (1.1 GB instead of 1 GB); skopeo builds each in
  a temp folder first.

Every result is checked: each image named by its source digest, every blob at its size, and
bundle.json in gapkit's bundles. The target (from the issue): bundle create within the copy
targets, at most 0.6x skopeo's durable registry -> layout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PREFAULT_FACTOR,
    RSS_TARGET_MB,
    BenchOptions,
    Contender,
    Logs,
    Sample,
    Scenario,
    Setup,
    bundle_create_command,
    check_archive,
    fmt,
    fresh_folder,
    log,
    ratio,
    require_tools,
    rss_method,
    run_commands,
    run_scenario,
    versions,
    workload_setup,
    write_report,
)
from bench.copy_bench import Bench
from bench.workload import MB, ImageInfo, describe

#: gapkit bundle create / skopeo registry -> layout + sync.
TARGET_RATIO = 0.6
BUNDLE_MEMBERS = ("gapkit/bundle.json",)


BundleOptions = BenchOptions


def main(options: BundleOptions) -> int:
    if options.smoke:
        options.apply_smoke()
    if not require_tools("skopeo", "docker-registry", "tar"):
        return 2
    with workload_setup(options.size_mb, tmp=options.tmp, keep=options.keep) as setup:
        return run(options, setup)


class BundleBench:
    """The contenders: gapkit cold and warm, and the three skopeo forms."""

    def __init__(self, setup: Setup, prefault_bytes: int = 0) -> None:
        self.setup = setup
        self.folder = setup.tmp / "bundle"
        self.prefault_bytes = prefault_bytes
        self.copy = Bench(setup.tmp, setup.workload, setup.source, self.folder / "logs",
                          prefault_bytes)
        self.logs: Logs = self.copy.logs
        self.images = setup.workload.images
        self.host = setup.source.host
        self.warm_cache = self.folder / "warm-cache"
        #: The bundle built before the warm runs, which their cache records and they reuse.
        self.warm_source = self.folder / "warm-source.tar"

    def _create(self, cache: Path, output: Path) -> list[str]:
        return bundle_create_command(self.copy.gapkit, self.images, self.host, cache, output)

    def _gapkit_run(self, key: str, cache: Path | None) -> Sample:
        """One timed `gapkit bundle create`; `cache` None: a fresh, empty one."""
        with fresh_folder(self.folder / key, self.prefault_bytes) as work:
            log_file = self.logs.next(key)
            out = log_file.with_suffix(".json")
            bundle = work / "bundle.tar"
            sample = run_commands([self._create(cache or work / "cache", bundle)], log_file,
                                  sync_apart=True, server=self.setup.source, stdout=out)
            check_archive(bundle, self.images, BUNDLE_MEMBERS)
            fetched = json.loads(out.read_text())["fetched"]
            sample.extra["fetched_mb"] = fetched["bytes_copied"] / MB
            sample.extra["bundle_mb"] = bundle.stat().st_size / MB
        return sample

    def gapkit_cold(self) -> Contender:
        return Contender(
            "gapkit-cold", "gapkit bundle create, empty cache",
            "`gapkit bundle create --no-snaps --image ... (x12) --mirror UPSTREAM=http://REG "
            "--platform linux/amd64 --platform linux/arm64 --cache EMPTY -o BUNDLE` (bundle "
            "written in the cache, fsynced and renamed; a sync(2) after it is timed apart)",
            False, lambda: self._gapkit_run("gapkit-cold", None))

    def gapkit_warm(self) -> Contender:
        def run() -> Sample:
            if not self.warm_cache.exists():
                log("building the bundle the warm runs reuse (not timed)")
                run_commands([self._create(self.warm_cache, self.warm_source)],
                             self.logs.next("fill-cache"), sync=True)
            return self._gapkit_run("gapkit-warm", self.warm_cache)

        return Contender(
            "gapkit-warm", "gapkit bundle create, warm cache",
            "the same command with a cache that records a bundle of the same images, built "
            "before the first round and kept: every blob comes from it, none from the "
            "registry", False, run)

    def skopeo_layout(self) -> Contender:
        contender = self.copy.pull_skopeo(self.images)
        contender.key, contender.label = "skopeo-layout", "skopeo x12 -> one layout + sync"
        return contender

    def _skopeo_pull(self, image: ImageInfo, destination: str) -> list[str]:
        return self.copy.skopeo_copy(f"docker://{self.host}/{image.repo_path}", destination,
                                     plain_src=True)

    def skopeo_layout_tar(self) -> Contender:
        def run() -> Sample:
            with fresh_folder(self.folder / "skopeo-tar", self.prefault_bytes) as work:
                layout, tar = work / "layout", work / "images.tar"
                commands = [self._skopeo_pull(i, f"oci:{layout}:{i.name}") for i in self.images]
                commands.append(["tar", "-cf", str(tar), "-C", str(layout), "."])
                sample = run_commands(commands, self.logs.next("skopeo-layout-tar"), sync=True,
                                      server=self.setup.source)
                check_archive(tar, self.images)
                sample.extra["bundle_mb"] = tar.stat().st_size / MB
            return sample

        return Contender("skopeo-layout-tar", "skopeo x12 -> layout, tar, sync",
                         "12 x `skopeo copy --all docker://REG/IMAGE oci:DIR:NAME`, then "
                         "`tar -cf FILE -C DIR .`, then sync(2)", True, run)

    def skopeo_archives(self) -> Contender:
        def run() -> Sample:
            with fresh_folder(self.folder / "skopeo-archives", self.prefault_bytes) as work:
                files = [work / f"{n:02d}.tar" for n in range(len(self.images))]
                sample = run_commands(
                    [self._skopeo_pull(i, f"oci-archive:{f}:{i.name}")
                     for i, f in zip(self.images, files, strict=True)],
                    self.logs.next("skopeo-archives"), sync=True, server=self.setup.source)
                for image, file in zip(self.images, files, strict=True):
                    check_archive(file, [image])
                sample.extra["bundle_mb"] = sum(f.stat().st_size for f in files) / MB
            return sample

        return Contender("skopeo-archives", "skopeo x12 -> 12 oci-archives + sync",
                         "12 x `skopeo copy --all docker://REG/IMAGE oci-archive:FILE:NAME` "
                         "(one file per image, shared layers in each), then sync(2)", True, run)


def run(options: BundleOptions, setup: Setup) -> int:
    started = time.perf_counter()
    nbytes = setup.workload.unique_bytes()
    bench = BundleBench(setup, int(PREFAULT_FACTOR * nbytes) if options.prefault else 0)
    failures: list[str] = []
    contenders = [bench.gapkit_cold(), bench.skopeo_layout(), bench.gapkit_warm(),
                  bench.skopeo_layout_tar(), bench.skopeo_archives()]
    scenario = Scenario("bundle", "12 images, registry -> one file", nbytes, contenders,
                        TARGET_RATIO, rounds=options.rounds)
    try:
        log(f"== {scenario.title}: {scenario.rounds} round(s)")
        run_scenario(scenario, failures)
    finally:
        bench.copy.stop_all()
    report: dict[str, Any] = {
        "versions": versions(),
        "workload": describe(setup.workload),
        "options": {"size_mb": options.size_mb, "rounds": options.rounds, "smoke": options.smoke},
        "durability": "gapkit's bundle is fsynced before its rename; its time is to the "
                      "command's end, and '+ sync' adds a sync(2) after it (the cache's small "
                      "record). Every skopeo run is timed to the end of a sync(2) after its "
                      "last command",
        "peak_rss_from": rss_method(),
        "prefault_mb": bench.prefault_bytes / MB,
        "contenders": [c.to_json() for c in contenders],
        "rows": bundle_rows(contenders, nbytes),
        "ratios": bundle_ratios(contenders),
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }
    write_report(report, render(report), as_json=options.as_json, save=options.save)
    log(f"bundle bench done in {report['seconds']:.0f} s"
        + (f", {len(failures)} failure(s)" if failures else ""))
    return 1 if failures else 0


def _with_sync(sample: Sample) -> float | None:
    return sample.seconds + sample.extra["sync_s"] if "sync_s" in sample.extra else None


def bundle_rows(contenders: list[Contender], nbytes: int) -> list[dict[str, Any]]:
    rows = []
    for c in contenders:
        seconds = c.median()
        rows.append({
            "key": c.key, "what": c.label, "median_s": seconds,
            "median_with_sync_s": c.median_of(_with_sync),
            "mb_s": nbytes / MB / seconds if seconds else None,
            "peak_rss_mb": c.peak_rss_mb(), "cpu_s": c.median("cpu_s"),
            "registry_cpu_s": c.median("server_cpu_s"),
            "fetched_mb": c.median_of(lambda s: s.extra.get("fetched_mb")),
            "output_mb": c.median_of(lambda s: s.extra.get("bundle_mb")),
            "failure": c.failure,
        })
    return rows


def bundle_ratios(contenders: list[Contender]) -> list[dict[str, Any]]:
    """gapkit (cold, cold + sync, warm) over each skopeo form."""
    peers = [c for c in contenders if c.is_peer]
    out = []
    for c in contenders:
        if c.is_peer:
            continue
        forms = [(c.label, c.median())]
        if c.key == "gapkit-cold":
            forms.append((c.label + " + sync", c.median_of(_with_sync)))
        for label, seconds in forms:
            ratios = {p.key: ratio(seconds, p.median()) for p in peers}
            durable = ratios.get("skopeo-layout")
            out.append({"gapkit": label, "ratios": ratios, "target": TARGET_RATIO,
                        "meets_target": durable <= TARGET_RATIO if durable is not None else None})
    return out


def render(report: dict[str, Any]) -> str:
    shape = report["workload"]
    out = [
        f"gapkit bundle create benchmark: "
        f"{', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        f"workload: {shape['images']} images, {shape['unique_layers']} unique layers, "
        f"{shape['unique_mb']} MB unique ({shape['mb_without_sharing']} MB without sharing)",
        f"medians of {report['options']['rounds']} round(s), taking turns; warm page cache; "
        "fresh destination every run.",
        f"durability: {report['durability']}.",
        f"memory touched before each timed run (bench.common.prefault): "
        f"{report['prefault_mb']:.0f} MB.",
        f"peak RSS (MB = 10^6 bytes) and CPU from: {report['peak_rss_from']}.",
        "",
        "| what | median s | + sync s | MB/s | peak RSS MB | CPU-s | registry CPU-s "
        "| fetched MB | output MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        failed = f" FAILED: {row['failure'].splitlines()[0]}" if row["failure"] else ""
        rss = row["peak_rss_mb"]
        over = " (over)" if rss is not None and rss > RSS_TARGET_MB else ""
        out.append(
            f"| {row['what']}{failed} | {fmt(row['median_s'])} | {fmt(row['median_with_sync_s'])} "
            f"| {fmt(row['mb_s'], '.0f')} | {fmt(rss, '.0f')}{over} | {fmt(row['cpu_s'], '.1f')} "
            f"| {fmt(row['registry_cpu_s'], '.1f')} | {fmt(row['fetched_mb'], '.0f')} "
            f"| {fmt(row['output_mb'], '.0f')} |")
    peers = [c for c in report["contenders"] if c["is_peer"]]
    out += ["", "Ratios gapkit / skopeo (target: <= "
            f"{TARGET_RATIO} of skopeo -> layout + sync):", "",
            "| gapkit | " + " | ".join(f"/ {p['label']}" for p in peers) + " | target |",
            "|---|" + "---|" * len(peers) + "---|"]
    for item in report["ratios"]:
        verdict = {True: "ok", False: "MISSED", None: "-"}[item["meets_target"]]
        out.append(f"| {item['gapkit']} | "
                   + " | ".join(fmt(item["ratios"].get(p["key"])) for p in peers)
                   + f" | {verdict} |")
    out += ["", "What was timed:", *(f"- {c['label']}: {c['timed']}" for c in report["contenders"])]
    if report["failures"]:
        out += ["", "FAILURES:", *report["failures"]]
    return "\n".join(out)

