"""A lane: several single-worker trainings, one after another, in one Ray Train run (one warm worker).

Each ``fit`` starts its own Ray Train run: a controller, a worker group, a dataset manager and a split
coordinator per dataset, about eight processes that each import torch: 12-15 s before the first step on
an idle 2-core machine, for trainings whose steps take seconds (``benchmarks/stage_profile.py``).
``fit_lane(cfgs)`` pays that once: its one worker runs ``trainer.train_one`` for each config in turn.

What stays the same as a ``fit`` of each config: the driver-side checks and records (``trainer.prepare``),
the per-epoch progress lines, metrics, curves and checkpoints in each run directory, divergence handling,
``phases.json``. What differs:

- Data: the one worker iterates each dataset itself (``Dataset.iterator()``): nothing to split, so no
  dataset manager or split coordinator processes.
- Checkpoints: written by the worker to ``RUN_DIR/checkpoints/epoch_NNNN/checkpoint.pt`` (a temporary file,
  then a rename), without Ray Train's registry; the loaders take a run's ``epoch_*`` folders when it has no
  registry, and a later ``fit`` of such a run resumes from them (``trainer.RayTrainIO.resume``).
- Failures: a training that raises or diverges ends as ``RUN_DIR/lane.json`` ``{"status": "failed"}`` and
  the lane goes on with the next one. A worker process that dies is restarted by Ray Train
  (``max_failures``): the lane then skips the trainings that ended and resumes the one that was running
  from its last checkpoint. When it dies for good, ``fit`` of an unfinished training resumes from those
  checkpoints too (``RUN_DIR/lane_started.json`` says they are the lane's).
- Progress: ``reporter`` (an actor with ``update(name, status, **info)``, the run's progress board) hears
  ``train/<arch>`` running and done or failed as each training starts and ends.

Only single-worker trainings share a lane: with several workers, one worker's error would leave the
others waiting in a collective (``fit`` handles that; a lane does not).
"""
from __future__ import annotations

import time
import traceback

from pipelines import storage
from pipelines.progress_report import tell
from pipelines.train.config import TrainConfig

LANE_FILE = "lane.json"  # RUN_DIR/lane.json: how this training ended in its lane (status, error, times)
# RUN_DIR/lane_started.json: a lane took this training on, so its checkpoints are the lane's (no registry),
# whether or not the lane ended it: a ``fit`` after a lane whose worker died for good resumes from them.
LANE_STARTED = "lane_started.json"


class LaneIO:
    """``trainer.train_one``'s data and checkpoints in a lane (see the module's docstring)."""

    def __init__(self, datasets: dict):
        self.datasets = datasets
        self.worker_nodes: list[str] | None = None  # set by train_one; one worker splits nothing

    def shard(self, name: str):
        return self.datasets[name].iterator()

    def resume(self, cfg: TrainConfig, device) -> dict | None:
        from pipelines.train.checkpoint import checkpoint_candidates, load_payload

        return load_payload(cfg.out, map_location=device) if checkpoint_candidates(cfg.out) else None

    def save(self, record: dict, model, optimizer, cfg: TrainConfig, epoch: int, rank: int) -> None:
        import torch

        from pipelines.train.trainer import CHECKPOINT_FILE, CHECKPOINTS, checkpoint_dir_name, checkpoint_payload

        run = storage.RunDir(cfg.out)
        name = f"{CHECKPOINTS}/{checkpoint_dir_name(epoch)}/{CHECKPOINT_FILE}"
        with run.open_output(name + ".tmp") as f:  # streamed: no second copy of a 1.6 GB payload in memory
            torch.save(checkpoint_payload(model, optimizer, cfg, epoch), f)
        run.move(name + ".tmp", name)  # a reader never sees half a file under the final name
        storage.append_metrics(cfg.out, record)
        _prune(run, cfg.checkpoints_to_keep)

    def committed(self, cfg: TrainConfig, epoch: int) -> bool:
        """Whether a restart would resume from ``epoch``'s checkpoint (its file is in place)."""
        from pipelines.train.trainer import CHECKPOINT_FILE, CHECKPOINTS, checkpoint_dir_name

        return storage.exists(cfg.out, f"{CHECKPOINTS}/{checkpoint_dir_name(epoch)}/{CHECKPOINT_FILE}")

    def release(self, shard) -> None:
        pass


def _prune(run: storage.RunDir, keep: int | None) -> None:
    from pipelines.train.trainer import CHECKPOINTS

    if not keep:
        return
    folders = sorted(d for d in run.list_dirs(CHECKPOINTS) if d.startswith("epoch_"))
    for old in folders[:-keep]:
        run.remove(f"{CHECKPOINTS}/{old}")


