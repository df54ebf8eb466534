"""How visionflow reaches Ray (``pipelines/ray_runtime.py``), with a real second cluster on the machine: a
``ray start --head`` as users start one, then killed with ``kill -9`` to leave its stale address behind."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import procfs
from pipelines.ray_runtime import RayUnreachable, reap_outlived, wait_reachable

RAY = str(Path(sys.executable).with_name("ray"))
CURRENT = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records the address "auto" finds


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999). The
    kernel never hands such a port to another socket, so once its owner dies nothing answers there: an
    ephemeral port could be bound again by any new process, or even self-connect a probe whose source port
    the kernel picks equal to it, and a dead head would then look alive."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(25000, min(low, 32768))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 25000 and the ephemeral range")


def _head_processes(address: str) -> list[int]:
    """Pids of the cluster whose GCS is at ``address`` (its processes name it on their command lines)."""
    port = address.rsplit(":", 1)[1]
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and (f"--gcs_server_port={port}" in cmd or address in cmd):
            found.append(int(proc.name))
    return found


def _listening(address: str) -> list[str]:
    """The /proc/net/tcp and tcp6 lines of sockets listening on ``address``'s port (state 0A)."""
    port = f":{int(address.rsplit(':', 1)[1]):04X}"
    lines = [line for name in ("tcp", "tcp6") for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]]
    return [line.strip() for line in lines if line.split()[1].endswith(port) and line.split()[3] == "0A"]


def _kill_head(address: str) -> list[int]:
    pids = _head_processes(address)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _exited(pid: int) -> bool:
    """Gone or a zombie. (A dying process's command line reads empty before its sockets close.)"""
    return not procfs.alive(pid)


def _probe(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh Python (this one is already connected to the test cluster); it prints one
    JSON line last."""
    # Not this session's Ray settings (its local start turned RAY_AUTH_MODE on in this process).
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    full.update(env or {})
    res = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


REPORT = ("import json, ray\n"
          "def report(**extra):\n"
          "    print(json.dumps({'gcs': ray.get_runtime_context().gcs_address,\n"
          "                      'cpus': ray.cluster_resources().get('CPU'), **extra}), flush=True)\n"
          "from pipelines.ray_runtime import connect\n")


@pytest.fixture(scope="module")
def other_head():
    """A `ray start --head` cluster with 1 CPU: someone else's cluster on the same machine."""
    before = CURRENT.read_text() if CURRENT.exists() else None
    port = _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120)
    address = CURRENT.read_text().strip()
    assert address.endswith(f":{port}")
    yield {"address": address}
    _kill_head(address)
    if before is None:
        CURRENT.unlink(missing_ok=True)
    else:
        CURRENT.write_text(before)


# From inside a local cluster, ask Ray's State API about an actor of that cluster, as Ray Train's placement-group
# cleaner does every second (a cleaner told "no such actor" removes the run's placement group).
STATE_ASK = (
    "import time\n"
    "@ray.remote\n"
    "class A:\n"
    "    def ask(self):\n"
    "        from ray.util.state import get_actor\n"
    "        t0 = time.monotonic()\n"
    "        try:\n"
    "            state = get_actor(ray.get_runtime_context().get_actor_id(), timeout=10)\n"
    "            answer = state.state if state else 'not found'\n"
    "        except Exception as e:\n"
    "            answer = type(e).__name__\n"
    "        return answer, time.monotonic() - t0\n"
    "answer, seconds = ray.get(A.remote().ask.remote())\n")
STATE_PROBE = REPORT + ("connect(num_cpus=2, dashboard=DASHBOARD, log_to_driver=False, quiet=True)\n" + STATE_ASK +
                        "report(answer=answer, seconds=seconds)\n")


# The user's own value of one of LOCAL_TRAIN_ENV's settings, in the probe's environment.
USER_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}


@pytest.fixture(scope="module")
def local_starts(other_head):
    """One probe (one process, three cluster starts): a local start while another head runs, a join of that
    head, a ``"local"`` start with its dashboard whose workers and driver report the Ray Train settings they
    see, and whose State API answers an actor's question about itself (``STATE_ASK``)."""
    head = other_head["address"]
    return _probe(REPORT + (
        "import os\n"
        "from pipelines.ray_runtime import LOCAL_TRAIN_ENV\n"
        "connect(num_cpus=3, dashboard=False, log_to_driver=False)\n"
        "local = ray.get_runtime_context().gcs_address, ray.cluster_resources().get('CPU')\n"
        "ray.shutdown()\n"
        f"connect({head!r}, log_to_driver=False)\n"
        "explicit = ray.get_runtime_context().gcs_address, ray.cluster_resources().get('CPU')\n"
        "ray.shutdown()\n"
        "connect('local', num_cpus=2, dashboard=True, log_to_driver=False, quiet=True)\n"
        "@ray.remote\n"
        "def seen():\n"
        "    return {k: os.environ.get(k) for k in LOCAL_TRAIN_ENV}\n"
        + STATE_ASK +
        "report(local=local, explicit=explicit, workers=ray.get(seen.remote()),\n"
        "       driver={k: os.environ.get(k) for k in LOCAL_TRAIN_ENV}, answer=answer, seconds=seconds)\n"),
        env=USER_TRAIN_ENV)


