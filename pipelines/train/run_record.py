"""What a run directory was started with: ``RUN_DIR/run.json``, checked before a rerun resumes it.

A rerun of `visionflow train --out RUN_DIR` continues from the run's last checkpoint, so it must train the
same model on the same data. ``run.json`` records, when the run starts:

- ``data``: the SHA-256 of the train and val split manifests (``_manifest.json``, which lists the split's
  shard files and counts: another ingest, even of the same images, is other data) and the classes. The
  data directory's path is recorded for the message only: a copied or moved data directory is the same data.
- ``model``: the settings that decide the model's shape and the saved optimizer state (``MODEL_KEYS``).
- ``init`` (a run started from other weights: ``--init-from``, ``--pretrained``): where its weights came
  from and what loaded (``pipelines.train.init_weights.check``). A record, not a check: those flags act only at
  the start of a fresh run (a resume continues from its own checkpoint, whatever they say now), so they are
  not model settings; a resume keeps the ``init`` of the run's start.

Everything else may change between resumes: ``--epochs`` (to train longer), ``--lr`` (after a divergence),
the schedule, batch size, workers, devices, seed, adversarial training... A rerun whose data or model
differ is refused (``RunMismatch``, one line naming what differs) unless it asks for ``restart``, which
clears the run's checkpoints, metrics and records first.
"""
from __future__ import annotations

import hashlib
import json
import os

from pipelines import storage

RUN_FILE = "run.json"
MODEL_KEYS = ("task", "arch", "model_kwargs", "num_classes", "image_size", "optimizer")
SPLITS = ("train", "val")


class RunMismatch(ValueError):
    """A rerun on a run directory that was started with other data or another model."""


def _sha256(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(cfg) -> dict:
    """``{"data": {...}, "model": {...}}`` of a resolved ``TrainConfig`` (categories filled in)."""
    from pipelines.data import read_manifest

    data = {"path": str(cfg.data), "classes": [c.get("name") for c in cfg.categories]}
    for split in SPLITS:
        data[f"{split}_manifest_sha256"] = _sha256(read_manifest(storage.join(str(cfg.data), split)))
    return {"data": data, "model": {k: getattr(cfg, k) for k in MODEL_KEYS}}


def _differences(old: dict, new: dict) -> list[str]:
    said = []
    old_model, new_model = old.get("model", {}), new["model"]
    for key in MODEL_KEYS:
        if key in old_model and old_model[key] != new_model[key]:
            said.append(f"--{key.replace('_', '-')} {old_model[key]!r} then, {new_model[key]!r} now")
    old_data, new_data = old.get("data", {}), new["data"]
    if "classes" in old_data and old_data["classes"] != new_data["classes"]:
        said.append(f"classes {old_data['classes']} then, {new_data['classes']} now")
    else:
        changed = [s for s in SPLITS if f"{s}_manifest_sha256" in old_data
                   and old_data[f"{s}_manifest_sha256"] != new_data[f"{s}_manifest_sha256"]]
        if changed:
            where = (f"--data {old_data.get('path')} then, {new_data['path']} now"
                     if old_data.get("path") != new_data["path"] else f"--data {new_data['path']} was ingested again")
            said.append(f"the {' and '.join(changed)} data ({where})")
    return said


def _legacy(run: storage.RunDir) -> dict:
    """What a run directory written before ``run.json`` existed tells: the model settings and classes of
    its ``config.json`` (no manifest hashes)."""
    config = run.read_json("config.json") or {}
    return {"model": {k: config[k] for k in MODEL_KEYS if k in config},
            "data": {"path": config.get("data"),
                     **({"classes": [c.get("name") for c in config["categories"]]} if config.get("categories") else {})}}


def _cleared() -> tuple[str, ...]:
    from pipelines.train.trainer import CHECKPOINTS, DIVERGED
    from pipelines.train.watch import CURVES, METRICS_CSV, TENSORBOARD

    return CHECKPOINTS, storage.METRICS, METRICS_CSV, TENSORBOARD, CURVES, RUN_FILE, "config.json", DIVERGED


def clear(out: str) -> None:
    """Delete what a run wrote: Ray Train's checkpoints and registry, the metrics (with their CSV, TensorBoard
    events and curves) and the run's records."""
    run = storage.RunDir(out)
    for name in _cleared():
        run.remove(name)


def not_a_run(run) -> list[str]:
    """What a training would delete (``--restart``) or overwrite in ``run`` when that folder is not a visionflow
    run (no ``run.json``, no run ``config.json`` of before it): ``--out .`` or a project folder with its own
    ``config.json`` or ``checkpoints/``. Empty for a run, a new folder, or one without those names."""
    if run.exists(RUN_FILE):
        return []
    try:
        config = run.read_json("config.json")
    except ValueError:  # not JSON: not a config a run wrote
        config = None
    if isinstance(config, dict) and {"arch", "task", "data"} <= set(config):
        return []  # a run from before run.json existed
    return [name for name in _cleared() if run.exists(name)]


def check_restart_keeps(out: str, sources: dict[str, str | None]) -> None:
    """Before ``clear``: a source the workers read after it (``{"--init-from": path, ...}``) must not be what
    it deletes, the run itself or its checkpoints (``--restart --init-from RUN`` deleted the weights it was
    to start from, then failed). ValueError, one line."""
    def norm(path: str) -> str:
        return path.rstrip("/") if "://" in path else os.path.realpath(path)

    run = norm(out)
    gone = [run] + [f"{run}/{name}" for name in _cleared()]
    for flag, source in sources.items():
        if source and any(norm(source) == g or norm(source).startswith(g + "/") for g in gone):
            raise ValueError(f"{flag} {source} is this run's own weights, which --restart deletes before the training "
                             f"reads them: copy the checkpoint out of {out} first (or rerun without --restart to "
                             "resume the run)")


def start(out: str, cfg, *, restart: bool = False, init: dict | None = None) -> dict:
    """Check ``cfg`` against the run directory ``out`` and record it in ``out/run.json``.

    With ``restart`` the run's checkpoints and metrics are deleted first. Otherwise, when the run has a
    checkpoint to resume from, its recorded data and model must equal ``cfg``'s (``RunMismatch`` names
    what differs), and the run keeps its recorded ``init``; a fresh run records ``init`` (where its
    starting weights came from) when given. Returns the record written."""
    from pipelines.train.checkpoint import checkpoint_candidates

    new = fingerprint(cfg)
    run = storage.RunDir(out)
    foreign = not_a_run(run)
    if foreign:
        raise ValueError(f"{out} is not a visionflow run, yet it holds {', '.join(foreign)}, which a training would "
                         f"{'delete' if restart else 'overwrite or add to'}: give a new or empty --out")
    if restart:
        clear(out)
    elif checkpoint_candidates(out):
        old = run.read_json(RUN_FILE) or _legacy(run)
        differences = _differences(old, new)
        if differences:
            raise RunMismatch(
                f"{out} holds a run of other data or another model ({'; '.join(differences)}), and a rerun "
                "resumes it: pass --restart to delete its checkpoints and metrics and train from scratch, or "
                "give a new --out")
        init = old.get("init")
    if init:
        new["init"] = init
    run.write_json(RUN_FILE, new)
    return new
