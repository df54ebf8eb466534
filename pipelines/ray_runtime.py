"""The one way visionflow reaches Ray: every command, the DAG, the benchmarks and the tests call ``connect``.

The rules:

- A cluster is joined only when asked: ``connect(address)`` with an address (``host:port``, ``ray://...``
  or ``auto``), else the ``RAY_ADDRESS`` environment variable (what ``ray job submit`` gives a job's
  driver). ``connect("local")`` or no address at all starts a **new** local cluster, whatever else runs
  on the machine (a ``ray start --head``, or the stale address file such a head leaves when killed).
- An address that does not answer fails within ``timeout_s`` (30 s, or ``VISIONFLOW_CONNECT_TIMEOUT_S``:
  longer for a head still starting, shorter for scripts that would rather fail fast) with one line naming it
  (``RayUnreachable``), never a silent wait; so does one that answers but refuses to be joined (a
  ``ray start --head`` cluster uses token auth: its clients set ``RAY_AUTH_MODE=token``).
- A new local cluster is sized by the caller for its work (``num_cpus`` logical CPUs; more than the cores
  where stages mostly wait), with the dashboard on unless ``dashboard=False``, and the worker pool kept
  warm (below).
- A process that started a local cluster leaves none of its workers behind: at its normal exit (Linux),
  after Ray's shutdown, what the cluster's raylet started and is still alive is killed, in one line
  (``reap_outlived``).

Ray kills idle worker processes above its soft limit (one per CPU) after one second. Every epoch of a
training run is its own Ray Data execution, so with that default each epoch started fresh processes that
imported torch and torchvision again (about 5 CPU-seconds each): on 2 cores that halved training
throughput. ``WORKER_POOL`` keeps idle workers for two minutes instead. On a cluster started with
``ray start`` the same setting is the environment variable in ``RAY_START_ENV`` (the ``cluster/`` YAMLs
set it).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from pipelines import procfs, ray_private

WORKER_POOL = {"idle_worker_killing_time_threshold_ms": 120_000}
RAY_START_ENV = {f"RAY_{k}": str(v) for k, v in WORKER_POOL.items()}
LOCAL = "local"
# How long the processes of a stopped local cluster may take to exit before ``reap_outlived`` kills them.
# Ray's shutdown stops the raylet and the GCS and returns; the workers and agents then exit by themselves
# (an agent notices its raylet gone after about 2 s). Only an exit with something left waits for this.
OUTLIVED_GRACE_S = 5.0
# Ray Train settings of a local cluster (a user's own setting wins). Its controller looks at the worker
# group every 2 s by default, so a finished run waited up to 2 s to be noticed: 0.5 s here. And each run
# started a PreemptionWatcher process that polls for nodes being drained (cloud spot preemption), which one
# machine never has: 2-3 s less per training on 2 cores (benchmarks/stage_profile.py).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Warnings Ray's code gives about its own calls, which a user can do nothing about, kept off the console of a
# local cluster's processes (a user's own PYTHONWARNINGS wins). Ray Train's state tracking (on with the
# dashboard) asks Ray Data for its default ingest options, which set the deprecated `exclude_resources`
# (Ray 2.60): a warning and its source line from each training's controller. The test of this checks that Ray
# still warns so (tests/test_console_output.py): drop the filter when it does not.
RAY_OWN_DEPRECATION = "`ExecutionOptions.exclude_resources` is deprecated"
LOCAL_WARNINGS_ENV = {"PYTHONWARNINGS": f"ignore:{RAY_OWN_DEPRECATION}"}
# The environment the raylet of the local cluster this process started inherited (None: none started here,
# or it was shut down): Ray Train's workers take their variables from it (``ray_private.train_worker_env_vars``).
_local_cluster_env: dict | None = None


def local_cluster_env() -> dict | None:
    """The environment the processes of the local cluster this process started inherit, or None when this
    process started none (it joined one, or none is running)."""
    import ray

    return dict(_local_cluster_env) if _local_cluster_env is not None and ray.is_initialized() else None


class RayUnreachable(RuntimeError):
    """The Ray address given (or found in RAY_ADDRESS) does not answer."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command that reaches Ray takes: ``--address`` and ``--no-dashboard``."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS if "
                             "set, else a new local cluster)")
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                        help="do not start the Ray dashboard with a local cluster")


def requested_address(address: str | None = None) -> str | None:
    """The address to join: ``address``, else RAY_ADDRESS; None (or ``"local"``) means a new local cluster."""
    address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", LOCAL) else address


def _host_port(address: str) -> tuple[str, int]:
    text = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnreachable(f"Ray address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379 or ray://host:10001)")
    return host.strip("[]") or "127.0.0.1", int(port)