def test_a_local_cluster_is_a_new_one_and_joining_happens_only_when_asked(other_head, local_starts):
    head, out = other_head["address"], local_starts
    # No address: a new 3-CPU cluster, although a head runs here (before: joined it, then failed on num_cpus).
    assert out["local"][0] != head and out["local"][1] == 3
    # An explicit address joins that cluster (its 1 CPU).
    assert out["explicit"] == [head, 1]
    # "local" stays local.
    assert out["gcs"] != head and out["cpus"] == 2


@pytest.mark.slow  # (22 s) make test joins a token-auth head through RAY_ADDRESS in test_cluster_job_submit.py
def test_ray_address_in_the_environment_is_joined_with_token_auth(other_head):
    # `ray start --head` turns token auth on: its clients say RAY_AUTH_MODE=token.
    out = _probe(REPORT + "connect(num_cpus=3, log_to_driver=False)\nreport()\n",
                 env={"RAY_ADDRESS": other_head["address"], "RAY_AUTH_MODE": "token"})
    assert out == {"gcs": other_head["address"], "cpus": 1}
    # Without it, one line that says what to set.
    out = _probe("import json\nfrom pipelines.ray_runtime import RayUnreachable, connect\n"
                 "try:\n    connect(log_to_driver=False)\nexcept RayUnreachable as e:\n"
                 "    print(json.dumps({'error': str(e)}))\n", env={"RAY_ADDRESS": other_head["address"]})
    assert "RAY_AUTH_MODE=token" in out["error"] and other_head["address"] in out["error"]


