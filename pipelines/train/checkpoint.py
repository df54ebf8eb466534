"""Loading what the trainer saved: ``load_checkpoint(path) -> (model in eval mode, config)``.

``path`` may be a run directory (its latest checkpoint), a checkpoint directory (``.../epoch_NNNN``) or the
``checkpoint.pt`` file itself, on a local path or a URI. Serve, eval, attack and the DAG load through here.

A run directory's checkpoints are the ones Ray Train *registered*: its controller records a checkpoint in
``RUN_DIR/checkpoints/checkpoint_manager_snapshot.json`` only once the upload is complete, so an
``epoch_NNNN`` folder it never registered (a worker killed while uploading) is never taken. The newest
registered checkpoint is loaded; if its file is unreadable (a torn write), the one registered before it is,
with a warning. A run without that registry (none was written) falls back to its ``epoch_*`` folders,
newest first, with the same readability fallback.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import pyarrow.fs as pafs
import torch
import torch.nn as nn

from pipelines import storage
from pipelines.train.trainer import CHECKPOINT_FILE, CHECKPOINTS

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint registry in its run folder


def registered_checkpoints(run_dir: str) -> list[str] | None:
    """Names of the checkpoint folders Ray Train registered for the run directory, oldest first (the last
    is the latest); None when the run has no registry. Read through ``ray.train.Result.from_path``; when that
    refuses the registry (a format of another Ray version it cannot parse, or a registered folder that was
    deleted since), the list is read from the registry file itself."""
    run = storage.RunDir(run_dir)
    if not run.exists(f"{CHECKPOINTS}/{SNAPSHOT}"):
        return None
    try:
        from ray.train import Result

        with _quiet(_RAY_CHECKPOINT_LOGGER):  # its INFO line about resuming a training is not for a loader
            result = Result.from_path(run.path(CHECKPOINTS))
        names = [_base_name(c.path) for c, _ in result.best_checkpoints or []]
        latest = _base_name(result.checkpoint.path) if result.checkpoint is not None else None
        if latest is not None and latest in names:  # the latest last, whatever order the list has
            names = [n for n in names if n != latest] + [latest]
        return names
    except Exception as e:  # noqa: BLE001 -- any refusal: read the registry file itself
        try:
            snapshot = json.loads(run.read_bytes(f"{CHECKPOINTS}/{SNAPSHOT}"))
            names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
        except (ValueError, KeyError, TypeError, OSError) as unreadable:
            warnings.warn(f"{run.path(CHECKPOINTS)}/{SNAPSHOT} is unreadable ({unreadable}; Ray Train: {e}); "
                          "taking the checkpoint folders as they are", RuntimeWarning, stacklevel=2)
            return None
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest in names:
            names = [n for n in names if n != latest] + [latest]
        return names


_RAY_CHECKPOINT_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _base_name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def checkpoint_candidates(run_dir: str) -> list[str]:
    """Paths (or URIs) of a run directory's ``checkpoint.pt`` files, newest first: the registered ones when
    the run has a registry, otherwise every ``epoch_*`` folder's (zero-padded, so names sort in order)."""
    names = registered_checkpoints(run_dir)
    if names is None:
        names = sorted(d for d in storage.list_dirs(run_dir, CHECKPOINTS) if d.startswith("epoch_"))
    found = []
    for name in reversed(names):
        rel = f"{CHECKPOINTS}/{name}/{CHECKPOINT_FILE}"
        if storage.exists(run_dir, rel):
            found.append(storage.join(str(run_dir), rel))
    return found


def latest_checkpoint(run_dir: str) -> str | None:
    """Path (or URI) of the newest registered ``checkpoint.pt`` of a run directory; None when it has none
    yet. The file is not read: ``load_payload`` falls back to an older one when it is unreadable."""
    found = checkpoint_candidates(run_dir)
    return found[0] if found else None


def checkpoint_file(path) -> str:
    """The ``checkpoint.pt`` that ``path`` (run dir, checkpoint dir or file) designates (for a run directory
    its newest registered one); FileNotFoundError naming what was looked for otherwise."""
    files, _ = _checkpoint_files(path)
    return files[0]


def _checkpoint_files(path) -> tuple[list[str], bool]:
    """What ``path`` designates, to try in order, and whether it is a run directory (newest first)."""
    path = str(path)
    if path.endswith(".pt"):
        if not storage.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        return [path], False
    if storage.exists(path, CHECKPOINT_FILE):
        return [storage.join(path, CHECKPOINT_FILE)], False
    found = checkpoint_candidates(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {path}: expected a run directory of `visionflow train` "
                                f"({CHECKPOINTS}/epoch_NNNN/{CHECKPOINT_FILE}), a checkpoint directory or a .pt file")
    return found, True


