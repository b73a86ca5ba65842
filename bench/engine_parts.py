"""Where the engine thread's CPU goes per step, with the null sampler of section (i) (``bench.engine_bench``).

``python -m bench.engine_parts --jobs 512 --seconds 5`` keeps N sequential jobs live on a real
:class:`models.engine.SequentialEngine` over the :class:`bench.engine_bench.NullSampler` and wraps the engine's step
parts with ``time.thread_time`` (CPU time of the calling thread: the engine thread's own work, not waiting): admission
(``JobTable.admit_many``), allocation (``JobTable.allocate``), the count update (``JobTable.land``), the policy
decisions (``DecisionTables.decide``), the certificates of finished jobs (``models.decisions.certificates``) inside
answering them (``SequentialEngine._answer``), and resolving futures (their done callbacks included), in the engine
thread only. Printed per step (per landed batch; warm-up included). The wrappers add a few microseconds per call; compare parts with each other, and use section
(i) for the totals.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

PARTS = [("models.jobs", "JobTable", "admit_many", "admission"), ("models.jobs", "JobTable", "allocate", "allocation"),
         ("models.jobs", "JobTable", "land", "count update"), ("models.decisions", "DecisionTables", "decide", "policy"),
         ("models.engine", None, "certificates", "certificates"),
         ("models.engine", "SequentialEngine", "_answer", "answers (certificates included)"),
         ("models.engine", None, "resolve_futures", "futures and their callbacks")]


def wrap_parts(cpu: collections.Counter, calls: collections.Counter) -> None:
    """Replace each part with a wrapper that adds the calling thread's CPU time to ``cpu[label]``."""
    import importlib

    for module_name, owner_name, attr, label in PARTS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        inner = getattr(owner, attr)

        def timed(*args, _inner=inner, _label=label, **kwargs):
            if threading.current_thread().name != "certserve-engine":  # e.g. the watcher's answers at the stop
                return _inner(*args, **kwargs)
            c0 = time.thread_time()
            try:
                return _inner(*args, **kwargs)
            finally:
                cpu[_label] += time.thread_time() - c0
                calls[_label] += 1

        setattr(owner, attr, timed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    cpu, calls = collections.Counter(), collections.Counter()
    wrap_parts(cpu, calls)
    from bench.engine_bench import run_null

    row = run_null(args.jobs, "sequential", args.batch_size, args.seconds, args.seed)
    steps = calls["count update"]  # one per landed batch, warm-up included, as the parts' totals
    print(f"{args.jobs} live sequential jobs, batch {args.batch_size}: {row['samples_per_s'] / 1e6:.2f} M samples/s, "
          f"engine thread CPU {row['cpu_ms']:.2f} ms/step, {row['decided_per_step']:.0f} policy evaluations/step, "
          f"mean batch {row['mean_batch']:,.0f}")
    print("| part | CPU ms/step | calls/step |\n|---|---|---|")
    for _, _, _, label in PARTS:
        print(f"| {label} | {1e3 * cpu[label] / steps:.3f} | {calls[label] / steps:.2f} |")


if __name__ == "__main__":
    main()
