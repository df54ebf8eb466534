"""`visionflow serve`: deploy the Serve application over HTTP and stay up until Ctrl-C."""
from __future__ import annotations

import argparse
import signal
import sys
import threading


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 1..65535, got {text}")
    return value


_port.__name__ = "port"  # argparse's "invalid port value" for non-numbers


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a Serve YAML (cluster/serve/*.yaml): models, replicas, batching, NMS, "
                                         "HTTP options; the same file `serve run` / `serve deploy` take")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="serve this checkpoint: a run directory of `visionflow train`, a "
                                          "checkpoint directory or a .pt file (local path or storage URI)")
    src.add_argument("--random-weights", action="store_true",
                     help="serve untrained weights (tests and smoke runs only)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, or the config's http_options)")
    parser.add_argument("--port", type=_port, help="HTTP port 1..65535 (default 8000, or the config's http_options)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the application to be up before giving up with each "
                             "deployment's state (default: 300)")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def _one_line(e: Exception) -> str:
    """An error as one line: pydantic's several lines per refused field become ``field: message; ...``."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
    return " ".join(str(e).split())


def serve_until(stop: threading.Event, args: argparse.Namespace, out=None, err=None) -> int:
    """Deploy per ``args``, print the URL, wait for ``stop``, then shut Serve down. Returns the exit code.
    Progress goes to ``out``, refusals and failures (one line each) to ``err``."""
    out = out or sys.stdout  # looked up per call: sys.stdout may have been swapped since import
    err = err or sys.stderr
    from pydantic import ValidationError

    from pipelines.serve.deploy import deploy, resolve_args, shutdown

    try:
        # Everything a user can get wrong is checked before Ray or Serve start.
        http, served = resolve_args(args.config, checkpoint=args.checkpoint, random_weights=args.random_weights)
        missing = served.missing_weights()
        if not served.models or missing:
            what = f"models {missing} have" if missing else "the config has"
            print(f"visionflow serve: {what} no checkpoint. Pass `visionflow serve --checkpoint RUN_DIR` "
                  f"(a run directory of `visionflow train`, a checkpoint directory or a .pt file), set "
                  f"`checkpoint:` for each model in --config, or --random-weights for untrained weights "
                  f"(tests only).", file=err)
            return 2
    except (FileNotFoundError, ValueError, ValidationError) as e:
        print(f"visionflow serve: {_one_line(e)}", file=err)
        return 2
    import ray

    from pipelines.ray_runtime import connect, requested_address
    from pipelines.serve.deploy import DeployError, Interrupted, local_cpus

    # A cluster this command starts is its own: stopping ends it. On a cluster it joined (--address,
    # RAY_ADDRESS) or one this process already uses, stopping deletes visionflow's application only.
    owned = False
    print(f"visionflow serve: starting {len(served.models)} model(s) ({served.cpus_asked():g} CPUs asked), "
          f"deadline {getattr(args, 'timeout', 300.0):g}s", file=out, flush=True)
    try:
        owned = connect(args.address, dashboard=getattr(args, "dashboard", True),
                        num_cpus=local_cpus(served)) and requested_address(args.address) is None
    except Exception as e:  # RayUnreachable, or a local cluster that did not start
        print(f"visionflow serve: {_one_line(e)}", file=err)
        return 1

    def stop_serving(drain: bool = True):
        # A cluster of our own goes whole with ray.shutdown(); deleting the application first lets its
        # replicas finish what they hold, which only matters once it has served.
        if drain or not owned:
            shutdown()
        if owned:
            ray.shutdown()

    if stop.is_set():  # Ctrl-C while the cluster started: Serve never ran on it
        stop_serving(drain=False)
        print("visionflow serve: stopped", file=out, flush=True)
        return 130
    try:
        url = deploy(served, host=args.host, port=args.port, http_options=http, timeout_s=getattr(args, "timeout", 300.0),
                     stop=stop, delete_on_stop=not owned,  # a cluster of our own goes whole
                     # Its Serve's controller, proxy and HAProxy manager say at start what the command's own
                     # lines say: only their warnings and errors on the console (and in their log files).
                     system_log_level="WARNING" if owned else None)
    except Interrupted:
        stop_serving(drain=False)
        print("visionflow serve: stopped while deploying; removed what was deployed", file=out, flush=True)
        return 130
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow serve: {_one_line(e)}", file=err)
        stop_serving()
        return 2
    except DeployError as e:  # too big for the cluster, a replica that failed, not up in time
        print(f"visionflow serve: {_one_line(e)}", file=err)
        stop_serving()
        return 1
    except Exception as e:  # a port in use, Serve itself failing
        print(f"visionflow serve: deployment failed: {type(e).__name__}: {_one_line(e)}", file=err)
        stop_serving()
        return 1
    print(f"visionflow serve: {', '.join(m.name for m in served.models)} at {url} "
          f"(POST /v1/detect|segment|classify, GET /v1/models, /docs); Ctrl-C to stop", file=out, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop_serving()
        print("visionflow serve: stopped", file=out, flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    # Ctrl-C (or a SIGTERM from a job runner) ends the wait; Serve is then shut down cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return serve_until(stop, args)
