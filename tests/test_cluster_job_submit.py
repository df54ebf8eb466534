"""`ray job submit --working-dir . -- visionflow run` against a real head started with `ray start --head`.

The head is its own cluster (own ports, own temp dir, own token), independent of the test session's
in-process `ray_cluster`; the fixture stops exactly the processes it started (their process group).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from multinode import free_port

from pipelines.ray_runtime import RAY_START_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the head's dashboard did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(request):
    """A head node with token auth, as a user starts one: `RAY_AUTH_MODE=token ray start --head`; 4 CPUs,
    or what ``@pytest.mark.parametrize("ray_head", [N], indirect=True)`` asks for. One for the module's
    tests of each size."""
    cpus = getattr(request, "param", 4)
    tmp = Path(tempfile.mkdtemp(prefix="vfhead-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = uuid.uuid4().hex
    (tmp / "token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not the session cluster's
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"), PATH=f"{BIN}:{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1", **RAY_START_ENV)
    flags = ("--dashboard-port", "--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--node-manager-port", "--object-manager-port")
    ports = {flag: free_port() for flag in flags}  # never the same port twice
    dashboard = ports["--dashboard-port"]
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(cpus), "--dashboard-host", "127.0.0.1",
           "--temp-dir", str(tmp / "r"), "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    log = tmp / "head.log"
    # Its own session: stopping it kills this process group, never other Ray clusters on the machine
    # (`ray stop` would stop every one of them).
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(url, token, proc, log)
        yield SimpleNamespace(url=url, env=env, token=token, log=log)
    finally:
        # `ray start --block` takes SIGTERM as "stop the node" but does not exit for 30 s and more; the
        # cluster is a throwaway, so it gets a few seconds and then SIGKILL with everything it started.
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers the raylet started share the group
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_submit_without_the_token_is_refused(ray_head):
    env = {**ray_head.env, "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}
    r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head.url], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


def _submit_run(ray_head, run_dir, archs: str, sets: list[str], timeout: int) -> tuple[int, str]:
    """`ray job submit --working-dir . -- visionflow run` of the quickstart, without deploy; (rc, output)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head.url, "--working-dir", ".", "--",
           "visionflow", "run", "--config", "pipelines/configs/quickstart.yaml", "--run-dir", str(run_dir),
           "--archs", archs, "--no-deploy"] + [x for s in sets for x in ("--set", s)]
    # The head's dashboard answers before its node's job agent is up; a submit in between is refused with
    # "No available agent to submit job, please try again later" (Ray waits 10 s for the agent; on a busy
    # machine it took longer) and nothing is submitted, so it is tried again, as Ray's message asks.
    for _ in range(4):
        r = subprocess.run(cmd, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or "No available agent to submit job" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    return r.returncode, r.stdout + r.stderr


def test_job_submit_runs_the_quickstart_at_a_tiny_scale(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = _submit_run(ray_head, run_dir, "squeezenet1_1,resnet18", [
        "data.synth={images: 12, size: 48}", "train.max_parallel=1",
        "train.defaults={epochs: 1, batch_size: 8, cpus_per_worker: 0.5, augment_cpus: 0.25}",
        "train.per_task={classification: {image_size: 32}}"], timeout=900)
    assert rc == 0, out[-4000:]
    assert "succeeded" in out and "everything finished" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed"] == []
    assert [(a["arch"], a["status"]) for a in summary["archs"]] == [("squeezenet1_1", "done"), ("resnet18", "done")]
    for arch in ("squeezenet1_1", "resnet18"):
        assert (run_dir / f"archs/{arch}/eval/metrics.json").is_file()
    # One lane, so both trained in one Ray Train run (pipelines.train.lane), each with its own record.
    lanes = {json.loads((run_dir / f"archs/{a}/train/_stage.json").read_text())["outputs"].get("lane")
             for a in ("squeezenet1_1", "resnet18")}
    assert len(lanes) == 1 and None not in lanes, lanes
    assert (run_dir / "compare/report.md").is_file()
    assert "Uploading package gcs://_ray_pkg_" in out  # the job ran from the uploaded working dir


@pytest.mark.slow
@pytest.mark.parametrize("ray_head", [2], indirect=True)
def test_job_submit_to_a_laptop_sized_head_fits_the_run_to_it(ray_head, tmp_path):
    """Two architectures on a 2-CPU head: before, both trainings held every CPU and their Ray Data
    pipelines waited forever. Now one lane fits (1 worker x 1 CPU + 1 CPU for its data) and both finish."""
    run_dir = tmp_path / "run"
    rc, out = _submit_run(ray_head, run_dir, "resnet18,ssdlite_mobilenet_v3", [
        "data.synth={images: 12, size: 64}", "train.defaults={epochs: 1, batch_size: 4}",
        "train.per_task={classification: {image_size: 32}, detection: {image_size: 64}}"], timeout=1500)
    assert rc == 0, out[-4000:]
    assert "1 at once (each up to 2 CPU; cluster 2 CPU)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed"] == [] and len(summary["archs"]) == 2
