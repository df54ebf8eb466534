"""benchmarks/ray_step_overhead.py: its CPU accounting and its timed steps."""
import subprocess
import sys
import time

from benchmarks.ray_step_overhead import _cpu_seconds, time_steps


def test_cpu_of_other_processes_counts_a_busy_child_and_not_this_process():
    import os

    before = _cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    t = time.time()
    while time.time() - t < 1.0:  # this process is as busy, and must not count
        pass
    child.wait()
    used = _cpu_seconds(os.getpid()) - before
    assert 0.7 <= used < 1.6, used  # the child's second (and the machine's little else), not this one's too


def test_time_steps_reports_each_rounds_seconds_per_step():
    got = time_steps(rounds=2, steps=1, threads=1)
    assert len(got["seconds_per_step"]) == 2 and all(0 < s < 60 for s in got["seconds_per_step"])
    assert got["other_processes_cores"] >= 0
