"""The stages of ``visionflow run``: plain functions over a run directory, wired by ``pipelines.dag.graph``.

Each stage takes the run directory's URI, its own config (plain dicts, so the DAG can ship them) and
its inputs' records, checks its record (``pipelines.dag.records``) and either returns the record of an
earlier identical run or does the work through the same entry points the CLI uses, then writes its
record (``run_stage`` does this for every recorded stage). Layout of a run directory::

    data/            coco/ (synth only), shards/{train,val}/, _stage.json
    archs/<arch>/    train/ (the trainer's run dir), eval/metrics.json, failed.json when the branch failed
    compare/         report.md, the comparison table and chart, _stage.json
    robustness/      per-classifier robustness reports and visualizations (optional stage)
    deploy/ smoke/   the endpoint and what the smoke test found
    summary.json     the run's final summary
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from typing import Any, Callable

import ray

from pipelines.dag.records import Stage, read_record, stage_key
from pipelines.progress_report import tell
from pipelines.storage import RunDir, rebase_paths


def _skipped(board, name: str, rec: dict) -> dict:
    tell(board, name, "skipped", seconds=rec.get("seconds"))
    return {**rec, "skipped": True}


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def run_stage(stage: Stage, label: str, config, inputs: dict, body: Callable[[bool], dict], *, board=None,
              resumable: bool = False, result: Callable[[dict], Any] = lambda rec: rec,
              failed: Callable[[str], Any] | None = None):
    """What every recorded stage does around its work ``body``; ``label`` names it on the progress board.

    The record of an earlier identical run (same key) is reported "skipped" and returned, marked
    ``"skipped": True``, without running anything. Otherwise: report "running", ``stage.begin(resumable)``,
    ``outputs = body(resumed)`` plus ``node_id`` (the Ray node that ran it), ``stage.done(config, inputs,
    outputs, seconds)``, report "done". Either way the stage returns ``result(record)``. When ``body``
    raises and ``failed`` is given, the traceback is printed, ``failed(error text)`` is returned and
    "failed" reported; without ``failed`` the error propagates.
    """
    if rec := stage.finished():
        return result(_skipped(board, label, rec))
    try:
        tell(board, label, "running")
        t0 = time.perf_counter()
        outputs = body(stage.begin(resumable=resumable))
        # Which Ray node ran the stage (on a cluster: a worker node, the head, the driver's node).
        outputs = {**outputs, "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}
        rec = stage.done(config, inputs, outputs, time.perf_counter() - t0)
        tell(board, label, "done", seconds=rec["seconds"])
        return result(rec)
    except Exception as e:
        if failed is None:
            raise
        traceback.print_exc()
        out = failed(_error_text(e))
        tell(board, label, "failed", error=_error_text(e))
        return out


# --- data -------------------------------------------------------------------------------------------

def data_stage(run_uri: str, data_cfg: dict, board=None) -> dict:
    """Write (synth) and ingest the train and val splits. Returns the record; ``outputs.data_dir`` is the
    directory ``visionflow train --data`` takes."""
    from pipelines.dag.config import DataStage

    cfg = DataStage.model_validate(data_cfg)
    run = RunDir(run_uri)
    ident = cfg.identity()
    stage = Stage(run, "data", stage_key("data", ident))
    return run_stage(stage, "data", ident, {}, lambda _: _write_data(run, cfg), board=board)


def _write_data(run: RunDir, cfg) -> dict:
    """The data stage's work: the splits written (synth) and ingested; returns the stage's outputs."""
    from pipelines.data import ingest, quiet_data_console

    quiet_data_console()  # the stage's own lines say how far it is; Ray Data's go to its log file

    if cfg.source == "synth":
        from vision.data.synth import write_synth

        s = cfg.synth
        if run.remote:  # written locally, then uploaded, so every node's ingest task reads the same files
            with tempfile.TemporaryDirectory() as tmp:
                write_synth(tmp, images=s.images, size=s.size, seed=s.seed, val_fraction=s.val_fraction)
                coco = run.upload_dir(tmp, "data/coco")
        else:
            coco = str(write_synth_local(run, s))
        splits = {sp: (f"{coco}/annotations/instances_{sp}.json", f"{coco}/{sp}") for sp in ("train", "val")}
    else:
        splits = {"train": (cfg.train.annotations, cfg.train.images), "val": (cfg.val.annotations, cfg.val.images)}
    counts = {}
    for split, (annotations, images) in splits.items():
        manifest = ingest(annotations, images, run.path(f"data/shards/{split}"), quiet=True)
        counts[split] = {"images": manifest["num_images"], "instances": manifest["num_instances"],
                         "quarantined": len(manifest["quarantined"])}
    return {"data_dir": run.path("data/shards"), "counts": counts}


def write_synth_local(run: RunDir, s) -> str:
    from vision.data.synth import write_synth

    out = run.local("data/coco")
    write_synth(out, images=s.images, size=s.size, seed=s.seed, val_fraction=s.val_fraction)
    return str(out)


# --- train and evaluate one architecture ----------------------------------------------------------

def _branch_failure(run: RunDir, arch: str, step: str, error: str, task: str | None = None,
                    lane: str | None = None) -> dict:
    """Record a failed branch at ``archs/<arch>/failed.json`` (``lane``: the token of the lane that trained
    it); returns the branch's failed result."""
    doc = {"arch": arch, "task": task, "stage": step, "error": error, "time": time.time(),
           **({"lane": lane} if lane else {})}
    run.write_json(f"archs/{arch}/failed.json", doc)
    return {"arch": arch, "task": task, "status": "failed", "stage": step, "error": error}


