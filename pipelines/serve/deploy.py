"""Python API: ``deploy(...)`` starts Serve and the application, returns the base URL; ``shutdown()``."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import urllib.request
from pathlib import Path

from pipelines.ray_private import running_serve_http
from pipelines.ray_runtime import connect
from pipelines.serve.config import HttpOptions, ModelSpec, ServeArgs, load_serve_file

APP_NAME = "visionflow"


def resolve_args(config: str | Path | dict | ServeArgs | None = None, *, checkpoint: str | None = None,
                 random_weights: bool = False) -> tuple[HttpOptions, ServeArgs]:
    """The HTTP options and application args from a Serve YAML / dict / ServeArgs plus CLI overrides.

    ``checkpoint`` serves that checkpoint (its task read from it), keeping the config's settings of the
    first model; ``random_weights`` marks every model of the config as untrained (tests, smoke runs).
    """
    http = HttpOptions()
    if isinstance(config, (str, Path)):
        http, _, args = load_serve_file(config)
    elif isinstance(config, ServeArgs):
        args = config
    else:
        args = ServeArgs.model_validate(config or {})
    if checkpoint:
        from pipelines.serve.models import load_served_model

        base = args.models[0].model_dump() if args.models else {"name": "model"}
        # What the checkpoint knows comes from it (a config's image_size was trained for another model).
        base.update(checkpoint=str(checkpoint), random_weights=False, task=None, arch=None, num_classes=None,
                    image_size=None)
        # Refuses an unreadable checkpoint here, before anything starts.
        task = load_served_model(ModelSpec.model_validate(base))[1].task
        base["task"] = task
        args = args.model_copy(update={"models": [ModelSpec.model_validate(base)]})
    elif random_weights:
        if not args.models:
            args = args.model_copy(update={"models": [ModelSpec(
                name="detector", task="detection", arch="fasterrcnn_mobilenet_v3_fpn",
                num_classes=3, random_weights=True)]})
        args = args.model_copy(update={"models": [
            m if m.random_weights else ModelSpec.model_validate({**m.model_dump(), "checkpoint": None,
                                                                 "random_weights": True})
            for m in args.models]})
    return http, args


class DeployError(RuntimeError):
    """The application could not be deployed: too big for the cluster, failed, or not up in time."""


class Interrupted(RuntimeError):
    """Deploying was stopped (Ctrl-C / SIGTERM) before it finished."""


def check_fits(args: ServeArgs, cpus: float, gpus: float) -> None:
    """Refuse (DeployError, one line) an application whose replicas ask for more CPUs or GPUs than the
    cluster has, naming the deployment to shrink; Serve would wait forever to place them."""
    stages = args.stages()
    for kind, has, asked_of in (("CPU", cpus, lambda s: s.cpus_asked()), ("GPU", gpus, lambda s: s.gpus_asked())):
        asked = sum(asked_of(s) for s in stages.values())
        if asked <= has + 1e-9:
            continue
        biggest, res = max(stages.items(), key=lambda kv: asked_of(kv[1]))
        per = res.num_cpus if kind == "CPU" else res.num_gpus
        raise DeployError(f"the application asks for {asked:g} {kind}s but the cluster has {has:g}: shrink {biggest} "
                          f"({res.replicas()} replica(s) x {per:g} {kind}), or the other deployments, or add nodes")


def deploy(config: str | Path | dict | ServeArgs | None = None, *, checkpoint: str | None = None,
           random_weights: bool = False, host: str | None = None, port: int | None = None,
           timeout_s: float = 300.0, stop: threading.Event | None = None,
           http_options: HttpOptions | None = None, delete_on_stop: bool = True,
           system_log_level: str | None = None) -> str:
    """Start Serve (HTTP on ``host:port``, default 127.0.0.1:8000 or the YAML's ``http_options``, which
    also set ``request_timeout_s`` and ``proxy_location``), deploy the application and wait until
    ``/healthz`` answers. Returns the base URL, e.g. ``http://127.0.0.1:8000``.

    Uses the Ray cluster this process is connected to, or starts a local one sized for the application's
    replicas (``pipelines.ray_runtime.connect``). Raises ``ValueError`` for a model without weights,
    ``DeployError`` for an application the cluster cannot hold, one that failed, or one not up within
    ``timeout_s`` (with each deployment's state), ``Interrupted`` when ``stop`` is set meanwhile (watched
    while Serve starts too: its start goes on in a helper thread). On any failure the application is deleted
    again; on ``stop`` only with ``delete_on_stop`` (a caller about to shut its own local cluster down passes
    False: the deletion waited for replicas still importing torch, seconds of a Ctrl-C on 2 cores).
    ``system_log_level`` is the level of Serve's own actors (controller, HTTP proxy, HAProxy manager) where
    this call starts Serve (None: Serve's INFO); the deployments' lines (each request, the replicas' own
    output) keep theirs."""
    import ray

    from pipelines.serve.app import build_app

    http, args = resolve_args(config, checkpoint=checkpoint, random_weights=random_weights)
    if http_options is not None:
        http = http.model_copy(update=http_options.model_dump(exclude_unset=True))
    http = http.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    application = build_app(args)  # validates before touching the cluster
    connect(num_cpus=local_cpus(args))
    res = ray.cluster_resources()
    check_fits(args, float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    url = f"http://{'127.0.0.1' if http.host in ('0.0.0.0', '::') else http.host}:{http.port}"
    with quiet_serve_client():
        _start_serve(http, stop, system_log_level)
        deadline = time.monotonic() + timeout_s
        try:
            _run_until_running(application, deadline, timeout_s, stop)
            _wait_healthy(url, max(1.0, deadline - time.monotonic()), stop, models=sorted(m.name for m in args.models))
        except Interrupted:
            if delete_on_stop:
                delete_app()
            raise
        except BaseException:
            delete_app()
            raise
    return url


@contextlib.contextmanager
def quiet_serve_client():
    """Serve's client INFO lines in this process off meanwhile ("Started Serve in namespace", "Connecting to
    existing Serve app ... will not be applied", "Application ... is ready"): the commands say what they do
    themselves. Serve's warnings and errors still show."""
    logger = logging.getLogger("ray.serve")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _in_background(call, name: str) -> tuple[threading.Thread, dict]:
    """``call()`` in a daemon thread, for a caller that watches it: the thread and its outcome, which gets
    ``"ok": True`` when the call returns and ``"error"`` when it raises (the caller reports it)."""
    outcome: dict = {}

    def run():
        try:
            call()
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 -- reported by the watching caller
            outcome["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, outcome


def _run_until_running(application, deadline: float, timeout_s: float, stop: threading.Event | None) -> None:
    """``serve.run`` in a helper thread (it waits for the application with no deadline), watched from
    here: fails on DEPLOY_FAILED or at the deadline with each deployment's state, stops on ``stop``."""
    from ray import serve

    _, outcome = _in_background(lambda: serve.run(application, name=APP_NAME, route_prefix="/"), "serve-run")
    while True:
        if stop is not None and stop.is_set():
            raise Interrupted("stopped while deploying")
        if "error" in outcome:
            e = outcome["error"]
            raise DeployError(f"deployment failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise DeployError(f"deployment failed: {_states(status)}")
        if outcome.get("ok"):
            return
        if time.monotonic() >= deadline:
            raise DeployError(f"the application was not running after {timeout_s:g}s (--timeout): "
                              f"{_states(status) if status is not None else 'not created yet'}")
        time.sleep(0.5)


def _states(app) -> str:
    """Each deployment's state and Serve's message about it (why a replica cannot be placed or crashed)."""
    parts = [f"{name}: {d.status}" + (f" ({' '.join(d.message.split())[:300]})" if d.message else "")
             for name, d in app.deployments.items() if d.status != "HEALTHY"]
    return "; ".join(parts) or (app.message or str(app.status))


def local_cpus(args: ServeArgs) -> int:
    """Logical CPUs of a local cluster started to serve ``args``: what every replica asks for, plus one
    for the work around them, and never fewer than the cores (replicas mostly wait on requests)."""
    return max(os.cpu_count() or 1, math.ceil(args.cpus_asked()) + 1)


def _start_serve(http: HttpOptions, stop: threading.Event | None = None, log_level: str | None = None) -> None:
    """Start Serve on ``http``. A Serve already running with other HTTP options is restarted only when it
    runs no other application; otherwise DeployError (restarting would stop the others). ``Interrupted``
    as soon as ``stop`` is set: ``serve.start`` (its controller and proxies, several seconds on 2 cores)
    cannot be interrupted, so it runs in a helper thread and is left to finish or fail there."""
    from ray import serve

    running = running_serve_http()
    if running is not None:
        if running == (http.host, http.port):
            return
        others = [a for a in serve.status().applications if a != APP_NAME]
        if others:
            raise DeployError(f"Serve already runs on this cluster at {running[0]}:{running[1]} with applications "
                              f"{others}; deploy on that port (--port {running[1]}) instead of {http.port}")
        serve.shutdown()
    opts = {"proxy_location": http.proxy_location} if http.proxy_location else {}
    if log_level is not None:
        opts["logging_config"] = {"log_level": log_level}
    if stop is None:
        serve.start(http_options=http.serve_options(), **opts)
        return
    helper, outcome = _in_background(lambda: serve.start(http_options=http.serve_options(), **opts), "serve-start")
    while helper.is_alive():
        if stop.is_set():
            raise Interrupted("stopped while Serve started")
        helper.join(0.2)
    if "error" in outcome:
        raise outcome["error"]


def _wait_healthy(url: str, timeout_s: float, stop: threading.Event | None = None,
                  models: list[str] | None = None) -> None:
    """Until ``url/healthz`` answers as this application: status ok and, given ``models``, those models. Any 200
    passed before, so another server on the port (another cluster's endpoint) was taken for this one."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise Interrupted("stopped while waiting for /healthz")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                body = r.read(65536)
        except Exception as e:  # the proxy comes up a little after the app
            last = e
        else:
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            if isinstance(answer, dict) and answer.get("status") == "ok" \
                    and (models is None or sorted(answer.get("models") or []) == models):
                return
            last = f"answered {body[:200]!r}, not this application's models {models}: another server on the port?"
        time.sleep(0.5)
    raise DeployError(f"{url}/healthz did not answer within {timeout_s:.0f}s (last error: {last})")


def delete_app() -> None:
    """Delete visionflow's application only: other Serve applications on the cluster keep running."""
    import ray
    from ray import serve

    if ray.is_initialized() and running_serve_http() is not None:
        try:
            with quiet_serve_client():  # its "Deleting app" line: the callers say what they stop
                serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 -- already gone
            pass


def shutdown() -> None:
    """Stop serving: delete visionflow's application (a no-op when Serve is not running). Serve itself and
    other applications keep running; a local cluster started for serving goes with ``ray.shutdown()``."""
    delete_app()
