"""Classification: object crops -> class (top-1 / top-5). GoogLeNet's aux losses weigh ``cfg.aux_weight``."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.train.defenses import adversarial_images, tempered_loss, uses_temperature
from pipelines.train.devices import tower_devices, wants_devices
from pipelines.train.distributed import all_reduce_sums

MIN_BATCH = 2  # batch norm in training mode needs two samples: the loop skips smaller (last) batches


def build_model(cfg) -> nn.Module:
    """The registry classifier ``cfg.arch`` with ``cfg.num_classes`` outputs (a two-tower model gets two devices)."""
    from vision.models import create_model, get_entry

    kw = dict(cfg.model_kwargs)
    if wants_devices(get_entry(cfg.arch).builder) and "devices" not in kw:
        kw["devices"] = tower_devices()
    return create_model(cfg.arch, num_classes=cfg.num_classes, **kw)


def view(ds, cfg, *, train: bool, epoch: int):
    """Object crops of ``cfg.image_size``: rows {image uint8 HxWx3, label 0..K-1}."""
    from pipelines.data import augment

    return augment(ds, task="classification", size=cfg.image_size, train=train, seed=cfg.seed, epoch=epoch,
                   num_cpus=cfg.augment_cpus)


def images_to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 N,H,W,3 -> float N,3,H,W in [0, 1] on ``device`` (moved as uint8: a quarter of the bytes)."""
    x = torch.from_numpy(np.require(images, requirements=("C", "W"))).to(device, non_blocking=True)  # Ray: read-only
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def collate(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch of view rows -> (images float N,3,H,W, labels int64 N) on ``device``."""
    labels = torch.tensor(np.asarray(batch["label"]), dtype=torch.int64, device=device)  # copied (read-only in Ray)
    return images_to_tensor(batch["image"], device), labels


def classification_loss(outputs, labels: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the main logits (+ ``cfg.aux_weight`` x each auxiliary head's) -> (loss, logits)."""
    logits, aux = (outputs[0], outputs[1:]) if isinstance(outputs, tuple) else (outputs, ())
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
    for a in aux:
        loss = loss + cfg.aux_weight * F.cross_entropy(a.float(), labels, label_smoothing=cfg.label_smoothing)
    return loss, logits


def train_step(model, batch, cfg) -> tuple[torch.Tensor, dict]:
    """One forward pass: (loss, {"top1": batch accuracy, "n": images})."""
    images, labels = batch
    if cfg.adversarial != "none":  # adversarial training: part of the batch attacked
        images = adversarial_images(model, images, labels, cfg)
    outputs = model(images)
    loss, logits = classification_loss(outputs, labels, cfg)
    if uses_temperature(cfg):  # defensive distillation: teacher at T, or student on its soft labels
        loss = tempered_loss(outputs, images, labels, cfg)
    top1 = (logits.detach().argmax(1) == labels.to(logits.device)).float().mean()
    return loss, {"top1": float(top1), "n": len(labels)}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the ``k`` highest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())


@torch.no_grad()
def evaluate(model, batches, cfg) -> dict:
    """Top-1, top-5 and mean loss over this worker's batches, summed over all workers. Top-5 only for more
    than 5 classes: with 5 or fewer every label is among the 5 highest logits (1.0 whatever the model)."""
    sums = {"n": 0.0, "top1": 0.0, "loss": 0.0}
    top5 = cfg.num_classes is None or cfg.num_classes > 5
    if top5:
        sums["top5"] = 0.0
    for images, labels in batches:
        logits = model(images)
        logits, labels = logits.float(), labels.to(logits.device)
        sums["n"] += len(labels)
        sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
        sums["top1"] += topk_correct(logits, labels, 1)
        if top5:
            sums["top5"] += topk_correct(logits, labels, 5)
    sums = all_reduce_sums(sums)
    n = max(sums["n"], 1.0)
    return {"top1": sums["top1"] / n, **({"top5": sums["top5"] / n} if top5 else {}), "loss": sums["loss"] / n,
            "images": int(sums["n"])}