CONNECT_TIMEOUT_ENV = "VISIONFLOW_CONNECT_TIMEOUT_S"


def connect_timeout() -> float:
    """How long an address may take to answer: ``VISIONFLOW_CONNECT_TIMEOUT_S``, else 30 s."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else 30.0
    except ValueError:
        raise RayUnreachable(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise RayUnreachable(f"{CONNECT_TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def wait_reachable(address: str, timeout_s: float | None = None, source: str = "--address") -> str:
    """Resolve ``address`` (``auto``: the cluster ``ray start`` last started on this machine) and wait up
    to ``timeout_s`` for it to accept connections; returns the resolved address or raises RayUnreachable."""
    timeout_s = connect_timeout() if timeout_s is None else timeout_s
    resolved = address
    if address == "auto":
        resolved = ray_private.auto_address()
        if not resolved:
            raise RayUnreachable(f"no Ray cluster to join for address 'auto' ({source}): none was started on this "
                                 "machine with `ray start`; start one, or pass no address for a local cluster")
    host, port = _host_port(resolved)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return resolved
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            shown = resolved if resolved == address else f"{resolved} (from {address!r})"
            raise RayUnreachable(f"no Ray cluster answers at {shown} ({source}) within {timeout_s:.0f}s: {last}; "
                                 "check the address, or pass no address (and unset RAY_ADDRESS) for a local cluster")
        time.sleep(0.5)


def connect(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
            dashboard: bool = True, log_to_driver: bool = True, runtime_env: dict | None = None,
            timeout_s: float | None = None, attempts: int = 3, quiet: bool = False,
            cluster_env: dict | None = None) -> bool:
    """Reach Ray by the rules above. Returns True when this call initialized Ray in this process (the
    caller then calls ``ray.shutdown()`` when done), False when Ray was already initialized here.

    ``num_cpus``/``num_gpus`` size a new local cluster (None: one CPU per core) and are ignored when
    joining one, and so is ``cluster_env``: environment variables for a new local cluster's processes (on
    top of ``LOCAL_TRAIN_ENV``, ``LOCAL_WARNINGS_ENV``, Ray Data's quiet logging config and Serve's HAProxy
    ingress; a variable already set in this process wins). On a loaded machine the raylet can give up
    waiting for its agents ("timed out during startup"); a local start is tried up to ``attempts`` times."""
    import ray

    if ray.is_initialized():
        return False
    target = requested_address(address)
    common = {"log_to_driver": log_to_driver, **({"runtime_env": runtime_env} if runtime_env else {})}
    global _local_cluster_env
    if target is not None:
        _local_cluster_env = None  # a joined cluster's environment is not this process's to know
        source = "--address" if address not in (None, "", LOCAL) else "RAY_ADDRESS"
        resolved = wait_reachable(target, timeout_s, source)
        try:
            ray.init(address=resolved, **common)
        except ConnectionError as e:
            raise RayUnreachable(_join_failure(resolved, e)) from e
        return True
    kwargs = dict(address=LOCAL, num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
                  **ray_private.system_config(WORKER_POOL), **common)
    # The State API, which Ray Train's placement-group cleaner asks whether the run's controller lives,
    # finds its server from RAY_API_SERVER_ADDRESS, else from the address file of the last `ray start`:
    # another cluster's, or a stale one (a killed head leaves it), where each query waits 10-40 s and a
    # live other cluster answers "no such actor". The cluster's processes (the raylet and every worker it
    # starts) inherit it, and LOCAL_TRAIN_ENV, from this process's environment at start-up; this process
    # gets its own back after.
    if dashboard:
        port = _free_port(8265)
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
        api_server = f"http://127.0.0.1:{port}"
        # Ray Train's dashboard page (runs, workers, datasets) is off unless this is set where the trainer
        # is built (this process). Only with a dashboard: without one the state actor waits for an API
        # server that never comes. A user's own setting wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    else:  # no State API server: a refused connection answers at once (the cleaner keeps watching)
        api_server = "http://127.0.0.1:9"
        # ... and says so once a second in every training's output: not in this cluster's processes. Only
        # without a runtime env of the caller's: one may run workers where this project is not importable.
        if runtime_env is None:
            kwargs["runtime_env"] = {"worker_process_setup_hook": "pipelines.ray_private.quiet_placement_group_cleaner"}
    # Ray Data's console lines (each execution's start, plan and end) off the console in every process of
    # the cluster, the split coordinators of multi-worker trainings included; its log files keep them.
    data_config = ray_private.quiet_data_logging_config()
    quiet_data = {ray_private.DATA_LOGGING_CONFIG_ENV: data_config} if data_config else {}
    # Serve's HTTP ingress is HAProxy where its executable is installed (Ray's own switch; a user's own
    # setting wins): the HTTP hop of a request 4 ms instead of 10 on 2 cores (docs/serving.md).
    serve_env = ray_private.serve_haproxy_env()
    env = {"RAY_API_SERVER_ADDRESS": api_server,
           **{k: v for k, v in {**LOCAL_TRAIN_ENV, **LOCAL_WARNINGS_ENV, **quiet_data, **serve_env,
                                **(cluster_env or {})}.items()
              if k not in os.environ}}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _local_cluster_env = dict(os.environ)
    try:
        for attempt in range(attempts):
            try:
                ctx = ray.init(**kwargs)
                break
            except Exception as e:  # noqa: BLE001 -- Ray raises a bare Exception when start-up times out
                if attempt == attempts - 1 or "timed out during startup" not in str(e):
                    raise
                print(f"ray.init failed ({e}); retrying", file=sys.stderr, flush=True)
                ray.shutdown()
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _reap_at_exit(ray_private.raylets_started_here())
    if dashboard and not quiet and getattr(ctx, "dashboard_url", None):
        print(f"Ray dashboard: http://{ctx.dashboard_url}{_dashboard_sign_in()}", file=sys.stderr, flush=True)
    return True


# Raylets of the local clusters this process started; what they started is checked at its exit.
_raylets: list[int] = []


def _reap_at_exit(raylets: list[int]) -> None:
    if raylets and not _raylets:
        import atexit

        # Registered after Ray's own exit handler (added when Ray's worker module is imported), so it runs
        # first: it stops Ray as that handler would, then looks.
        atexit.register(_stop_and_reap)
    _raylets.extend(p for p in raylets if p not in _raylets)


def _stop_and_reap() -> None:
    try:
        ray_private.shutdown_at_exit()
    finally:
        reap_outlived(_raylets)


def reap_outlived(raylets: list[int], grace_s: float = OUTLIVED_GRACE_S, out=None) -> list[int]:
    """Once the local clusters of ``raylets`` (``ray_private.raylets_started_here``) have stopped: the
    processes they started (those carrying the raylet's PID in their environment: its workers and agents)
    that are still alive ``grace_s`` later are killed (SIGKILL), with one line on ``out`` (stderr) naming
    them; returns their PIDs. A raylet still running keeps its processes. A Ray 2.60 worker can deadlock in
    its own exit and outlive its cluster, holding its memory (docs/reliability.md); at the normal exit of a
    process that started local clusters this runs by itself (``connect``). Linux (/proc) only."""
    import signal

    left = {p: r for r in raylets if not procfs.alive(r) for p in ray_private.processes_of_raylet(r)}
    deadline = time.monotonic() + grace_s
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p: r for p, r in left.items() if procfs.alive(p)}
    killed = []
    for pid, raylet in left.items():
        name = procfs.program(pid) or "?"
        if ray_private.raylet_of(pid) != raylet:  # exited meanwhile, its PID perhaps another process's now
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        killed.append((pid, name))
    if killed:
        shown = ", ".join(f"{pid} {name}" for pid, name in killed)
        try:
            print(f"visionflow: killed {len(killed)} Ray process(es) that outlived their local cluster ({shown}): "
                  "a Ray worker can hang in its own exit (docs/reliability.md)", file=out or sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed, or a pipe whose reader has gone
            pass
    return [pid for pid, _ in killed]


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def _dashboard_sign_in() -> str:
    """How to sign in to the dashboard when Ray's token auth is on (Ray 2.60 turns it on by default)."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return ""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return " (sign in with $RAY_AUTH_TOKEN)"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return f" (sign in with the token in {path})" if os.path.isfile(path) else ""


def _join_failure(address: str, error: BaseException) -> str:
    """One line for a cluster that answered but could not be joined."""
    chain, e = [], error
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = " ".join(chain)
    if "InvalidAuthToken" in text or "AuthenticationError" in text:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        return (f"the Ray cluster at {address} uses token auth and refused this client (RAY_AUTH_MODE is {mode}): "
                "set RAY_AUTH_MODE=token and give the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    return f"could not join the Ray cluster at {address}: {str(error).splitlines()[0]}"


def connect_for(command: str, args: argparse.Namespace, out=None, **kwargs) -> bool:
    """``connect`` with the flags of ``add_arguments`` (``args.address``, ``args.dashboard``) for
    ``visionflow <command>``: False, after one line on ``out`` (stderr), when Ray cannot be reached."""
    try:
        connect(getattr(args, "address", None), dashboard=getattr(args, "dashboard", True), **kwargs)
    except RayUnreachable as e:
        print(f"visionflow {command}: {e}", file=out or sys.stderr, flush=True)
        return False
    return True
