"""Detection: ragged batches of whole images -> a registry detector; COCO bbox AP (pycocotools).

Batches come from ``iter_batches`` (images of different sizes, any number of boxes) and are collated
by ``pipelines.data.collate_detection``. Crowd regions are left out of training targets (they mark
areas, not objects) and kept in the ground truth of evaluation, where COCOeval ignores matches on them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Some heads get no gradient in a step (e.g. the mask head of an image without objects).
FIND_UNUSED_PARAMETERS = True
# SSD's last feature maps and DeepLab's image pooling are 1x1: batch norm needs two images there.
MIN_BATCH = 2
IOU_TYPES = ("bbox",)


def build_model(cfg) -> nn.Module:
    """The registry detector ``cfg.arch`` with ``cfg.num_classes`` object classes."""
    from vision.models import create_model

    return create_model(cfg.arch, num_classes=cfg.num_classes, **cfg.model_kwargs)


def view(ds, cfg, *, train: bool, epoch: int):
    """Rows {image_id, image uint8 HxWx3, boxes, labels 1..K, iscrowd}: train scale-jittered around
    ``cfg.image_size`` and flipped, eval at the original size."""
    from pipelines.data import augment

    return augment(ds, task="detection", size=cfg.image_size, train=train, seed=cfg.seed, epoch=epoch,
                   num_cpus=cfg.augment_cpus)


def collate(batch: dict, device) -> tuple[list[torch.Tensor], list[dict]]:
    """A numpy batch of view rows -> (list of float CHW images in [0, 1], list of target dicts) on ``device``."""
    from pipelines.data import collate_detection

    images, targets = collate_detection(batch)
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def training_targets(targets: list[dict]) -> list[dict]:
    """Targets without crowd instances, labels int64, boxes float (what the detectors train on)."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0 if "iscrowd" in t else slice(None)
        d = {"boxes": t["boxes"][keep].float(), "labels": t["labels"][keep].long()}
        if "masks" in t:
            d["masks"] = t["masks"][keep]
        out.append(d)
    return out


def train_step(model, batch, cfg) -> tuple[torch.Tensor, dict]:
    """Sum of the detector's losses; stats hold each loss separately (Faster R-CNN: its four) and ``n``."""
    images, targets = batch
    losses = model(images, training_targets(targets))
    loss = sum(losses.values())
    return loss, {**{k: float(v.detach()) for k, v in losses.items()}, "n": len(images)}


def ground_truth_row(image: torch.Tensor, target: dict) -> dict:
    """One evaluated image as a ground-truth row for ``CocoEvaluator`` (labels mapped there)."""
    row = {"image_id": int(target["image_id"]), "height": int(image.shape[-2]), "width": int(image.shape[-1]),
           "boxes": target["boxes"].detach().cpu().numpy(), "labels": target["labels"].detach().cpu().numpy(),
           "iscrowd": target["iscrowd"].detach().cpu().numpy()}
    if "masks" in target:
        row["masks"] = target["masks"].detach().cpu().numpy()
    return row


@torch.no_grad()
def coco_evaluate(model, batches, cfg, iou_types=IOU_TYPES) -> dict:
    """COCOeval over the val batches of every worker: each worker predicts its shard, the states are
    gathered (keyed by image id, so each image counts once), every rank computes the same numbers."""
    from vision.metrics import CocoEvaluator
    from vision.structures import Detections

    ev = CocoEvaluator(cfg.categories, iou_types)
    for images, targets in batches:
        outputs = model(images)
        ev.add_ground_truth(ground_truth_row(img, t) for img, t in zip(images, targets))
        for t, out in zip(targets, outputs):
            # float32 for COCO: under autocast boxes/scores/masks may be fp16
            out = {k: (v if k == "labels" else v.float()) for k, v in out.items()}
            ev.add(int(t["image_id"]), Detections.from_dict(out).to("cpu"))
    ev.gather()
    metrics = ev.compute()
    metrics["images"] = int(metrics.pop("num_images"))
    return metrics


def evaluate(model, batches, cfg) -> dict:
    """COCO bbox AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l (``bbox/...``) and ``images``."""
    return coco_evaluate(model, batches, cfg, ("bbox",))
