"""Loading what the trainer saved: ``load_checkpoint(path) -> (model in eval mode, config)``.

``path`` may be a run directory (its latest checkpoint), a checkpoint directory (``.../epoch_NNNN``) or the
``checkpoint.pt`` file itself, on a local path or a URI. Serve, eval, attack and the DAG load through here.
"""
from __future__ import annotations

import io

import torch
import torch.nn as nn

from pipelines.train import storage
from pipelines.train.trainer import CHECKPOINT_FILE, CHECKPOINTS


def latest_checkpoint(run_dir: str) -> str | None:
    """Path (or URI) of the newest ``checkpoint.pt`` of a run directory; None when it has none yet."""
    epochs = [d for d in storage.list_dirs(run_dir, CHECKPOINTS) if d.startswith("epoch_")]
    for name in sorted(epochs, reverse=True):  # zero-padded epoch numbers sort in order
        rel = f"{CHECKPOINTS}/{name}/{CHECKPOINT_FILE}"
        if storage.exists(run_dir, rel):
            return storage.join(str(run_dir), rel)
    return None


def checkpoint_file(path) -> str:
    """The ``checkpoint.pt`` that ``path`` (run dir, checkpoint dir or file) designates; FileNotFoundError
    naming what was looked for otherwise."""
    path = str(path)
    if path.endswith(".pt"):
        if not storage.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        return path
    if storage.exists(path, CHECKPOINT_FILE):
        return storage.join(path, CHECKPOINT_FILE)
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {path}: expected a run directory of `visionflow train` "
                                f"({CHECKPOINTS}/epoch_NNNN/{CHECKPOINT_FILE}), a checkpoint directory or a .pt file")
    return found


def load_payload(path, map_location="cpu") -> dict:
    """The saved dict {"model", "optimizer", "epoch", "config"} (tensors only: ``weights_only=True``)."""
    file = checkpoint_file(path)
    fs, inner = storage.resolve(file)
    data = storage.read_bytes(fs, inner)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


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

    payload = load_payload(path)
    config = dict(payload["config"])
    model = build_from_config(config)
    model.load_state_dict(payload["model"])
    if not is_multi_device(model):
        model.to(device)
    config["epoch"] = payload["epoch"]
    return model.eval(), config
