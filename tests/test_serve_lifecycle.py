"""`visionflow serve` starts and stops cleanly: a config bigger than the cluster fails at once, deploying has
a deadline, Ctrl-C at any moment (start-up included) ends the command within 10 s and removes what it
deployed, and on a shared cluster only visionflow's application is removed."""
from __future__ import annotations

import argparse
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

from multinode import free_port

from pipelines.commands import serve as serve_cmd


def _config(path, port: int, model: dict) -> str:
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "visionflow", "route_prefix": "/", "import_path": "pipelines.serve.app:build_app",
                             "args": {"models": [{"name": "det", "task": "detection", "arch": "ssdlite_mobilenet_v3",
                                                  "num_classes": 3, "image_size": 64, "random_weights": True,
                                                  "model": model}],
                                      "preprocess": {"num_cpus": 0.1}, "postprocess": {"num_cpus": 0.1},
                                      "nms_stage": {"num_cpus": 0.1}, "ingress": {"num_cpus": 0.1}}}]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _args(**kw):
    base = {"config": None, "checkpoint": None, "random_weights": False, "host": None, "port": None,
            "address": None, "dashboard": False, "timeout": 300.0}
    return argparse.Namespace(**{**base, **kw})


def _apps() -> dict:
    from ray import serve

    return {name: getattr(a.status, "value", a.status) for name, a in serve.status().applications.items()}


def test_a_config_bigger_than_the_cluster_fails_at_once_naming_what_to_shrink(ray_cluster, tmp_path):
    cfg = _config(tmp_path / "big.yaml", free_port(), {"num_cpus": 3, "num_replicas": 2})
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    assert serve_cmd.serve_until(threading.Event(), _args(config=cfg), out, err) == 1
    lines = err.getvalue().splitlines()  # the failure on the error stream, one line; progress on out
    assert len(lines) == 1 and "starting" in out.getvalue(), (lines, out.getvalue())
    # 2 x 3 for the detector, 0.1 each for the NMS stage and the Ingress (pre/postprocess run inside it).
    assert "asks for 6.2 CPUs but the cluster has 4" in lines[0] and "models[det].model (2 replica(s) x 3 CPU)" in lines[0]
    assert time.monotonic() - t0 < 20


def test_deploying_has_a_deadline_and_a_missed_one_removes_the_app(ray_cluster, tmp_path):
    cfg = _config(tmp_path / "slow.yaml", free_port(), {"num_cpus": 0.2})
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    assert serve_cmd.serve_until(threading.Event(), _args(config=cfg, timeout=1.0), out, err) == 1
    assert "not running after 1s (--timeout)" in err.getvalue(), (out.getvalue(), err.getvalue())
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 60
    while "visionflow" in _apps() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "visionflow" not in _apps()


def test_stopping_on_a_shared_cluster_removes_only_visionflows_application(ray_cluster, tmp_path):
    from ray import serve

    from pipelines.ray_private import running_serve_http

    # Serve's HTTP options are cluster-wide: join the Serve an earlier test left running, if any.
    running = running_serve_http()
    port = running[1] if running else free_port()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Other:
        def __call__(self, request):
            return "still here"

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Other.bind(), name="other", route_prefix="/other")
    try:
        cfg = _config(tmp_path / "shared.yaml", port, {"num_cpus": 0.2})
        stop, out, rc = threading.Event(), io.StringIO(), {}
        t = threading.Thread(target=lambda: rc.setdefault("rc", serve_cmd.serve_until(stop, _args(config=cfg), out)),
                             daemon=True)
        t.start()
        deadline = time.monotonic() + 240
        while "Ctrl-C" not in out.getvalue() and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Ctrl-C" in out.getvalue(), out.getvalue()
        assert set(_apps()) == {"visionflow", "other"}
        stop.set()
        t.join(60)
        assert rc["rc"] == 0
        assert "visionflow" not in _apps() and _apps()["other"] == "RUNNING"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30) as r:
            assert r.read() == b"still here"
    finally:
        serve.delete("other")


def _started_at(output: str) -> float | None:
    """When Ray's log line says the local cluster was up (its timestamp is this machine's local time)."""
    import datetime

    for line in output.splitlines():
        if "Started a local Ray instance" in line:
            stamp = line.split("\t")[0].strip()
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("moment", ["starting", "deploying"])
def test_ctrl_c_during_start_up_stops_within_10s_and_leaves_nothing(tmp_path, moment):
    """The real command in its own process group with its own local cluster; SIGINT at a random moment of
    start-up: while Ray starts, or while the replicas are being placed."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "serve", "--random-weights", "--no-dashboard",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert "starting" in first, first
        if moment == "starting":
            time.sleep(random.uniform(0.5, 3.0))
        else:  # the cluster is up once its raylet runs in this group; then the deployment is under way
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                    "raylet" in (open(f"/proc/{p}/comm").read() if os.path.exists(f"/proc/{p}/comm") else "")
                    for p in _group_pids(proc.pid)):
                time.sleep(0.2)
            time.sleep(random.uniform(1.0, 4.0))
        assert proc.poll() is None, proc.stdout.read()
        t0, sent = time.monotonic(), time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        took, ended = time.monotonic() - t0, time.time()
        rest = proc.stdout.read()
        # Ray's start cannot be interrupted: Ctrl-C while the local cluster starts ends the command within
        # 10 s of the cluster being up (Ray's "Started a local Ray instance" line), else of the Ctrl-C.
        up = _started_at(rest)
        assert ended - max(sent, up or 0.0) < 10, (took, up, sent, rest)
        assert took < 20, (took, rest)
        assert proc.returncode in (0, 130), rest
        assert "stopped" in rest and "Traceback" not in rest, rest
        # Its cluster went with it: no process of its group is left (raylet, GCS, replicas).
        deadline = time.monotonic() + 20
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(proc.pid), _group_pids(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    pids.append(int(d))
            except ProcessLookupError:
                pass
    return pids