def lane_loop(config: dict) -> None:
    """The lane's worker loop: ``config = {"runs": [{"cfg", "rows", "datasets"}], "reporter", "started_at"}``
    (the driver's clock when it started the lane: the first training's turn includes Ray Train's start)."""
    from pipelines.train.trainer import DIVERGED, train_one

    reporter = config.get("reporter")
    previous_end = config["started_at"]
    for run in config["runs"]:
        cfg = TrainConfig.model_validate(run["cfg"])
        ended = storage.read_json(cfg.out, LANE_FILE)
        if ended is not None:  # ended in an earlier attempt of this lane (before a worker restart)
            previous_end = time.time()
            continue
        began = previous_end
        tell(reporter, f"train/{cfg.arch}", "running")
        doc = {"began_at": began}
        try:
            train_one(cfg, run["rows"], LaneIO(run["datasets"]))
            diverged = storage.read_json(cfg.out, DIVERGED)
            doc.update({"status": "failed", "error": f"TrainingDiverged: {diverged['message']}"} if diverged
                       else {"status": "done"})
        except Exception as e:  # noqa: BLE001 -- one training's error ends that training, not the lane
            traceback.print_exc()
            doc.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        previous_end = doc["ended_at"] = time.time()
        storage.write_json(cfg.out, LANE_FILE, doc)
        tell(reporter, f"train/{cfg.arch}", doc["status"],
             **({"error": doc["error"]} if "error" in doc else {"seconds": round(doc["ended_at"] - began, 2)}))


def fit_lane(cfgs: list[TrainConfig], reporter=None) -> list[dict | BaseException | None]:
    """Train every config of ``cfgs`` (each ``workers == 1``) in one Ray Train run, in order; a rerun
    resumes each from its checkpoints, like ``fit``. Returns, per config, ``fit``'s result dict, the
    exception that ended that training (``TrainingDiverged``, ``RunMismatch``, a build error...), or None
    for a training the lane never finished (its worker died for good before or while it ran: train it
    with ``fit``, which resumes from its checkpoints)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train import watch
    from pipelines.train.checkpoint import registered_checkpoints
    from pipelines.train.trainer import _own_sigint_handler, console_logging, prepare

    results: list = [None] * len(cfgs)
    runs, where, lane_resources = [], [], {}
    for i, cfg in enumerate(cfgs):
        if cfg.workers != 1:
            results[i] = ValueError(f"{cfg.arch}: a lane trains single-worker runs only (workers={cfg.workers})")
            continue
        if registered_checkpoints(cfg.out) is not None:
            continue  # a run Ray Train's registry keeps (an earlier fit of its own): left to fit (None)
        try:
            cfg, out, datasets, resources = prepare(cfg)
        except Exception as e:  # noqa: BLE001 -- that training's error; the others train
            results[i] = e
            continue
        storage.RunDir(out).remove(LANE_FILE)
        storage.write_json(out, LANE_STARTED, {"started_at": time.time()})
        runs.append({"cfg": cfg.model_dump(mode="json"), "datasets": datasets,
                     "rows": watch.expected_split_rows(cfg)})
        where.append((i, cfg, out))
        for k, v in resources.items():  # the one worker holds what the largest training asks for
            lane_resources[k] = max(lane_resources.get(k, 0), v)
    if not runs:
        return results
    first = where[0][2]
    trainer = TorchTrainer(
        lane_loop,
        train_loop_config={"runs": runs, "reporter": reporter, "started_at": time.time()},
        scaling_config=ScalingConfig(num_workers=1, use_gpu="GPU" in lane_resources,
                                     resources_per_worker=lane_resources),
        # Ray Train's own run record of the lane (no checkpoints: each training keeps its own).
        run_config=RunConfig(name="lane", storage_path=storage.join(first, "_lane"), logging_config=console_logging(),
                             failure_config=FailureConfig(max_failures=max(c.max_failures for _, c, _ in where))),
    )
    started_at = time.time()
    with _own_sigint_handler():
        trainer.fit()  # each training's outcome is in its lane.json (one that never ended has none)
    ended_at = time.time()
    for i, cfg, out in where:
        results[i] = _outcome(cfg, out, started_at, ended_at)
    return results


def _outcome(cfg: TrainConfig, out: str, started_at: float, ended_at: float):
    from pipelines.train.trainer import TrainingDiverged, _phases

    doc = storage.read_json(out, LANE_FILE)
    if doc is None:
        return None
    if doc["status"] != "done":
        message = doc.get("error", "failed")
        if message.startswith("TrainingDiverged: "):
            return TrainingDiverged(message.removeprefix("TrainingDiverged: "))
        return RuntimeError(f"training {cfg.arch} failed: {message}")
    records = storage.read_metrics(out)
    from pipelines.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    return {"run_dir": out, "checkpoint": checkpoint.rsplit("/", 1)[0] if checkpoint else None,
            "metrics": records[-1] if records else {}, "epochs_run": len(records),
            "seconds": doc["ended_at"] - doc["began_at"],
            # Its turn in the lane: for the first training that includes the lane's Ray Train start.
            "phases": _phases(out, max(doc["began_at"], started_at), min(doc["ended_at"], ended_at))}