def _read(file: str, map_location, mmap: bool = False) -> dict:
    fs, inner = storage.resolve(file)
    try:
        if mmap and isinstance(fs, pafs.LocalFileSystem):
            # Mapped, not read: only the tensors used are paged in (VGG-16's 1.6 GB checkpoint is two thirds
            # optimizer state, which a model load never touches: 0.01 s against 2-10 s to read it all).
            payload = torch.load(inner, map_location=map_location, weights_only=True, mmap=True)
        else:
            payload = torch.load(io.BytesIO(storage.read_bytes(fs, inner)), map_location=map_location,
                                 weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 -- a torn or foreign file: torch raises several kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{file} is not a readable checkpoint (torn, or not written by torch.save: "
                         f"{type(e).__name__}: {first[:200]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) \
            or not isinstance(payload.get("config"), dict):
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{file} is not a visionflow checkpoint: it needs a 'model' state dict and the 'config' "
                         f"it was trained with (it has {keys}); a torchvision state dict or another trainer's "
                         f"checkpoint starts a training instead: visionflow train --init-from")
    return payload


def load_payload(path, map_location="cpu", *, mmap: bool = False) -> dict:
    """The saved dict {"model", "optimizer", "epoch", "config"} (tensors only: ``weights_only=True``; no
    "optimizer" in a run trained with ``save_optimizer`` off).

    ``mmap``: a local file is memory-mapped (copy-on-write) instead of read whole, for a caller that copies
    the tensors it needs (a model's ``load_state_dict``) and drops the rest; the file must not be rewritten
    in place while they are in use (checkpoints never are: each epoch writes a new directory).

    For a run directory: the newest registered checkpoint that reads; each unreadable one (a torn write) is
    skipped with a warning naming it. A checkpoint file or directory named directly is read as it is."""
    files, run_dir = _checkpoint_files(path)
    if not run_dir:
        return _read(files[0], map_location, mmap)
    errors = []
    for file in files:
        try:
            return _read(file, map_location, mmap)
        except Exception as e:  # noqa: BLE001 -- torch.load of a torn file raises several kinds
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            errors.append(f"{file} ({reason})")
            warnings.warn(f"checkpoint {file} is unreadable ({reason}); trying the one before it",
                          RuntimeWarning, stacklevel=2)
    raise RuntimeError(f"no readable checkpoint under {path}: " + "; ".join(errors))


def category_names(categories) -> list:
    """The names of a manifest's (or a config's) ``categories`` in label order."""
    return [c.get("name") for c in sorted(categories or [], key=lambda c: c.get("label", 0))]


def check_categories(config: dict, found: list, checkpoint, data) -> None:
    """ValueError, naming both lists, when the class names ``found`` in the data (``data``: where they were
    read) are not the categories ``checkpoint``'s ``config`` was trained on, in the same label order: a model
    scored against other labels reads as a poor model. Nothing to check for a config that lists none."""
    trained = category_names(config.get("categories"))
    if trained and trained != list(found):
        raise ValueError(f"{checkpoint} was trained on the classes {_listed(trained)}; {data} has "
                         f"{_listed(found)}: use data ingested with the same categories in the same order")


def _listed(names: list, most: int = 8) -> str:
    shown = ", ".join(str(n) for n in names[:most])
    return f"[{shown}{', ...' if len(names) > most else ''}] ({len(names)})"


def build_from_config(config: dict) -> nn.Module:
    """A fresh model of a checkpoint's ``config`` (through the task plug-in that trained it)."""
    from pipelines.train.config import TrainConfig
    from pipelines.train.tasks import get_task

    cfg = TrainConfig.model_validate(config)
    return get_task(cfg.task).build_model(cfg)


def load_checkpoint(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``path`` (run dir, checkpoint dir or ``.pt``) -> (model with the saved weights, in eval mode, on
    ``device``; config dict with at least task, arch, num_classes, image_size, categories, epoch)."""
    from pipelines.train.devices import is_multi_device

    payload = load_payload(path, mmap=True)
    config = dict(payload["config"])
    model = build_from_config(config)
    model.load_state_dict(payload["model"])
    if not is_multi_device(model):
        model.to(device)
    config["epoch"] = payload["epoch"]
    return model.eval(), config
