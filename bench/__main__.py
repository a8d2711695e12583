"""gapkit's benchmarks against its peers (see bench/README.md and shared/BENCHMARKS.md).

    python -m bench copy   [--size-mb 1000] [--rounds 3] [--jobs N ...] [--big-layer-mb 0] [--smoke]
    python -m bench verify [--size-mb 1000] [--rounds 3] [--smoke]
    python -m bench bundle [--size-mb 1000] [--rounds 3] [--smoke]
    python -m bench registry [--size-mb 1000] [--rounds 3] [--blob-seconds 5] [--smoke]
    python -m bench load   [--size-mb 100] [--rounds 3] [--load-seconds 5] [--load-clients 64]
    python -m bench smoke  (the smoke of copy, verify, bundle and registry on one workload, for CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCENARIOS = ("pull", "push", "layout", "startup", "big", "sweep")
PREFAULT_HELP = ("do not touch 2.5x the workload's bytes of page cache before each timed run "
                 "(on VMs that hand freed memory back to the host, runs then depend on what "
                 "ran before; see bench/README.md)")


def _common(parser: argparse.ArgumentParser, smoke_help: str | None = None) -> None:
    if smoke_help is not None:
        parser.add_argument("--size-mb", type=float, default=1000,
                            help="MB of unique layers in the 12-image workload (default 1000)")
        parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
        parser.add_argument("--smoke", action="store_true", help=smoke_help)
        parser.add_argument("--json", action="store_true", help="print the results as JSON")
        parser.add_argument("--save", type=Path, metavar="FILE",
                            help="also write the JSON results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (for debugging)")
    parser.add_argument("--tmp", type=Path, help="make the temp folder here")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    copy = commands.add_parser(
        "copy", help="gapkit copy against skopeo copy (registry <-> OCI layout)",
        description="gapkit copy against skopeo copy, per shared/BENCHMARKS.md. Generates its "
        "workload and starts its own registries on loopback, in a temp folder it removes.")
    _common(copy, "~20 MB, 1 round, no sweep, no floors: a check that runs in seconds")
    copy.add_argument("--jobs", type=int, nargs="+", default=[2, 4, 6, 8, 12], metavar="N",
                      help="--jobs values to sweep (default 2 4 6 8 12)")
    copy.add_argument("--big-layer-mb", type=int, default=0, metavar="MiB",
                      help="also copy one image of one layer this big (e.g. 1024), for peak RSS")
    copy.add_argument("--big-rounds", type=int, default=1, help="rounds of the big-layer runs")
    copy.add_argument("--only", default=",".join(SCENARIOS),
                      help=f"comma-separated scenarios out of {','.join(SCENARIOS)} (default: all)")
    copy.add_argument("--no-floors", action="store_true",
                      help="skip measuring this machine's hashing/transfer/disk floors")
    copy.add_argument("--profile", type=Path, metavar="DIR",
                      help="also run one cProfile'd pull and push (one process); stats into DIR")
    copy.add_argument("--no-prefault", action="store_true", help=PREFAULT_HELP)
    verify = commands.add_parser(
        "verify", help="gapkit bundle verify against sha256sum of the same bytes",
        description="Builds a bundle of the workload with gapkit bundle create, then times "
        "gapkit bundle verify against sha256sum (1 and 2 processes) of the extracted blob "
        "files and hashlib on 2 threads (the floor), warm page cache.")
    _common(verify, "~20 MB, 1 round: a check that runs in seconds")
    bundle = commands.add_parser(
        "bundle", help="gapkit bundle create against skopeo (+ sync)",
        description="gapkit bundle create (empty cache, and warm cache) against skopeo "
        "copying the same 12 images into one layout + sync, into a layout then one tar + "
        "sync, and into one oci-archive per image + sync.")
    _common(bundle, "~20 MB, 1 round: a check that runs in seconds")
    bundle.add_argument("--no-prefault", action="store_true", help=PREFAULT_HELP)
    registry = commands.add_parser(
        "registry", help="gapkit registry serve/push against docker-registry and skopeo",
        description="ctr pull / content fetch of every image from gapkit registry serve and "
        "from docker-registry holding the same images, 32 concurrent blob clients against "
        "each, and gapkit registry push against skopeo copy into an empty docker-registry.")
    _common(registry, "~20 MB, 1 round, 1 s blob runs: a check that runs in seconds")
    registry.add_argument("--blob-seconds", type=float, default=5.0,
                          help="seconds of each 32-client blob run (default 5)")
    registry.add_argument("--clients", type=int, default=32,
                          help="concurrent blob clients (default 32)")
    registry.add_argument("--no-prefault", action="store_true", help=PREFAULT_HELP)
    load = commands.add_parser(
        "load", help="gapkit registry serve under load against docker-registry",
        description="Many concurrent clients (one process of their own) pull every image's "
        "manifests, configs and small layers from gapkit registry serve and from "
        "docker-registry holding the same images, for a fixed time each, taking turns: "
        "requests/s and p50/p99 latency, and the ratios gapkit/peer. The registry "
        "benchmark's `load` scenario alone, on a smaller workload.")
    _common(load, "~20 MB, 1 round, 1 s runs: a check that runs in seconds")
    load.set_defaults(size_mb=100)
    for sub in (registry, load):
        sub.add_argument("--load-seconds", type=float, default=5.0,
                            help="seconds of each load run (default 5)")
        sub.add_argument("--load-clients", type=int, default=64,
                            help="concurrent clients of the load runs (default 64)")
    smoke = commands.add_parser(
        "smoke",
        help="the smoke runs of copy, verify, bundle and registry on one small workload (CI)",
        description="Runs `copy --smoke`, `verify --smoke`, `bundle --smoke` and `registry "
        "--smoke` on one ~20 MB workload and registry. Exit 0 unless something fails (speed "
        "targets do not count).")
    _common(smoke)
    args = parser.parse_args(argv)
    if args.command == "copy":
        unknown = set(args.only.split(",")) - set(SCENARIOS)
        if unknown:
            parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
        if args.big_rounds < 1 or any(j < 1 for j in args.jobs):
            parser.error("--big-rounds and --jobs take positive numbers")
    if getattr(args, "rounds", 1) < 1:
        parser.error("--rounds takes a positive number")
    return args


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """The `BenchOptions` fields every benchmark's flags give."""
    return {"size_mb": args.size_mb, "rounds": args.rounds, "smoke": args.smoke,
            "as_json": args.json, "keep": args.keep, "tmp": args.tmp, "save": args.save,
            "prefault": not getattr(args, "no_prefault", False)}


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.command == "copy":
        from bench.copy_bench import Options
        from bench.copy_bench import main as copy_main

        return copy_main(Options(
            **_shared(args), jobs=args.jobs, big_layer_mb=args.big_layer_mb,
            big_rounds=args.big_rounds, floors=not args.no_floors,
            only=set(args.only.split(",")), profile=args.profile))
    if args.command == "verify":
        from bench.verify_bench import VerifyOptions
        from bench.verify_bench import main as verify_main

        return verify_main(VerifyOptions(**_shared(args)))
    if args.command == "bundle":
        from bench.bundle_bench import BundleOptions
        from bench.bundle_bench import main as bundle_main

        return bundle_main(BundleOptions(**_shared(args)))
    if args.command == "registry":
        from bench.registry_bench import RegistryOptions
        from bench.registry_bench import main as registry_main

        return registry_main(RegistryOptions(
            **_shared(args), blob_seconds=args.blob_seconds, clients=args.clients,
            load_seconds=args.load_seconds, load_clients=args.load_clients))
    if args.command == "load":
        from bench.registry_bench import RegistryOptions
        from bench.registry_bench import main as registry_main

        return registry_main(RegistryOptions(
            **_shared(args), load_seconds=args.load_seconds, load_clients=args.load_clients,
            only=("load",)))
    return smoke(args.tmp, args.keep)