def _branch(arch: str, settings: dict, rec: dict) -> dict:
    """A training record with the fields every later stage of the branch reads."""
    return {**rec, "arch": arch, "task": settings["task"], "train_dir": rec["outputs"]["run_dir"],
            "train_seconds": rec.get("seconds"), "metrics": rec["outputs"].get("final", {})}


def settle(refs: list) -> None:
    """Wait until the given tasks have ended, successfully or not (the refs are nested in a list, so Ray
    hands them over unresolved and a failure upstream cannot fail this task). The graph's lane-ordering
    nodes name this function; ``graph.submit`` runs them as calls of one gate actor instead of a task each."""
    ray.wait(refs, num_returns=len(refs), timeout=None)


# Settings that change how a training or an evaluation runs, not what it produces: left out of the stage
# keys, so a rerun with another value (more restarts for a run that crashed, more CPUs, a GPU, fewer
# checkpoints kept) resumes the same training instead of setting it aside and starting over.
RUN_ONLY_TRAIN_SETTINGS = frozenset({"placement", "elastic_resize_interval_s", "cpus_per_worker", "gpus_per_worker",
                                     "augment_cpus", "in_memory_mib", "max_failures", "checkpoints_to_keep", "chaos"})
RUN_ONLY_EVAL_SETTINGS = frozenset({"num_cpus", "num_gpus"})


def _without(settings: dict, run_only: frozenset) -> dict:
    return {k: v for k, v in settings.items() if k not in run_only}


def _train_stage_of(run: RunDir, arch: str, settings: dict, data_rec: dict) -> Stage:
    return Stage(run, f"archs/{arch}/train",
                 stage_key("train", _without(settings, RUN_ONLY_TRAIN_SETTINGS), {"data": data_rec["key"]}))


def _eval_stage_of(run: RunDir, arch: str, eval_cfg: dict, train_rec: dict) -> Stage:
    return Stage(run, f"archs/{arch}/eval",
                 stage_key("eval", _without(eval_cfg, RUN_ONLY_EVAL_SETTINGS), {"train": train_rec["key"]}))


def _single_worker(settings: dict) -> bool:
    return settings.get("workers", 1) in (1, "1")


