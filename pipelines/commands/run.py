"""`visionflow run`: the whole pipeline as a resumable DAG (data -> train -> eval -> compare, deploy -> smoke)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="run config YAML (default: the quickstart that ships with visionflow, "
                             "pipelines/configs/quickstart.yaml)")
    parser.add_argument("--run-dir", help="override the config's run_dir (a local path or s3://bucket/prefix)")
    parser.add_argument("--archs", help="comma-separated architectures to train (default: the config's list)")
    parser.add_argument("--plan", action="store_true",
                        help="print the DAG without running it and write it as a PNG (see --plan-png)")
    parser.add_argument("--plan-png", help="where --plan writes the picture (default: RUN_DIR/plan.png, "
                        "or ./plan.png when the run dir is remote)")
    parser.add_argument("--no-deploy", action="store_true", help="stop after the comparison (no Serve, no smoke test)")
    parser.add_argument("--prune", action="store_true",
                        help="after the run, delete the outputs that a changed config set aside "
                             "(<stage dir>@<key>: kept so that changing a setting back needs no rerun)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, VALUE read as YAML, e.g. --set data.synth.images=16 "
                             "--set train.defaults.epochs=1 (repeatable)")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def _overrides(args) -> dict:
    import yaml

    o = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.defaults.epochs=1")
        o[key.strip()] = yaml.safe_load(value)
    if args.run_dir:
        o["run_dir"] = args.run_dir
    if args.archs:
        o["train.archs"] = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.no_deploy:
        o["deploy.enabled"] = False
    return o


def main(args: argparse.Namespace) -> int:
    from pipelines.dag.config import load_config

    try:
        cfg = load_config(args.config, _overrides(args))
        archs = cfg.archs()
        cfg.check_train_settings()
        cfg.check_deploy_settings()
        cfg.check_run_settings()
    except ValueError as e:
        print(f"visionflow run: {e}", file=sys.stderr)
        return 2
    if not archs:
        print("visionflow run: no architectures to train (train.archs minus train.exclude is empty)", file=sys.stderr)
        return 2
    from pipelines.dag import runner
    from pipelines.storage import RunDir

    if args.plan:
        run_dir = RunDir(cfg.run_dir)
        png = args.plan_png or ("plan.png" if run_dir.remote else str(run_dir.local("plan.png")))
        for line in runner.plan(cfg, png):
            print(line)
        print(f"plan picture: {png}")
        return 0
    from pipelines.dag.lock import RunDirBusy, RunLock
    from pipelines.dag.placement import ClusterTooSmall
    from pipelines.dag.records import prune_set_aside
    from pipelines.ray_runtime import RayUnreachable

    lock = RunLock(cfg.run_dir)
    try:
        lock.acquire()
    except RunDirBusy as e:
        print(f"visionflow run: {e}", file=sys.stderr)
        return 2
    started = False
    try:
        load = os.getloadavg()[0]  # before this run starts Ray: the machine's own load
        started = runner.connect(cfg, args.address, args.dashboard)
        summary = runner.run(cfg, load_at_start=load)
        print(runner.format_summary(summary), flush=True)
        if args.prune and not summary["failed"]:
            gone = prune_set_aside(RunDir(cfg.run_dir))
            print(f"pruned {len(gone)} set-aside outputs" + "".join(f"\n  {g}" for g in gone), flush=True)
        if cfg.deploy.keep_serving and (summary.get("deploy") or {}).get("status") == "done":
            _serve_until_interrupted(summary["deploy"]["url"])
    except (RayUnreachable, ClusterTooSmall) as e:
        print(f"visionflow run: {e}", file=sys.stderr)
        return 1 if isinstance(e, RayUnreachable) else 2
    finally:
        lock.release()
        if started:
            import ray

            ray.shutdown()
    return 1 if summary["failed"] else 0


def _serve_until_interrupted(url: str) -> None:
    import time

    print(f"serving at {url}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from pipelines.serve import shutdown

        shutdown()


