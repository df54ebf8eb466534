"""Where the time of a `visionflow run` went: fixed cost against compute, per stage.

Reads a run directory (e.g. ``runs/quickstart`` after ``make run``) and prints, per architecture:

- the training stage's wall time, split into Ray Train's start (controller and worker group, up to the
  training loop), the data pipeline's start (up to the first batch), the steps, the validation passes,
  the rest of the fit (last checkpoint, report, shutdown) and the stage's own cost around the fit (its
  task, the run record, loading the trainer);
- the evaluation stage's wall time (a separate task: its process, the checkpoint, the val split);

then the totals: fixed cost (everything but steps and validation) against compute. Nothing is run; the
figures are those of the run as it happened (under whatever load it ran: the run's own summary says
how long it took). A training stage that was skipped on a rerun, or recorded before phases were kept,
shows only its wall time.

    .venv/bin/python -m benchmarks.stage_profile [RUN_DIR] [--json OUT] [--lane-costs OUT]

``--lane-costs pipelines/dag/lane_costs.json`` writes what the run planner balances its lanes with
(``pipelines.dag.lanes``): per architecture, the seconds of one epoch (steps, validation and the rest of
its fit, over its epochs; not the lane's Ray Train and data start, paid once per lane) and of its
evaluation stage, with the run's time, the load average before it started and the core count
(``summary.json``'s: a run that started loaded, or that predates that record, is refused without
``--allow-load``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import provenance

PARTS = ("train_start_s", "data_start_s", "steps_s", "val_s", "other_s")
COMPUTE = ("steps_s", "val_s")


def _stage(run: Path, name: str) -> dict | None:
    """A stage's record with its wall time (``wall_s``), or None when it has not finished."""
    try:
        rec = json.loads((run / name / "_stage.json").read_text())
        started = json.loads((run / name / "_started.json").read_text())["started"]
    except (OSError, ValueError, KeyError):
        return None
    return {**rec, "wall_s": rec["finished"] - started}


def profile(run: Path) -> dict:
    rows = []
    for arch_dir in sorted(p for p in (run / "archs").iterdir() if p.is_dir() and "@" not in p.name):
        train, ev = _stage(run, f"archs/{arch_dir.name}/train"), _stage(run, f"archs/{arch_dir.name}/eval")
        if train is None:
            continue
        phases = (train.get("outputs") or {}).get("phases") or {}
        row = {"arch": arch_dir.name, "train_wall_s": round(train["wall_s"], 1),
               "eval_wall_s": round(ev["wall_s"], 1) if ev else None}
        if phases:
            row.update({k: phases[k] for k in PARTS})
            row["stage_s"] = round(train["wall_s"] - phases["wall_s"], 2)  # the task around the fit
        rows.append(row)
    with_phases = [r for r in rows if "steps_s" in r]
    compute = sum(r[k] for r in with_phases for k in COMPUTE)
    stage_time = sum(r["train_wall_s"] + (r["eval_wall_s"] or 0) for r in with_phases)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return {"run": str(run), "run_seconds": summary.get("seconds"), "rows": rows,
            "machine": summary.get("machine") or {"load_average_at_start": None, "cores": None},
            "stages_with_phases": len(with_phases),
            "totals": {"stage_time_s": round(stage_time, 1), "compute_s": round(compute, 1),
                       "fixed_s": round(stage_time - compute, 1),
                       **{k: round(sum(r[k] for r in with_phases), 1) for k in PARTS + ("stage_s",)},
                       "eval_s": round(sum(r["eval_wall_s"] or 0 for r in with_phases), 1)}}


def lane_costs(run: Path, prof: dict) -> dict:
    """Per architecture ``{"epoch_s", "eval_s", "limit_train_images"}`` from a profiled run (its rows with
    phases; ``limit_train_images``: the training's setting, None for the whole split). The phases cover
    the training's last fit only: a resumed one ran the epochs from its ``start_epoch``."""
    from pipelines.storage import read_json, read_metrics

    out = {}
    for r in prof["rows"]:
        train_dir = str(run / "archs" / r["arch"] / "train")
        records = read_metrics(train_dir) if "steps_s" in r else []
        if not records:
            continue
        last = records[-1]
        epochs = max(1, int(last["epoch"]) + 1 - int(last.get("start_epoch", 0)))
        out[r["arch"]] = {"epoch_s": round((r["steps_s"] + r["val_s"] + r["other_s"]) / epochs, 2),
                          "eval_s": round(r["eval_wall_s"] or 0.0, 2),
                          "limit_train_images": (read_json(train_dir, "config.json") or {}).get("limit_train_images")}
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/quickstart", help="a visionflow run directory")
    p.add_argument("--json", help="also write the profile as JSON here")
    p.add_argument("--lane-costs", help="write the per-architecture costs the run planner balances lanes with")
    provenance.add_arguments(p)  # --allow-load: write lane costs from a run that started on a loaded machine
    a = p.parse_args(argv)
    run = Path(a.run)
    if not (run / "archs").is_dir():
        print(f"stage_profile: {run} is not a visionflow run directory (no archs/)", file=sys.stderr)
        return 2
    prof = profile(run)
    head = ("arch", "train", "ray-train start", "data start", "steps", "val", "fit rest", "stage", "eval")
    print("seconds per stage (train = the training stage's wall time; its parts follow; eval = the eval stage)")
    print(f"{head[0]:<26}" + "".join(f"{h:>16}" for h in head[1:]))
    for r in prof["rows"]:
        vals = [r["train_wall_s"], *(r.get(k) for k in PARTS), r.get("stage_s"), r["eval_wall_s"]]
        print(f"{r['arch']:<26}" + "".join(f"{_fmt(v):>16}" for v in vals))
    t = prof["totals"]
    print(f"\n{prof['stages_with_phases']} training stages with phases: {t['stage_time_s']} s of stage time "
          f"(train + eval), of which compute (steps + val) {t['compute_s']} s and fixed cost {t['fixed_s']} s: "
          f"Ray Train start {t['train_start_s']}, data start {t['data_start_s']}, fit rest {t['other_s']}, "
          f"stage task {t['stage_s']}, eval stages {t['eval_s']}")
    if prof["run_seconds"]:
        print(f"the run took {prof['run_seconds']} s of wall time (lanes overlap)")
    if a.json:
        Path(a.json).write_text(json.dumps(prof, indent=2) + "\n")
    if a.lane_costs:
        # The figures are the run's: its own load and cores (summary.json), not this script's.
        machine = prof["machine"]
        load = machine.get("load_average_at_start")
        state = {**provenance.begin(a), "load_average": float("inf") if load is None else load,
                 "cores": machine.get("cores") or 1}
        doc = {"run": str(run), "run_seconds": prof["run_seconds"],
               "note": "seconds of one epoch at the run's settings; only the ratios matter",
               "archs": lane_costs(run, prof)}
        if not provenance.write(a.lane_costs, doc, state, indent=1):
            return 1
        print(f"lane costs of {len(doc['archs'])} architectures: {a.lane_costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
