"""benchmarks/ray_step_overhead.py: its CPU accounting and its timed steps."""
import subprocess
import sys
import time

from benchmarks.ray_step_overhead import _cpu_seconds, time_steps


def test_cpu_of_other_processes_counts_a_busy_child_and_not_this_process():
    import os

    me = os.getpid()
    before = _cpu_seconds(me)
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    t = time.time()
    while time.time() - t < 1.0:  # this process is as busy
        pass
    child.wait()
    assert _cpu_seconds(me) - before >= 0.7  # the child's second counts, under this process once reaped
    # ... and this process's own CPU does not: leaving out no process adds exactly this one's
    own = os.times()
    assert abs(_cpu_seconds(-1) - _cpu_seconds(me) - (own.user + own.system)) < 0.2


def test_time_steps_reports_each_rounds_seconds_per_step():
    got = time_steps(rounds=2, steps=1, threads=1)
    assert len(got["seconds_per_step"]) == 2 and all(0 < s < 60 for s in got["seconds_per_step"])
    assert got["other_processes_cores"] >= 0