def _lane_result(run: RunDir, arch: str, settings: dict, stage: Stage, token: str) -> dict | None:
    """The branch result of ``arch`` when this run's lane (``token``) already trained it, else None."""
    rec = stage.finished()
    if rec is not None and rec["outputs"].get("lane") == token:
        run.remove(f"archs/{arch}/failed.json")
        return _branch(arch, settings, rec)
    failed = read_record(run, f"archs/{arch}/failed.json")
    if failed and failed.get("lane") == token and rec is None:
        return {"arch": arch, "task": settings["task"], "status": "failed", "stage": "train", "error": failed["error"]}
    return None


def _train_lane(run: RunDir, members: list[tuple[str, dict]], data_rec: dict, board, token: str) -> None:
    """Train ``members`` (arch, settings) one after another in one Ray Train run and record each one's
    training stage as ``train_stage`` would (the lane's ``token`` in the records); the lane reports each
    training's progress to ``board`` itself. A member the lane never finished is left to its own stage."""
    from pipelines.dag import entry_points

    inputs = {"data": data_rec["key"]}
    stages_, resumed = [], []
    for arch, settings in members:
        st = _train_stage_of(run, arch, settings, data_rec)
        resumed.append(st.begin(resumable=True))
        run.remove(f"archs/{arch}/failed.json")
        stages_.append(st)
    results = entry_points.train_lane([(settings, run.path(st.name)) for (_, settings), st in zip(members, stages_)],
                                      data_rec["outputs"]["data_dir"], reporter=board)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    for (arch, settings), st, res, was_resumed in zip(members, stages_, results, resumed):
        if res is None:
            continue
        if isinstance(res, str):
            _branch_failure(run, arch, "train", res, settings.get("task"), lane=token)
            continue
        seconds = res.pop("seconds")
        # The stage's wall time is its turn in the lane (stage_profile reads _started.json and _stage.json).
        run.write_json(f"{st.name}/_started.json", {"key": st.key, "started": time.time() - seconds})
        st.done(settings, inputs, {**res, "resumed": was_resumed, "lane": token, "node_id": node}, seconds)


def train_stage(run_uri: str, arch: str, settings: dict, data_rec: dict, after=None, board=None,
                lane: dict | None = None) -> dict:
    """Train ``arch`` with ``settings`` (TrainConfig fields) on the run's data; ``after`` only orders it
    in its lane. Never raises: a failure is recorded in ``archs/<arch>/failed.json`` and returned as
    ``{"status": "failed", "error"}``.

    ``lane = {"token", "peers": [[arch, settings], ...]}`` names the architectures after this one in its
    lane: when this one and the unfinished ones among them train on one worker each, they all train now,
    in one Ray Train run (``pipelines.train.lane``: one warm worker instead of a new worker group each),
    and each peer's own stage then finds its record (or its failure) under this ``token``."""
    run = RunDir(run_uri)
    name = f"archs/{arch}/train"
    inputs = {"data": data_rec["key"]}
    stage = _train_stage_of(run, arch, settings, data_rec)
    if lane is not None:
        if (ready := _lane_result(run, arch, settings, stage, lane["token"])) is not None:
            return ready
        if stage.finished() is None:
            members = [(arch, settings)] + [(a, s) for a, s in lane["peers"]
                                            if _train_stage_of(run, a, s, data_rec).finished() is None]
            if len(members) > 1 and all(_single_worker(s) for _, s in members):
                try:
                    _train_lane(run, members, data_rec, board, lane["token"])
                except Exception:  # noqa: BLE001 -- the lane as a whole failed: each stage trains on its own
                    traceback.print_exc()
                if (ready := _lane_result(run, arch, settings, stage, lane["token"])) is not None:
                    return ready

    def train(resumed: bool) -> dict:
        run.remove(f"archs/{arch}/failed.json")
        from pipelines.dag import entry_points

        outputs = entry_points.train(settings, data_rec["outputs"]["data_dir"], run.path(name))
        return {**outputs, "resumed": resumed}

    def result(rec: dict) -> dict:
        run.remove(f"archs/{arch}/failed.json")  # a finished training clears an earlier run's failure
        return _branch(arch, settings, rec)

    return run_stage(stage, f"train/{arch}", settings, inputs, train, board=board, resumable=True, result=result,
                     failed=lambda error: _branch_failure(run, arch, "train", error, settings.get("task")))


