"""Run every side-by-side benchmark, one after another (`make bench`), then regenerate docs/benchmarks.md.

Each benchmark runs as its own process, ``python -m benchmarks.NAME`` at its default size, so that its
results file records its own command and one that fails (or exits) does not stop the others. Before each,
this waits until the 1-minute load average is at most half the cores (the previous benchmark's load has
to fade: a benchmark started on a loaded machine prints its figures but refuses to write them,
``benchmarks/provenance.py``), at most ``--settle`` seconds. Pass names to run some of them:
``python -m benchmarks.run_all nms serve_load``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks import provenance

# The benchmarks that measure against a baseline at their default size. Not here: gpu_check (`make
# gpu-check`), stage_profile and detection_diagnosis (they read a run directory you name), report (run last).
BENCHMARKS = ("adversarial_cost", "coco_eval", "data_throughput", "detection_quality", "detection_vs_reference",
              "nms", "ray_step_overhead", "roi_align", "serve_load", "train_overhead", "train_quality")


def wait_for_idle(settle_s: float, poll_s: float = 10.0) -> float:
    """Wait until the 1-minute load average is at most half the cores, at most ``settle_s`` seconds;
    returns the load average it ended at."""
    limit, deadline = provenance.load_limit(), time.monotonic() + settle_s
    load = os.getloadavg()[0]
    while load > limit and time.monotonic() < deadline:
        print(f"  waiting for the load average ({load:.2f}) to fall to {limit:g}", flush=True)
        time.sleep(poll_s)
        load = os.getloadavg()[0]
    return load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all: {', '.join(BENCHMARKS)})")
    p.add_argument("--settle", type=float, default=300.0,
                   help="seconds to wait at most for the machine to be idle before each benchmark (default 300)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"run_all: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in args.names or BENCHMARKS:
        print(f"=== benchmarks.{name}", flush=True)
        wait_for_idle(args.settle)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        if rc != 0:  # one benchmark failing must not hide the others' figures
            failed.append(name)
        print(f"=== benchmarks.{name}: {'exit ' + str(rc) if rc else 'done'} ({time.perf_counter() - start:.0f}s)",
              flush=True)
    rc = subprocess.call([sys.executable, "-m", "benchmarks.report"])
    if failed:
        print("failed:", ", ".join(failed), flush=True)
    return 1 if failed or rc else 0


if __name__ == "__main__":
    raise SystemExit(main())
