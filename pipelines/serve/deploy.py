"""Python API: ``deploy(...)`` starts Serve and the application, returns the base URL; ``shutdown()``."""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path

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
        base.update(checkpoint=str(checkpoint), random_weights=False, task=None, arch=None, num_classes=None)
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


def deploy(config: str | Path | dict | ServeArgs | None = None, *, checkpoint: str | None = None,
           random_weights: bool = False, host: str | None = None, port: int | None = None,
           timeout_s: float = 300.0) -> str:
    """Start Serve (HTTP on ``host:port``, default 127.0.0.1:8000 or the YAML's ``http_options``), deploy
    the application and wait until ``/healthz`` answers. Returns the base URL, e.g. ``http://127.0.0.1:8000``.

    Uses the running Ray cluster, or starts a local one. Raises ``ValueError`` for a model without weights.
    """
    import ray
    from ray import serve

    from pipelines.serve.app import build_app

    http, args = resolve_args(config, checkpoint=checkpoint, random_weights=random_weights)
    http = http.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    application = build_app(args)  # validates before touching the cluster
    if not ray.is_initialized():
        ray.init()
    _start_serve(http)
    serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if http.host in ('0.0.0.0', '::') else http.host}:{http.port}"
    _wait_healthy(url, timeout_s)
    return url


def _start_serve(http: HttpOptions) -> None:
    """Start Serve on ``http``; a Serve already running elsewhere is restarted (its options are fixed)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        running = _get_global_client(raise_if_no_controller_running=True)
    except RayServeException:
        running = None
    if running is not None:
        cur = running.http_config
        if (cur.host, cur.port) == (http.host, http.port):
            return
        serve.shutdown()
    serve.start(http_options=http.serve_options())


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # the proxy comes up a little after the app
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s}s (last error: {last})")


def shutdown() -> None:
    """Delete the application and stop Serve on this cluster (a no-op when Serve is not running)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