def eval_stage(run_uri: str, arch: str, eval_cfg: dict, train_rec: dict, data_rec: dict, board=None) -> dict:
    """Evaluate the checkpoint of ``train_rec`` on the val split; writes ``archs/<arch>/eval/metrics.json``.
    A failed training passes through unchanged; never raises."""
    if train_rec.get("status") != "done":
        return train_rec
    run = RunDir(run_uri)
    name = f"archs/{arch}/eval"
    inputs = {"train": train_rec["key"]}
    stage = _eval_stage_of(run, arch, eval_cfg, train_rec)
    base = {k: train_rec[k] for k in ("arch", "task", "train_dir", "train_seconds")}

    def evaluate(_) -> dict:
        from pipelines.dag import entry_points

        metrics = entry_points.evaluate(train_rec["outputs"]["run_dir"], data_rec["outputs"]["data_dir"],
                                        run.path(name), from_training=eval_cfg.get("from_training", True))
        return {"metrics": metrics, "metrics_path": run.write_json(f"{name}/metrics.json", metrics)}

    def result(rec: dict) -> dict:
        run.remove(f"archs/{arch}/failed.json")
        return {**base, **rec, "metrics": rec["outputs"]["metrics"]}

    return run_stage(stage, f"eval/{arch}", eval_cfg, inputs, evaluate, board=board, result=result,
                     failed=lambda error: _branch_failure(run, arch, "eval", error, base["task"]))


# --- compare, robustness, deploy, smoke -----------------------------------------------------------

def resolve_branches(results: list, archs: list[str] | None = None) -> list[dict]:
    """The branch results (ObjectRefs nested in a list, so a crashed branch does not fail the stage that
    gathers them): each resolved, or turned into a failed result naming the error (``"crashed": True``;
    with ``archs``, the branches' architectures in order, it also names its arch and task)."""
    out = []
    for i, item in enumerate(results):
        try:
            out.append(ray.get(item) if isinstance(item, ray.ObjectRef) else item)
        except Exception as e:  # a worker that died (out of memory, killed) mid-branch
            failed = {"arch": None, "task": None, "status": "failed", "stage": "train", "error": _error_text(e),
                      "crashed": True}
            if archs is not None:
                from vision.models import model_task

                failed.update(arch=archs[i], task=model_task(archs[i]))
            out.append(failed)
    return out


def compare_stage(run_uri: str, branches: list, archs: list[str], chart: bool = True, robustness: dict | None = None,
                  board=None) -> dict:
    """The comparison of every architecture of the run (table + chart), failed ones listed with their
    error. Returns ``{"branches": [...], "report": path, "chart": path, "table": path}``."""
    run = RunDir(run_uri)
    results = resolve_branches(branches, archs)
    for r in results:
        if r.pop("crashed", False):
            r.update(_branch_failure(run, r["arch"], r["stage"], r["error"], r["task"]))
            tell(board, f"{r['stage']}/{r['arch']}", "failed", error=r["error"])
    ok = [r for r in results if r.get("status") == "done"]
    failed = [r for r in results if r.get("status") != "done"]
    inputs = {r["arch"]: r.get("key", r.get("error")) for r in results}
    config = {"chart": chart, "robustness": robustness}
    stage = Stage(run, "compare", stage_key("compare", config, inputs))
    return run_stage(stage, "compare", config, inputs,
                     lambda _: _compare_outputs(run, results, archs, ok, chart, robustness), board=board,
                     result=lambda rec: {**rec["outputs"], "branches": results})


def _compare_outputs(run: RunDir, results: list[dict], archs: list[str], ok: list[dict], chart: bool,
                     robustness: dict | None) -> dict:
    """The compare stage's work: the comparison table and chart, and the run's report; returns their paths."""
    outputs = {}
    if ok and chart:
        from pipelines.dag import entry_points

        try:
            # Every branch directory, failed ones included: the table lists them with their error.
            outputs = entry_points.compare([run.path(f"archs/{a}") for a in archs], run.path("compare"))
            outputs = {k: outputs[k] for k in ("table", "chart", "curves", "json") if k in outputs}
        except Exception as e:  # the run's own report below still lists every branch
            traceback.print_exc()
            outputs = {"compare_error": _error_text(e)}
    if robustness:
        outputs["robustness"] = robustness
    report = _report_markdown(results, outputs)
    outputs["report"] = run.write_bytes("compare/report.md", report.encode())
    return outputs


