"""Segmentation: instance masks (Mask R-CNN: COCO bbox + segm AP) or semantic masks rendered from the
COCO instances (FCN / DeepLabV3: per-pixel cross-entropy, mean IoU and pixel accuracy).

The architecture's registry entry says which: ``get_entry(cfg.arch).segmentation`` is ``"instance"`` or
``"semantic"``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.train.distributed import all_reduce_sums
from pipelines.train.tasks import detection as _det

FIND_UNUSED_PARAMETERS = True
MIN_BATCH = _det.MIN_BATCH
IGNORE = 255  # crowd pixels: neither object nor background


def build_model(cfg) -> nn.Module:
    """The registry model ``cfg.arch`` (task segmentation) with ``cfg.num_classes`` object classes."""
    return _det.build_model(cfg)


def view(ds, cfg, *, train: bool, epoch: int):
    """Detection rows plus ``masks`` uint8 (N, H, W), transformed together with the boxes."""
    from pipelines.data import augment

    return augment(ds, task="segmentation", size=cfg.image_size, train=train, seed=cfg.seed, epoch=epoch,
                   num_cpus=cfg.augment_cpus)


collate = _det.collate


def semantic_target(target: dict, height: int, width: int) -> torch.Tensor:
    """Instance masks and labels -> a (H, W) int64 class map: 0 background, 1..K objects, 255 crowd.
    Later (smaller, drawn on top) instances win where masks overlap."""
    out = torch.zeros((height, width), dtype=torch.int64, device=target["labels"].device)
    masks = target["masks"].bool()
    areas = masks.flatten(1).sum(1)
    for k in torch.argsort(areas, descending=True).tolist():
        out[masks[k]] = IGNORE if int(target["iscrowd"][k]) else int(target["labels"][k])
    return out


def padded_batch(images: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes -> one zero-padded batch N,3,H,W and class maps N,H,W (padding ignored),
    so that the model runs one forward (DDP needs exactly one per backward)."""
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    x = images[0].new_zeros((len(images), 3, h, w))
    y = torch.full((len(images), h, w), IGNORE, dtype=torch.int64, device=images[0].device)
    for i, (img, t) in enumerate(zip(images, targets)):
        ih, iw = img.shape[-2:]
        x[i, :, :ih, :iw] = img
        y[i, :ih, :iw] = semantic_target(t, ih, iw)
    return x, y


def _is_semantic(cfg) -> bool:
    from vision.models import get_entry

    return get_entry(cfg.arch).segmentation == "semantic"


def train_step(model, batch, cfg) -> tuple[torch.Tensor, dict]:
    """Mask R-CNN: the sum of its losses (each in stats). Semantic: per-pixel cross-entropy per image."""
    if not _is_semantic(cfg):
        return _det.train_step(model, batch, cfg)
    images, targets = batch
    x, y = padded_batch(images, targets)
    loss = F.cross_entropy(model(x)["out"], y, ignore_index=IGNORE)
    return loss, {"loss_pixels": float(loss.detach()), "n": len(images)}


@torch.no_grad()
def evaluate(model, batches, cfg) -> dict:
    """Instance models: COCO ``bbox/...`` and ``segm/...`` (12 numbers each) and ``images``.
    Semantic models: ``miou`` (over classes 0..K present in prediction or truth), ``pixel_acc``, ``images``."""
    if not _is_semantic(cfg):
        return _det.coco_evaluate(model, batches, cfg, ("bbox", "segm"))
    k = cfg.num_classes + 1
    conf = torch.zeros(k * k, dtype=torch.float64)
    n = 0
    for images, targets in batches:
        for img, t in zip(images, targets):
            pred = model(img[None])["out"][0].argmax(0)
            target = semantic_target(t, *img.shape[-2:])
            valid = target != IGNORE
            conf += torch.bincount((target[valid] * k + pred[valid]).cpu(), minlength=k * k).double()
            n += 1
    sums = all_reduce_sums({**{f"c{i}": float(v) for i, v in enumerate(conf.tolist())}, "n": float(n)})
    conf = torch.tensor([sums[f"c{i}"] for i in range(k * k)], dtype=torch.float64).view(k, k)
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    miou = float((inter[present] / union[present]).mean()) if present.any() else 0.0
    return {"miou": miou, "pixel_acc": float(inter.sum() / conf.sum().clamp(min=1)), "images": int(sums["n"])}
