"""Where a fresh run's weights start: ``--init-from PATH`` or ``--pretrained`` (``TrainConfig.init_from``,
``TrainConfig.pretrained``).

- ``--init-from PATH``: a visionflow checkpoint (run directory, checkpoint directory or ``checkpoint.pt``, read
  through ``pipelines.train.checkpoint``) or a torchvision state dict file (a plain ``state_dict`` as
  torchvision publishes them, e.g. ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, or one under a ``"model"``
  key, as torchvision's reference scripts save). Local path or URI, readable from every worker.
- ``--pretrained``: torchvision's published weights for the architecture (the registry entry's ``weights``),
  downloaded into torch's hub cache: needs the internet.

Either way the tensors load by name and shape (``vision.models.weights.load_matching``): the model's
wrapping (``net.``, DDP's ``module.``) is lined up with the file's keys, and a tensor whose shape differs (a
head of another class count) is skipped and stays initialised. Only a fresh run starts from them: a resume
continues from its own checkpoint. The driver checks the source before training starts (``check``: one-line
errors, a record for ``run.json``); each worker then loads it (``apply``) and rank 0 prints the summary.
"""
from __future__ import annotations

import argparse
import io

import torch
import torch.nn as nn

from pipelines import storage


def read_state_dict(path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, label) of ``path``: a visionflow checkpoint or a state dict file. FileNotFoundError or
    ValueError with one line naming what is wrong."""
    import pyarrow.fs as pafs

    path = str(path)
    fs, inner = storage.resolve(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--init-from {path} does not exist")
    if kind == pafs.FileType.Directory:  # a run directory or a checkpoint directory
        from pipelines.train.checkpoint import load_payload

        return dict(load_payload(path)["model"]), path
    try:
        # torchvision's reference scripts save their command line beside the weights (an argparse.Namespace,
        # plain values): allowed, nothing else is.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(storage.read_bytes(fs, inner)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load of a file that is not one raises several kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--init-from {path} is not a state dict torch.load reads with weights_only=True "
                         f"({type(e).__name__}: {reason[:200]})") from None
    for key in ("model", "state_dict"):  # visionflow's checkpoint.pt, torchvision's reference scripts, Lightning
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise ValueError(f"--init-from {path} holds no state dict (names to tensors, or one under a 'model' key)")
    return state, path


def source_state(cfg) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict a config starts from, and its label."""
    if cfg.pretrained:
        from vision.models.weights import published_weights

        return published_weights(cfg.arch, **cfg.model_kwargs)
    return read_state_dict(cfg.init_from)


def apply(model: nn.Module, cfg):
    """Load ``cfg``'s starting weights into ``model`` (in place); returns the ``InitReport`` (None when the
    config starts from the builder's own initialisation)."""
    from vision.models.weights import load_matching

    if not (cfg.init_from or cfg.pretrained):
        return None
    state, label = source_state(cfg)
    return load_matching(model, state, label)


def _shape_model(cfg) -> nn.Module:
    """The model of ``cfg`` for its names and shapes: on the meta device (no memory), else on the CPU."""
    from pipelines.train.tasks import get_task

    task = get_task(cfg.task)
    try:
        with torch.device("meta"):
            return task.build_model(cfg)
    except Exception:  # noqa: BLE001 -- a builder that cannot run on meta is built for real
        return task.build_model(cfg)


def check(cfg) -> dict | None:
    """On the driver, before a fresh run trains: read the source, match it against the model and return
    the record for ``run.json`` (``InitReport.summary``). Raises FileNotFoundError / ValueError (a bad file,
    or nothing in it matches the model) and ``WeightsUnavailable`` (``--pretrained`` offline), one line each."""
    from vision.models.weights import match_state

    if not (cfg.init_from or cfg.pretrained):
        return None
    state, label = source_state(cfg)
    report, _ = match_state(_shape_model(cfg).state_dict(keep_vars=True), state, label)
    if not report.loaded:
        some = ", ".join(list(state)[:3])
        raise ValueError(f"--init-from {label}: none of its {len(state)} tensors ({some}, ...) matches a tensor of "
                         f"{cfg.arch} by name and shape; is it a checkpoint of another architecture?")
    return {**report.summary(), "pretrained": bool(cfg.pretrained)}
