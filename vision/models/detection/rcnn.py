"""R-CNN (Girshick et al. 2014): classic non-learned region proposals (selective search over
Felzenszwalb segments, ``proposals.py``), each region warped to a fixed size and run through a
registry CNN, then class scores (softmax over K + background, in place of the paper's per-class SVMs)
and class-specific box regression (the paper's bbox regressor, trained jointly here).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import roi_align

from vision.models.detection.base import CandidateDetector, check_images, inference
from vision.models.detection.proposals import selective_search
from vision.models.registry import create_model, register_model
from vision.ops import box_iou
from vision.structures import Detections

# Positives (IoU >= 0.5) train the classifier; only those at IoU >= 0.6 train the box regressor.
REGRESSION_IOU = 0.6


class RCNN(CandidateDetector):
    """R-CNN over a registry classifier ``backbone``; regions warped to ``warp`` px with ``context``
    (fraction of the box added on each side, as the paper's 16 px of context)."""

    def __init__(self, num_classes: int, *, backbone: str = "resnet18", warp: int = 64, context: float = 0.1,
                 max_proposals: int = 200, rois_per_image: int = 32, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.3, detections_per_img: int = 100,
                 pretrained: bool = False):
        super().__init__()
        self.num_classes, self.warp, self.context = int(num_classes), int(warp), float(context)
        self.max_proposals, self.rois_per_image = int(max_proposals), int(rois_per_image)
        self.positive_fraction = float(positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.cnn = create_model(backbone, num_classes=1, pretrained=pretrained)
        if not hasattr(self.cnn, "forward_features"):
            raise ValueError(f"backbone {backbone!r} has no forward_features; use a registry classifier")
        self.cnn.reset_classifier(0)
        c = self.cnn.num_features
        self.cls = nn.Linear(c, num_classes + 1)
        self.reg = nn.Linear(c, 4 * num_classes)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def proposals(self, image: Tensor) -> Tensor:
        """Selective-search boxes (P, 4) for one CHW image in [0, 1]."""
        arr = (image.detach().float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        return torch.from_numpy(selective_search(arr, max_proposals=self.max_proposals)).to(image.device)

    def _features(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Warp each region (with context) to ``warp`` x ``warp`` -> (class logits, box deltas)."""
        wh = (boxes[:, 2:] - boxes[:, :2]) * self.context
        ctx = torch.cat([boxes[:, :2] - wh, boxes[:, 2:] + wh], 1)
        crops = roi_align(image[None], [ctx.to(image.dtype)], self.warp, aligned=True)
        f = self.cnn.forward_features(crops).mean((2, 3))
        return self.cls(f), self.reg(f)

    def compute_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Cross-entropy over K + background on sampled regions (positives: IoU >= 0.5 with an object),
        smooth-L1 on the deltas of the positives at IoU >= 0.6 (R-CNN's regression set, Girshick et al.
        2014, appendix C: looser matches give noisy targets)."""
        cls_losses, reg_losses, sampled = [], [], 0
        for img, t in zip(images, targets):
            gt, gl = t["boxes"].to(img), t["labels"].to(img.device).long()
            props = torch.cat([self.proposals(img), gt])  # ground truth joins the regions, as in fine-tuning
            if len(gt):
                iou, match = box_iou(props, gt).max(1)
                labels = torch.where(iou >= 0.5, gl[match], torch.zeros_like(match))
            else:
                iou, match = props.new_zeros(len(props)), torch.zeros(len(props), dtype=torch.long, device=img.device)
                labels = match.clone()
            pos = torch.where(labels > 0)[0]
            neg = torch.where(labels == 0)[0]
            n_pos = min(len(pos), int(self.rois_per_image * self.positive_fraction))
            pos = pos[torch.randperm(len(pos), device=pos.device)[:n_pos]]
            neg = neg[torch.randperm(len(neg), device=neg.device)[: self.rois_per_image - n_pos]]
            idx = torch.cat([pos, neg])
            sampled += len(idx)
            logits, deltas = self._features(img, props[idx])
            cls_losses.append(F.cross_entropy(logits, labels[idx], reduction="sum"))
            close = torch.where(iou[pos] >= REGRESSION_IOU)[0]  # positions among the sampled positives
            if len(close):
                near = pos[close]
                target = self.box_coder.encode_single(gt[match[near]], props[near])
                d = deltas[close].view(len(close), self.num_classes, 4)[torch.arange(len(close)), labels[near] - 1]
                reg_losses.append(F.smooth_l1_loss(d, target, beta=1 / 9, reduction="sum"))
        zero = images[0].new_zeros(())  # both losses are means over the sampled regions
        return {"loss_classifier": sum(cls_losses, zero) / max(sampled, 1),
                "loss_box_reg": sum(reg_losses, zero) / max(sampled, 1)}

    @inference
    def candidates(self, images: Sequence[Tensor]) -> list[Detections]:
        """For every proposal and class, the regressed box with its class score above ``score_thresh``;
        best first."""
        images = check_images(images)
        out = []
        for img in images:
            h, w = img.shape[-2:]
            props = self.proposals(img)
            logits, deltas = self._features(img, props)
            scores = F.softmax(logits, -1)[:, 1:]
            boxes = self.box_coder.decode_single(deltas.reshape(-1, 4),
                                                 props.repeat_interleave(self.num_classes, 0)).reshape(-1, 4)
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                 boxes[:, 3].clamp(0, h)], 1)
            labels = torch.arange(1, self.num_classes + 1, device=img.device).repeat(len(props))
            s = scores.reshape(-1)
            keep = s > self.score_thresh
            out.append(Detections(boxes[keep], s[keep], labels[keep]).filter(0.0))
        return out


@register_model("rcnn_resnet18", weights="resnet18", task="detection",
                description="R-CNN: selective-search regions, warped, ResNet-18, class scores + box regression")
def rcnn_resnet18(num_classes: int, **kw) -> RCNN:
    """R-CNN over the registry's ResNet-18; keywords: warp, context, max_proposals, rois_per_image."""
    return RCNN(num_classes, backbone="resnet18", **kw)