def _headline(metrics: dict) -> tuple[str, float | None]:
    """The metric a branch is ranked and summarised by: COCO AP50 for detectors and instance segmenters
    (the run's summary table; the comparison's table shows AP), localization accuracy, top-1, and mIoU for
    semantic segmenters."""
    for k in ("segm/AP50", "bbox/AP50", "segm/AP", "bbox/AP", "loc_acc", "top1", "miou", "pixel_acc"):
        if isinstance(metrics.get(k), (int, float)):
            return k, float(metrics[k])
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        k = sorted(numeric)[0]
        return k, float(numeric[k])
    return "", None


def _report_markdown(results: list[dict], outputs: dict) -> str:
    lines = ["# visionflow run", "", "| architecture | task | status | metric | value | train s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r.get("task") or "", r["arch"])):
        if r.get("status") == "done":
            k, v = _headline(r["metrics"])
            lines.append(f"| {r['arch']} | {r.get('task', '')} | done | {k} | "
                         f"{'' if v is None else f'{v:.4f}'} | {r.get('train_seconds') or ''} |")
        else:
            err = str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['arch']} | {r.get('task', '')} | failed ({r.get('stage', '?')}) | | {err} | |")
    links = [(k, outputs[k]) for k in ("table", "chart", "curves", "json") if outputs.get(k)]
    rob = outputs.get("robustness") or {}
    if rob.get("error"):
        links.append(("robustness", f"failed: {rob['error']}"))
    for k in ("markdown", "curves", "json"):
        if rob.get(k):
            links.append((f"robustness {k}", rob[k]))
    links += [("robustness examples", p) for p in rob.get("examples", [])]
    for model, vis in (rob.get("visualizations") or {}).items():
        links.append((f"visualizations {model}", vis if isinstance(vis, str) else json.dumps(vis)[:300]))
    if links:
        lines += ["", "## Outputs", ""] + [f"- {k}: {v}" for k, v in links]
    if outputs.get("compare_error"):
        lines += ["", f"The comparison chart failed: {outputs['compare_error']}"]
    return "\n".join(lines) + "\n"


def best_arch(branches: list[dict], task: str) -> dict | None:
    """The finished branch of ``task`` with the highest COCO AP50 (box for detection, mask for
    segmentation), or None. Semantic segmentation models (mIoU, no instances) are not candidates: the
    HTTP contract answers instances."""
    key = {"detection": "bbox/AP50", "segmentation": "segm/AP50"}[task]
    cands = [(r, r["metrics"][key]) for r in branches
             if r.get("status") == "done" and r.get("task") == task and isinstance(r["metrics"].get(key), (int, float))]
    return max(cands, key=lambda rv: rv[1])[0] if cands else None


def robustness_stage(run_uri: str, cfg: dict, branches: list, data_rec: dict, board=None) -> dict:
    """Robustness curves (accuracy against epsilon per attack) of the run's classifiers, side by side, and
    their layer visualizations (the optional stage). Returns the report's paths, or {"error"}."""
    run = RunDir(run_uri)
    results = [r for r in resolve_branches(branches) if r.get("status") == "done" and r.get("task") == "classification"]
    wanted = cfg.get("archs")
    results = [r for r in results if wanted is None or r["arch"] in wanted]
    inputs = {r["arch"]: r["key"] for r in results}
    if not results:  # (no record can match: a stage without classifiers never finishes)
        tell(board, "robustness", "skipped")
        return {"error": "no classifier finished training"}
    stage = Stage(run, "robustness", stage_key("robustness", cfg, inputs))

    def report(_) -> dict:
        from pipelines.dag import entry_points

        train_dirs, data_dir = [r["train_dir"] for r in results], data_rec["outputs"]["data_dir"]
        if not run.remote:
            return entry_points.robustness(train_dirs, data_dir, str(run.local("robustness")), cfg)
        with tempfile.TemporaryDirectory() as tmp:  # written locally, then uploaded next to the rest of the run
            local = entry_points.robustness(train_dirs, data_dir, tmp, cfg)
            run.upload_dir(tmp, "robustness")
            return rebase_paths(local, tmp, run.path("robustness"))

    return run_stage(stage, "robustness", cfg, inputs, report, board=board, result=lambda rec: rec["outputs"],
                     failed=lambda error: {"error": error})


