"""The ``certserve`` command root: one dispatcher; each package registers the subcommands it owns.

This is the only module that imports both the product (``server``, ``certification``) and the offline pipeline
(``calibration``) and the development benchmarks (``bench``); none of them imports it, nor each other.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certserve", description="Certified robustness (randomized smoothing) server")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark and write its report under docs/")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from bench import smoothing_bench

    sb = bench_sub.add_parser("smoothing", help="statistics core: update rate, samples to decision")
    smoothing_bench.add_arguments(sb)
    sb.set_defaults(func=smoothing_bench.run)
    from bench import server_bench

    sv = bench_sub.add_parser("server", help="worker efficiency, HTTP latency, certificates/s, auto mode, cold start")
    server_bench.add_arguments(sv)
    sv.set_defaults(func=server_bench.run)
    from bench import ray_bench  # imports no Ray itself: it runs `certserve serve --replicas 2` as a subprocess

    rb = bench_sub.add_parser("ray", help="Ray Serve (2 replicas) vs one process: added latency, certificates/s")
    ray_bench.add_arguments(rb)
    rb.set_defaults(func=ray_bench.run)

    from server.client import add_certify_command
    from server.serve import add_serve_command

    add_serve_command(sub)
    add_certify_command(sub)
    from certification.commands import add_keys_command, add_verify_command

    add_keys_command(sub)
    add_verify_command(sub)

    from calibration.cli import add_bundle_commands, add_calibrate_commands

    add_calibrate_commands(sub)
    add_bundle_commands(sub)
    return parser


def exit_on_sigterm_as_init() -> None:
    """As PID 1 (the image runs ``certserve serve`` in exec form, without an init), the kernel drops every signal whose
    action is the default: a SIGTERM before uvicorn installs its handler (imports, bundle verification, warm-up:
    seconds) was ignored, the server came up regardless, and ``docker stop`` (or Kubernetes) waited its whole timeout
    and killed it (exit 137). Here it ends the process as it would any other one (128 + 15), until a command
    installs its own handler (uvicorn's drain, Ray's)."""
    if os.getpid() == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm_as_init()  # first: the imports below take a while
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["certserve", *(sys.argv[1:] if argv is None else argv)])  # for provenance records
    from models.bundle import BundleError

    try:
        return int(args.func(args) or 0)
    except (BundleError, OSError, ValueError) as exc:  # OSError: any path a flag names (missing, not a directory,
        # not writable, a full disk), not only a missing one
        print(f"certserve: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    """The error on one line: a pydantic ValidationError (the settings: each field with its CERTSERVE_ variable) as
    'field: message; ...' instead of its multi-line dump with a documentation link."""
    errors = getattr(exc, "errors", None)
    if not (callable(errors) and type(exc).__name__ == "ValidationError"):
        return " ".join(str(exc).split("\n"))
    title = getattr(exc, "title", "value")

    def where(loc) -> str:
        name = ".".join(str(x) for x in loc)
        return "" if not name else f"{name} (CERTSERVE_{name.upper()}): " if title == "Settings" else f"{name}: "

    return f"invalid {title.lower()}: " + "; ".join(where(e["loc"]) + e["msg"].removeprefix("Value error, ")
                                                    for e in errors())


if __name__ == "__main__":
    sys.exit(main())
