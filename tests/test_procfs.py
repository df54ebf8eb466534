"""``pipelines.procfs`` on real processes: a child of this test, running, a zombie, then gone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from pipelines import procfs

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux's /proc")


def test_a_child_read_from_proc_while_running_as_a_zombie_and_gone(tmp_path):
    # A program whose name holds a space and a parenthesis: /proc/PID/stat puts it in parentheses.
    odd = tmp_path / "odd) name"
    shutil.copy(sys.executable, odd)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "VF_PROCFS_PROBE": "a=b"})
    try:
        assert child.pid in procfs.pids()
        assert procfs.parent(child.pid) == os.getpid() and procfs.alive(child.pid)
        assert procfs.program(child.pid) == str(odd)
        assert procfs.environ_value(child.pid, "VF_PROCFS_PROBE") == "a=b"
        assert procfs.environ_value(child.pid, "VF_PROCFS_NOT_SET") is None
        assert child.pid in procfs.children(os.getpid()) and child.pid in procfs.children(1)
        assert procfs.children(child.pid) == [] and 1_000_000 < procfs.rss_bytes(child.pid) < 1_000_000_000
        child.kill()
        deadline = time.monotonic() + 10
        while procfs.alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procfs.alive(child.pid)  # exited; not yet reaped, it is a zombie
        assert procfs.parent(child.pid) == os.getpid()
    finally:
        child.kill()
        child.wait()
    assert child.pid not in procfs.pids() and not procfs.alive(child.pid)
    assert procfs.parent(child.pid) is None and procfs.program(child.pid) is None
    assert procfs.rss_bytes(child.pid) == 0 and child.pid not in procfs.children(os.getpid())
    assert procfs.environ_value(child.pid, "VF_PROCFS_PROBE") is None