def deploy_serve_args(cfg: dict, served: list[tuple[str, str]]) -> dict:
    """The Serve application's arguments (``ServeArgs``) for ``served`` (architecture, checkpoint) pairs:
    ``deploy.serve`` with its ``model`` (the resources of each served model: a model's own ``model`` field; it
    was merged into the model's top level, which the schema refuses) given to every model."""
    serve = dict(cfg.get("serve") or {})
    resources = serve.pop("model", None)
    return {**serve, "models": [{"name": arch, "checkpoint": ckpt, **({"model": resources} if resources else {})}
                                for arch, ckpt in served]}


def deploy_stage(run_uri: str, cfg: dict, branches: list, archs: list[str], board=None) -> dict:
    """Serve the best detection and segmentation checkpoints (or the configured ones) over HTTP, chosen
    from the branch results (refs in a list, as the comparison gets them, with their ``archs``; a crashed
    branch counts as a failed one of its task). Always runs: a deployment is live state, not a file.
    Returns ``{"url", "models": {...}}`` or an error."""
    run = RunDir(run_uri)
    branches = resolve_branches(branches, archs)
    chosen = {}
    for task, fixed in (("detection", cfg.get("detection_arch")), ("segmentation", cfg.get("segmentation_arch"))):
        pick = next((r for r in branches if r["arch"] == fixed and r.get("status") == "done"), None) if fixed \
            else best_arch(branches, task)
        if pick is not None:
            chosen[task] = pick
    if not chosen:
        servable = [r["arch"] for r in branches if r.get("task") in ("detection", "segmentation")]
        if not servable:  # a run of classifiers only: nothing to serve is not a failure
            out = {"status": "skipped", "reason": "no detection or segmentation architecture in this run"}
            tell(board, "deploy", "skipped")
            return out
        out = {"status": "failed", "error": f"no detection or segmentation architecture finished training ({servable})"}
        tell(board, "deploy", "failed", error=out["error"])
        run.write_json("deploy/deployment.json", out)
        return out
    tell(board, "deploy", "running")
    t0 = time.perf_counter()
    serve_args = deploy_serve_args(cfg, [(r["arch"], r["train_dir"]) for r in chosen.values()])
    try:
        from pipelines.serve import deploy
        from pipelines.serve.config import HttpOptions

        http = HttpOptions.model_validate({k: cfg.get(k) for k in ("host", "port", "request_timeout_s", "proxy_location")
                                           if cfg.get(k) is not None})
        url = deploy(serve_args, http_options=http, timeout_s=cfg.get("timeout_s", 300.0))
    except Exception as e:
        traceback.print_exc()
        out = {"status": "failed", "error": _error_text(e)}
        tell(board, "deploy", "failed", error=out["error"])
        run.write_json("deploy/deployment.json", out)
        return out
    out = {"status": "done", "url": url, "models": {t: r["arch"] for t, r in chosen.items()},
           "seconds": round(time.perf_counter() - t0, 2)}
    run.write_json("deploy/deployment.json", out)
    tell(board, "deploy", "done", seconds=out["seconds"])
    return out


