"""The ``certserve`` command: one dispatcher, subcommands registered by the package that owns them."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certserve", description="Certified robustness (randomized smoothing) server")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark and write its report under docs/")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from bench import smoothing_bench

    smoothing_bench.add_arguments(bench_sub.add_parser("smoothing", help="statistics core: update rate, samples to decision"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.bench == "smoothing":
        from bench import smoothing_bench

        return smoothing_bench.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