def smoke(tmp: Path | None, keep: bool) -> int:
    """copy, verify, bundle and registry smoke runs on one shared workload and registry."""
    from bench import bundle_bench, copy_bench, registry_bench, verify_bench
    from bench.common import log, require_tools, workload_setup

    if not require_tools("skopeo", "docker-registry", "sha256sum", "tar", "containerd", "ctr"):
        return 2
    started = time.perf_counter()
    copy_options = copy_bench.Options(smoke=True, floors=False)
    verify_options = verify_bench.VerifyOptions(smoke=True)
    bundle_options = bundle_bench.BundleOptions(smoke=True)
    registry_options = registry_bench.RegistryOptions(smoke=True)
    for options in (copy_options, verify_options, bundle_options, registry_options):
        options.apply_smoke()
    results: list[tuple[str, int, float]] = []
    with workload_setup(copy_options.size_mb, tmp=tmp, keep=keep) as setup:
        parts: list[tuple[str, Callable[[], int]]] = [
            ("copy", lambda: copy_bench.run(copy_options, setup)),
            ("verify", lambda: verify_bench.run(verify_options, setup)),
            ("bundle", lambda: bundle_bench.run(bundle_options, setup)),
            ("registry", lambda: registry_bench.run(registry_options, setup))]
        for name, run in parts:
            log(f"==== smoke: {name}")
            part = time.perf_counter()
            results.append((name, run(), time.perf_counter() - part))
            print()
    code = max(code for _, code, _ in results)
    log("smoke: " + ", ".join(f"{name} {'ok' if code == 0 else f'FAILED (exit {code})'} in "
                              f"{seconds:.1f} s" for name, code, seconds in results)
        + f"; {time.perf_counter() - started:.1f} s in all")
    return code


if __name__ == "__main__":
    sys.exit(main())
