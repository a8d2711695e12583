"""gapkit's benchmarks: `python -m bench copy ...` (see bench/README.md and shared/BENCHMARKS.md)."""