def _val_images(data_dir: str, n: int) -> list[tuple[str, bytes]]:
    """The first ``n`` images of the val split as (file name, encoded bytes)."""
    import pyarrow.parquet as pq

    from pipelines.data import read_manifest

    val = data_dir.rstrip("/") + "/val"
    manifest = read_manifest(val)
    fs_root = RunDir(val)
    out = []
    for shard in manifest.get("shards", []):
        path = fs_root._abs(shard)
        table = pq.read_table(path, columns=["file_name", "image"], filesystem=fs_root.fs)
        for name, img in zip(table.column("file_name").to_pylist(), table.column("image").to_pylist()):
            out.append((name, img))
            if len(out) >= n:
                return out
    return out


def _post(url: str, body: bytes, timeout: float) -> dict:
    kind = "image/png" if body[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    req = urllib.request.Request(url, data=body, headers={"Content-Type": kind}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


SMOKE_ROUTES = {"detection": "detect", "segmentation": "segment"}  # task -> /v1/<route>


def smoke_stage(run_uri: str, cfg: dict, deployed: dict, data_rec: dict, board=None) -> dict:
    """Send a few val images to the deployed endpoints; returns what each found (the run's summary prints it:
    ``runner.format_summary``; printed here, a worker's lines reach the console after the driver's)."""
    run = RunDir(run_uri)
    if deployed.get("status") != "done":
        return {"status": "skipped", "reason": "nothing deployed"}
    tell(board, "smoke", "running")
    images = _val_images(data_rec["outputs"]["data_dir"], cfg["images"])
    found, errors = [], []
    for task, route in SMOKE_ROUTES.items():
        if task not in deployed["models"]:
            continue
        for file_name, data in images:
            url = f"{deployed['url']}/v1/{route}?score_threshold={cfg['score_threshold']}&model={deployed['models'][task]}"
            try:
                res = _post(url, data, cfg["timeout_s"])
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{route} {file_name}: {_error_text(e)}")
                continue
            dets = res.get("detections", res if isinstance(res, list) else [])
            summary = [{"label": d.get("label"), "score": round(float(d.get("score", 0)), 3),
                        "box": [round(float(x), 1) for x in d.get("box", [])], "mask": "mask" in d} for d in dets]
            found.append({"endpoint": f"/v1/{route}", "image": file_name, "detections": summary})
    errors += missing_objects(found, [t for t in cfg.get("expect_objects", []) if t in deployed["models"]],
                              cfg["score_threshold"])
    out = {"status": "done" if found and not errors else "failed", "url": deployed["url"], "results": found,
           "errors": errors}
    run.write_json("smoke/results.json", out)
    tell(board, "smoke", out["status"], **({"error": "; ".join(errors)[:300]} if errors else {}))
    return out


def missing_objects(found: list[dict], expected: list[str], score_threshold: float) -> list[str]:
    """One error per task of ``expected`` whose endpoint answered but found nothing in any smoke image."""
    errors = []
    for task in expected:
        route = SMOKE_ROUTES[task]
        answers = [f for f in found if f["endpoint"] == f"/v1/{route}"]
        if answers and not any(f["detections"] for f in answers):
            errors.append(f"{route}: the {task} model found no object in {len(answers)} val images at score "
                          f">= {score_threshold:g} (smoke.expect_objects)")
    return errors


def finish_stage(run_uri: str, compared: dict, smoke: dict, deployed: dict, robustness: dict | None) -> dict:
    """The run's summary (also written to ``summary.json``)."""
    run = RunDir(run_uri)
    branches = compared["branches"]
    summary = {
        "run_dir": run.uri,
        "archs": [{"arch": r["arch"], "task": r.get("task"), "status": r.get("status"),
                   "metric": _headline(r["metrics"]) if r.get("status") == "done" else None,
                   "error": r.get("error"), "train_dir": r.get("train_dir")} for r in branches],
        "report": compared.get("report"), "table": compared.get("table"), "chart": compared.get("chart"),
        "deploy": deployed, "smoke": smoke, "robustness": robustness,
    }
    summary["failed"] = sorted(a["arch"] for a in summary["archs"] if a["status"] != "done")
    if deployed and deployed.get("status") == "failed":
        summary["failed"].append("deploy")
    if smoke and smoke.get("status") == "failed":
        summary["failed"].append("smoke")
    summary["path"] = run.write_json("summary.json", summary)
    return summary
