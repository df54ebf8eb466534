"""Run a config end to end: connect to Ray, build the DAG, follow its progress, print the summary."""
from __future__ import annotations

import os
import sys
import time

import ray

from pipelines.dag import placement
from pipelines.dag.config import RunConfig
from pipelines.dag.graph import build_dag, plan_lines, plot_plan, release, submit
from pipelines.dag.progress import RunBoard, follow
from pipelines.storage import RunDir
from pipelines import ray_runtime


# A run's local cluster: Serve's controller, proxies and replicas log to their files only (Ray Serve's
# RAY_SERVE_LOG_TO_STDERR), not also to the console, where the deploy and smoke stages put about 25 lines
# of Serve's INFO (start-up, every request) between the run's own lines and its summary. Their warnings,
# errors and the replicas' own output (print, tracebacks) go to those files too.
RUN_CLUSTER_ENV = {"RAY_SERVE_LOG_TO_STDERR": "0"}


def connect(cfg: RunConfig, address: str | None = None, dashboard: bool = True) -> bool:
    """Join the cluster named by ``address``, ``cfg.ray_address`` or RAY_ADDRESS (a job's driver has it),
    or start a new local one sized for the run, with ``RUN_CLUSTER_ENV`` in its processes' environment.
    Returns True when this call started Ray (and so should shut it down)."""
    return ray_runtime.connect(address or cfg.ray_address, num_cpus=placement.local_cpus(cfg, os.cpu_count() or 1),
                               dashboard=dashboard, cluster_env=RUN_CLUSTER_ENV)


def plan(cfg: RunConfig, png: str | None = None) -> list[str]:
    """The DAG of ``cfg`` as text lines (and a PNG at ``png``), without running anything."""
    dag = build_dag(cfg)
    lines = plan_lines(dag)
    if png:
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        plot_plan(dag, png)
    return lines


def run(cfg: RunConfig, out=None, load_at_start: float | None = None) -> dict:
    """Execute the run (resuming whatever an earlier run of the same config finished). Returns the
    summary dict; ``summary["failed"]`` lists what failed. ``summary.json`` gets the run's ``seconds`` and
    the ``machine`` it ran on: ``load_at_start`` (the load average before Ray started, from the caller;
    None: measured now) and the core count, the provenance of any time read from the run."""
    load_at_start = os.getloadavg()[0] if load_at_start is None else load_at_start
    out = out or sys.stdout  # looked up per call: sys.stdout may have been swapped since import
    fit = placement.plan_on_cluster(cfg, cfg.train.placement_wait_s, out=out)  # ClusterTooSmall: refuse now
    RunDir(cfg.run_dir).makedirs("")
    board = RunBoard.remote()
    # Stages (and the Train/Data actors they start) name this cluster explicitly: Ray's "auto" address
    # lookup refuses to choose when several clusters run on one machine.
    ctx = ray.get_runtime_context()
    dag = build_dag(cfg, board, {"env_vars": {"RAY_ADDRESS": ctx.gcs_address}}, driver_node=ctx.get_node_id(),
                    lanes=fit.lanes)
    t0 = time.perf_counter()
    print(f"visionflow run: {len(cfg.archs())} architectures, {fit.line()}, run dir {RunDir(cfg.run_dir).uri}",
          file=out, flush=True)
    ref, refs = submit(dag)
    trainings = {n: r for n, r in refs.items() if n.startswith("train/")}
    try:
        summary = follow(ref, board, trainings=trainings, out=out)
    finally:
        release()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["machine"] = {"load_average_at_start": round(load_at_start, 2), "cores": os.cpu_count()}
    RunDir(cfg.run_dir).write_json("summary.json", summary)
    ray.kill(board)
    return summary


def smoke_lines(smoke: dict | None) -> list[str]:
    """What the smoke test found, a line per endpoint and image (the first five objects), and its errors."""
    lines = []
    for f in (smoke or {}).get("results", []):
        found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in f["detections"][:5])
        lines.append(f"smoke {f['endpoint']} {f['image']}: {len(f['detections'])} found {found}".rstrip())
    return lines + [f"smoke FAILED: {e}" for e in (smoke or {}).get("errors", [])]


def format_summary(summary: dict) -> str:
    """The end-of-run table: each architecture's status and headline metric, then the report paths."""
    rows = [("architecture", "task", "status", "metric", "value")]
    for a in sorted(summary["archs"], key=lambda a: (a.get("task") or "", a["arch"])):
        metric, value = a["metric"] or ("", None)
        status = a["status"] if a["status"] == "done" else f"FAILED: {str(a.get('error'))[:60]}"
        rows.append((a["arch"], a.get("task") or "", status, metric, "" if value is None else f"{value:.4f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = smoke_lines(summary.get("smoke"))
    table = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [table[0], "  ".join("-" * w for w in widths), *table[1:]]
    for key in ("report", "table", "chart", "path"):
        if summary.get(key):
            lines.append(f"{'summary' if key == 'path' else key}: {summary[key]}")
    dep = summary.get("deploy") or {}
    if dep.get("status") == "done":
        lines.append(f"endpoint: {dep['url']} serving {dep['models']}")
    elif dep.get("status") == "failed":
        lines.append(f"deploy FAILED: {dep.get('error')}")
    for arch, rob in (summary.get("robustness") or {}).items():
        lines.append(f"robustness {arch}: {rob}")
    lines.append(f"{len(summary['failed'])} failed: {', '.join(summary['failed'])}" if summary["failed"]
                 else "everything finished")
    if summary.get("seconds") is not None:
        lines.append(f"took {summary['seconds']}s")
    return "\n".join(lines)
