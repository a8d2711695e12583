"""`python -m bench copy [--size-mb 1000] [--rounds 3] [--jobs N ...] [--big-layer-mb 0] [--smoke]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCENARIOS = ("pull", "push", "layout", "startup", "big", "sweep")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    copy = commands.add_parser(
        "copy", help="gapkit copy against skopeo copy (registry <-> OCI layout)",
        description="gapkit copy against skopeo copy, per shared/BENCHMARKS.md. Generates its "
        "workload and starts its own registries on loopback, in a temp folder it removes.")
    copy.add_argument("--size-mb", type=float, default=1000,
                      help="MB of unique layers in the 12-image workload (default 1000)")
    copy.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    copy.add_argument("--jobs", type=int, nargs="+", default=[2, 4, 6, 8, 12], metavar="N",
                      help="--jobs values to sweep (default 2 4 6 8 12)")
    copy.add_argument("--big-layer-mb", type=int, default=0, metavar="MiB",
                      help="also copy one image of one layer this big (e.g. 1024), for peak RSS")
    copy.add_argument("--big-rounds", type=int, default=1, help="rounds of the big-layer runs")
    copy.add_argument("--only", default=",".join(SCENARIOS),
                      help=f"comma-separated scenarios out of {','.join(SCENARIOS)} (default: all)")
    copy.add_argument("--smoke", action="store_true",
                      help="~20 MB, 1 round, no sweep, no floors: a check that runs in seconds")
    copy.add_argument("--no-floors", action="store_true",
                      help="skip measuring this machine's hashing/transfer/disk floors")
    copy.add_argument("--profile", type=Path, metavar="DIR",
                      help="also run one cProfile'd pull and push (one process); stats into DIR")
    copy.add_argument("--json", action="store_true", help="print the results as JSON")
    copy.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON results here")
    copy.add_argument("--keep", action="store_true", help="keep the temp folder (for debugging)")
    copy.add_argument("--tmp", type=Path, help="make the temp folder here")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.big_rounds < 1 or any(j < 1 for j in args.jobs):
        parser.error("--rounds, --big-rounds and --jobs take positive numbers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from bench.copy_bench import Options
    from bench.copy_bench import main as copy_main

    return copy_main(Options(
        size_mb=args.size_mb, rounds=args.rounds, jobs=args.jobs, big_layer_mb=args.big_layer_mb,
        big_rounds=args.big_rounds, smoke=args.smoke, as_json=args.json, keep=args.keep,
        floors=not args.no_floors, only=set(args.only.split(",")), profile=args.profile,
        tmp=args.tmp, save=args.save))


if __name__ == "__main__":
    sys.exit(main())
