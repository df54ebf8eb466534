"""Localization: one object per image, class + box; accuracy = class right and IoU >= 0.5."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torchvision.ops import box_iou

from pipelines.train.distributed import all_reduce_sums
from pipelines.train.tasks.classification import MIN_BATCH, images_to_tensor  # noqa: F401  (the loop reads it)


def build_model(cfg) -> nn.Module:
    """``cfg.arch`` a registered localizer, or a classifier used as the backbone of ``localizer``."""
    from vision.models import create_model, get_entry

    if get_entry(cfg.arch).task == "localization":
        return create_model(cfg.arch, num_classes=cfg.num_classes, **cfg.model_kwargs)
    return create_model("localizer", num_classes=cfg.num_classes, backbone=cfg.arch, **cfg.model_kwargs)


def view(ds, cfg, *, train: bool, epoch: int):
    """Rows {image uint8 HxWx3, label 0..K-1, box float32[4] xyxy pixels} of ``cfg.image_size``."""
    from pipelines.data import augment

    return augment(ds, task="localization", size=cfg.image_size, train=train, seed=cfg.seed, epoch=epoch,
                   num_cpus=cfg.augment_cpus)


def collate(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A numpy batch -> (images float N,3,H,W in [0, 1], labels int64 N, boxes float32 N,4) on ``device``."""
    labels = torch.tensor(np.asarray(batch["label"]), dtype=torch.int64, device=device)  # copied (read-only in Ray)
    boxes = torch.tensor(np.asarray(batch["box"]).reshape(-1, 4), dtype=torch.float32, device=device)
    return images_to_tensor(batch["image"], device), labels, boxes


def train_step(model, batch, cfg) -> tuple[torch.Tensor, dict]:
    """(cross-entropy + smooth L1 + GIoU + centre cross-entropy, {"cls_loss", "box_loss", "centre_loss",
    "loc_acc", "n"}); ``loc_acc`` here is read at the true centre's cell, val reads the predicted one."""
    from vision.models.localization import localization_hits, localization_loss

    images, labels, boxes = batch
    # read at the cell of each true centre, plus the loss of the centre scores
    logits, pred, centre_loss = model(images, boxes)
    loss, parts = localization_loss(logits, pred, labels, boxes, tuple(images.shape[-2:]))
    hits = localization_hits(logits.detach(), pred.detach(), labels, boxes)
    return loss + centre_loss, {**parts, "centre_loss": float(centre_loss.detach()),
                                "loc_acc": float(hits.float().mean()), "n": len(labels)}


@torch.no_grad()
def evaluate(model, batches, cfg) -> dict:
    """Localization accuracy (class right and IoU >= 0.5), top-1 and mean IoU, summed over all workers."""
    from vision.models.localization import localization_hits, localization_loss

    sums = {"n": 0.0, "loc_acc": 0.0, "top1": 0.0, "iou": 0.0, "loss": 0.0}
    for images, labels, boxes in batches:
        logits, pred = model(images)
        n = len(labels)
        sums["n"] += n
        sums["loc_acc"] += float(localization_hits(logits, pred, labels, boxes).sum())
        sums["top1"] += float((logits.argmax(1) == labels).sum())
        sums["iou"] += float(box_iou(pred.float(), boxes).diagonal().sum())
        sums["loss"] += float(localization_loss(logits, pred, labels, boxes, tuple(images.shape[-2:]))[0]) * n
    sums = all_reduce_sums(sums)
    n = max(sums["n"], 1.0)
    return {"loc_acc": sums["loc_acc"] / n, "top1": sums["top1"] / n, "iou": sums["iou"] / n,
            "loss": sums["loss"] / n, "images": int(sums["n"])}