def test_an_address_that_does_not_answer_fails_fast_naming_it():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    # What connect() does first with an address (this process is already connected to the test cluster).
    with pytest.raises(RayUnreachable, match=f"127.0.0.1:{port}"):
        wait_reachable(f"127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 10
    with pytest.raises(RayUnreachable, match="not HOST:PORT"):
        wait_reachable("nonsense", timeout_s=2)


@pytest.mark.parametrize("timeout", [pytest.param(None, marks=pytest.mark.slow, id="default-30s"),
                                     pytest.param("4", id="env-4s")])
def test_the_cli_says_in_one_line_within_its_timeout_that_the_address_is_dead(tmp_path, timeout):
    """30 s by default (30 s of waiting: a slow test); ``VISIONFLOW_CONNECT_TIMEOUT_S`` sets it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VISIONFLOW_CONNECT_TIMEOUT_S"}
    if timeout:
        env["VISIONFLOW_CONNECT_TIMEOUT_S"] = timeout
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pipelines", "ingest", "--annotations", str(tmp_path / "a.json"),
                          "--images", str(tmp_path), "--out", str(tmp_path / "out"),
                          "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - t0
    assert res.returncode == 1
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in res.stderr, lines
    waited = float(timeout or 30)
    assert f"within {waited:.0f}s" in lines[0], lines
    assert waited <= took < waited + 15, took  # the retries plus Python's start-up


def test_a_local_clusters_processes_get_its_train_settings_and_a_users_own_win(local_starts):
    from pipelines.ray_runtime import LOCAL_TRAIN_ENV

    # The user set one of the settings; the workers get it and the local defaults for the rest, and the
    # driver's own environment stays what it was.
    assert set(USER_TRAIN_ENV) < set(LOCAL_TRAIN_ENV) and LOCAL_TRAIN_ENV[next(iter(USER_TRAIN_ENV))] != "3"
    out = local_starts
    assert out["workers"] == {**LOCAL_TRAIN_ENV, **USER_TRAIN_ENV}  # where Ray Train's controller reads them
    assert out["driver"] == {k: USER_TRAIN_ENV.get(k) for k in LOCAL_TRAIN_ENV}


@pytest.mark.parametrize("dashboard", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_state_api_of_a_local_cluster_is_its_own_not_the_other_heads(other_head, dashboard, request):
    # With its dashboard: the local start of the module's probe; without (-m slow), a probe of its own.
    out = (request.getfixturevalue("local_starts") if dashboard
           else _probe(STATE_PROBE.replace("DASHBOARD", str(dashboard))))
    assert out["gcs"] != other_head["address"]
    if dashboard:  # its own dashboard answers: the actor is alive
        assert out["answer"] == "ALIVE" and out["seconds"] < 5, out
    else:  # no State API server: refused at once (the cleaner keeps watching), never the other head's "not found"
        assert out["answer"] not in ("ALIVE", "not found", "DEAD") and out["seconds"] < 5, out


@pytest.mark.slow  # (26 s) make test keeps the local-start and dead-address checks above
def test_a_killed_heads_stale_address_fails_auto_and_does_not_block_a_local_start(other_head):
    """Last in this module: it kills the head."""
    killed = _kill_head(other_head["address"])
    deadline = time.monotonic() + 30
    while not all(_exited(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert CURRENT.read_text().strip() == other_head["address"], "the stale file is what this test is about"
    # Hold the dead head's port, bound and not listening, so that nothing can answer there meanwhile. Its
    # sockets may take a moment to close after the process has exited.
    guard = socket.socket()
    guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    while True:
        try:
            guard.bind(("0.0.0.0", int(other_head["address"].rsplit(":", 1)[1])))
            break
        except OSError as e:
            if time.monotonic() > deadline:
                guard.close()
                pytest.fail(f"the killed head's port is still taken ({e}); running there: "
                            f"{_head_processes(other_head['address'])}, listening: {_listening(other_head['address'])}")
            time.sleep(0.2)
    t0 = time.monotonic()
    try:
        with pytest.raises(RayUnreachable, match=other_head["address"]):
            wait_reachable("auto", timeout_s=3)
    finally:
        guard.close()
    assert time.monotonic() - t0 < 10
    out = _probe(REPORT + "connect(num_cpus=2, dashboard=False, log_to_driver=False)\nreport()\n")
    assert out["gcs"] != other_head["address"] and out["cpus"] == 2
    # The stale file does not send the State API to the dead head (before: 10-40 s per query, which added
    # 12-40 s to the end of every training).
    out = _probe(STATE_PROBE.replace("DASHBOARD", "True"))
    assert out["answer"] == "ALIVE" and out["seconds"] < 5, out


# A worker that hangs in its own exit, as Ray 2.60's did once (docs/reliability.md): an atexit handler that
# never returns, and the actor leaving with exit_actor(), whose SystemExit runs it. Ray's shutdown then
# leaves it alive, an orphan of no cluster.
STUCK_PROBE = (
    "import os, time, ray\n"
    "from pipelines.ray_runtime import connect\n"
    "connect(num_cpus=1, dashboard=False, log_to_driver=False, quiet=True)\n"
    "@ray.remote(num_cpus=0)\n"
    "class Stuck:\n"
    "    def arm(self):\n"
    "        import atexit\n"
    "        atexit.register(time.sleep, 3600)\n"
    "        return os.getpid()\n"
    "    def leave(self):\n"
    "        ray.actor.exit_actor()\n"
    "stuck = Stuck.remote()\n"
    "pid = ray.get(stuck.arm.remote())\n"
    "try:\n"
    "    ray.get(stuck.leave.remote())\n"
    "except ray.exceptions.RayActorError:\n"
    "    pass\n"
    "ray.shutdown()\n"
    "time.sleep(3)\n"
    "with open(f'/proc/{pid}/stat') as f:\n"
    "    state = f.read().rsplit(')', 1)[1].split()[0]\n"
    "print('stuck', pid, 'state after shutdown', state, flush=True)\n")


def test_a_worker_that_hangs_in_its_exit_is_killed_when_its_local_cluster_stops(ray_cluster):
    """The process that started the local cluster kills, at its exit, what the cluster's raylet started and
    Ray's shutdown left alive, in one line; a process of another cluster (here: tagged with this session's
    live raylet) is left alone."""
    from pipelines import ray_private

    (session_raylet,) = ray_private.raylets_started_here()
    bystander = subprocess.Popen(["sleep", "120"], env={**os.environ, ray_private.RAYLET_PID_ENV: str(session_raylet)})
    try:
        full = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        res = subprocess.run([sys.executable, "-c", STUCK_PROBE], env=full, capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        _, pid, *_, state = res.stdout.split()
        pid = int(pid)
        assert state in "RSD", "the fault did not happen: the worker had exited 3 s after Ray's shutdown"
        assert _exited(pid), Path(f"/proc/{pid}/cmdline").read_bytes()
        (line,) = [l for l in res.stderr.splitlines() if l.startswith("visionflow: killed")]
        assert f"killed 1 Ray process(es) that outlived their local cluster ({pid} ray::Stuck)" in line
        # The session's raylet still runs: what it started is left alone.
        assert reap_outlived([session_raylet], grace_s=0.1) == [] and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_reap_outlived_kills_what_a_gone_raylet_started_and_nothing_else(tmp_path):
    """Without Ray: a process tagged with the PID of a process that has exited (a raylet gone) is killed,
    one tagged with a live PID and one without a tag are not."""
    from pipelines import ray_private

    gone = subprocess.Popen(["true"])
    gone.wait()
    tag = ray_private.RAYLET_PID_ENV
    orphan = subprocess.Popen(["sleep", "120"], env={**os.environ, tag: str(gone.pid)})
    kept = [subprocess.Popen(["sleep", "120"], env={**os.environ, tag: str(os.getpid())}),
            subprocess.Popen(["sleep", "120"], env={k: v for k, v in os.environ.items() if k != tag})]
    out = tmp_path / "said.txt"
    try:
        with out.open("w") as f:
            assert reap_outlived([gone.pid, os.getpid()], grace_s=0.3, out=f) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert all(p.poll() is None for p in kept)
        assert out.read_text().startswith(f"visionflow: killed 1 Ray process(es) that outlived their local cluster "
                                          f"({orphan.pid} sleep)")
    finally:
        for p in (orphan, *kept):
            p.kill()
            p.wait()

