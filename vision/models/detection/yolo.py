"""YOLO, v1-style (Redmon et al. 2016), written here: a fixed S x S grid over a resized image; each cell
predicts B boxes (x, y offsets in the cell, sqrt w, sqrt h relative to the image, a confidence) and one
class distribution; the cell holding an object's centre is responsible for it, and of its B boxes the
one with the highest IoU. Sum-squared losses with lambda_coord = 5 and lambda_noobj = 0.5 as in the
paper; NMS after. The backbone is a torchvision ResNet-18 to stride 16 (trainable from scratch).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor

from vision.models.detection.base import CandidateDetector, check_images, inference
from vision.ops import box_iou
from vision.structures import Detections
from vision.models.registry import register_model


class YOLOv1(CandidateDetector):
    """v1-style YOLO. ``num_classes`` object classes (labels 1..K), input resized to ``image_size``
    (a multiple of 16), grid S = image_size / 16, ``boxes_per_cell`` B."""

    def __init__(self, num_classes: int, *, image_size: int = 256, boxes_per_cell: int = 2,
                 score_thresh: float = 0.01, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 lambda_coord: float = 5.0, lambda_noobj: float = 0.5, pretrained: bool = False):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the grid stride), got {image_size}")
        self.num_classes, self.image_size, self.B = int(num_classes), int(image_size), int(boxes_per_cell)
        self.S = self.image_size // 16
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.lambda_coord, self.lambda_noobj = lambda_coord, lambda_noobj
        net = torchvision.models.resnet18(weights="DEFAULT" if pretrained else None)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.head = nn.Sequential(
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.1),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.1),
            nn.Conv2d(256, self.B * 5 + self.num_classes, 1))
        with torch.no_grad():  # start with low confidences: most cells hold no object
            self.head[-1].bias[4: self.B * 5: 5] = -4.0
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    # -- shared pieces ------------------------------------------------------------------------
    def _batch(self, images: list[Tensor]) -> Tensor:
        x = torch.stack([F.interpolate(img[None], size=(self.image_size,) * 2, mode="bilinear",
                                       align_corners=False)[0] for img in images])
        return (x - self.mean) / self.std

    def _raw(self, images: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """-> boxes (N, S, S, B, 4) as (cx, cy) in cell units and (sqrt w, sqrt h) in image units,
        confidences (N, S, S, B), class logits (N, S, S, K)."""
        out = self.head(self.backbone(self._batch(images))).permute(0, 2, 3, 1)
        n, S = out.shape[0], self.S
        box = out[..., : self.B * 5].reshape(n, S, S, self.B, 5)
        xy = torch.sigmoid(box[..., :2])
        wh = torch.sigmoid(box[..., 2:4])  # sqrt(w), sqrt(h) as fractions of the image
        conf = torch.sigmoid(box[..., 4])
        return torch.cat([xy, wh], -1), conf, out[..., self.B * 5:]

    def _to_xyxy(self, box: Tensor) -> Tensor:
        """(…, S, S, B, 4) grid encoding -> xyxy in pixels of the resized image."""
        S, cell = self.S, self.image_size / self.S
        gy, gx = torch.meshgrid(torch.arange(S, device=box.device), torch.arange(S, device=box.device),
                                indexing="ij")
        cx = (box[..., 0] + gx[..., None]) * cell
        cy = (box[..., 1] + gy[..., None]) * cell
        w = box[..., 2] ** 2 * self.image_size
        h = box[..., 3] ** 2 * self.image_size
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    # -- training -----------------------------------------------------------------------------
    def compute_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """v1 sum-squared losses, averaged over images: ``loss_coord``, ``loss_obj``, ``loss_noobj``, ``loss_class``."""
        box, conf, cls_logits = self._raw(images)
        pred_xyxy = self._to_xyxy(box)
        cls_prob = F.softmax(cls_logits, -1)
        S, B, n = self.S, self.B, len(images)
        coord = box.new_zeros(())
        obj = box.new_zeros(())
        cls = box.new_zeros(())
        responsible = torch.zeros_like(conf, dtype=torch.bool)
        for i, (img, t) in enumerate(zip(images, targets)):
            gt = t["boxes"].to(box.dtype)
            if gt.numel() == 0:
                continue
            h, w = img.shape[-2:]
            scale = gt.new_tensor([self.image_size / w, self.image_size / h] * 2)
            gt = gt * scale
            gw = (gt[:, 2] - gt[:, 0]).clamp(min=1.0)
            gh = (gt[:, 3] - gt[:, 1]).clamp(min=1.0)
            gcx, gcy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
            cell = self.image_size / S
            col = (gcx / cell).long().clamp(0, S - 1)
            row = (gcy / cell).long().clamp(0, S - 1)
            # One object per cell, as v1: the larger one wins when two centres share a cell.
            order = torch.argsort(gw * gh, descending=False)
            owner = {}
            for k in order.tolist():
                owner[(int(row[k]), int(col[k]))] = k
            for (r, c), k in owner.items():
                ious = box_iou(pred_xyxy[i, r, c].detach(), gt[k:k + 1])[:, 0]
                j = int(torch.argmax(ious))
                responsible[i, r, c, j] = True
                target = torch.stack([gcx[k] / cell - c, gcy[k] / cell - r,
                                      (gw[k] / self.image_size).sqrt(), (gh[k] / self.image_size).sqrt()])
                coord = coord + ((box[i, r, c, j] - target) ** 2).sum()
                obj = obj + (conf[i, r, c, j] - ious[j].clamp(min=0)) ** 2  # target: the IoU, as v1
                onehot = F.one_hot(t["labels"][k].long() - 1, self.num_classes).to(cls_prob.dtype)
                cls = cls + ((cls_prob[i, r, c] - onehot) ** 2).sum()
        noobj = (conf[~responsible] ** 2).sum()
        return {"loss_coord": self.lambda_coord * coord / n, "loss_obj": obj / n,
                "loss_noobj": self.lambda_noobj * noobj / n, "loss_class": cls / n}

    # -- inference ----------------------------------------------------------------------------
    @inference
    def candidates(self, images: Sequence[Tensor]) -> list[Detections]:
        """Every grid box with class-specific confidence (conf x P(class)) above ``score_thresh``, each with
        its best class, in the pixels of each image as given; best first."""
        images = check_images(images)
        box, conf, cls_logits = self._raw(images)
        xyxy = self._to_xyxy(box)
        prob, label = F.softmax(cls_logits, -1).max(-1)  # (N, S, S)
        score = conf * prob[..., None]
        out = []
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            b = xyxy[i].reshape(-1, 4) * xyxy.new_tensor([w / self.image_size, h / self.image_size] * 2)
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
            s = score[i].reshape(-1)
            lab = (label[i][..., None].expand(-1, -1, self.B).reshape(-1) + 1)
            keep = s > self.score_thresh
            out.append(Detections(b[keep], s[keep], lab[keep]).filter(0.0))
        return out


def _resnet18_stem_weights(**_) -> tuple:
    """torchvision's ImageNet ResNet-18 up to layer3, keyed as this model's ``backbone`` Sequential."""
    from vision.models.weights import torchvision_weights

    state, what = torchvision_weights("resnet18")
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in index:
            out[f"backbone.{index[head]}.{rest}"] = value
    return out, what


@register_model("yolo_v1", task="detection", weights=_resnet18_stem_weights, description="YOLO v1-style: S x S grid, B boxes per cell (written here)")
def yolo_v1(num_classes: int, **kw) -> YOLOv1:
    """YOLO v1-style detector; keywords: image_size, boxes_per_cell, score_thresh, nms_thresh, pretrained."""
    return YOLOv1(num_classes, **kw)
