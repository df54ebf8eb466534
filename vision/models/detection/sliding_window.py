"""Sliding-window detection (OverFeat-style, Sermanet et al. 2014): a registry classifier trained on
window crops (K classes + background, plus a box regressor), then slid over the whole image the
fully-convolutional way: one forward per scale, the window's average pooling and the linear heads
applied at every position of the feature map (a 1x1 convolution), so each position is one window at
the backbone's stride. Then NMS.

The backbone is any registry classifier whose head is global pooling + one linear layer over
``forward_features`` (the ResNet/ResNeXt/DenseNet families).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vision.models.detection.base import CandidateDetector, check_images, inference
from vision.models.registry import create_model, register_model
from vision.ops import box_iou
from vision.structures import Detections

_STRIDE = 32  # the registry's ResNet-family feature maps are at stride 32


class SlidingWindowDetector(CandidateDetector):
    """``window`` px crops classified into background + ``num_classes``; ``scales`` are the image
    zooms at which the window is slid (window 64 at scale 2 covers 32 px of the original)."""

    def __init__(self, num_classes: int, *, backbone: str = "resnet18", window: int = 64,
                 scales: Sequence[float] = (2.0, 1.0, 0.5), score_thresh: float = 0.05, nms_thresh: float = 0.4,
                 detections_per_img: int = 100, crops_per_image: int = 16, pretrained: bool = False):
        super().__init__()
        if window % _STRIDE:
            raise ValueError(f"window must be a multiple of {_STRIDE}, got {window}")
        self.num_classes, self.window, self.scales = int(num_classes), int(window), tuple(float(s) for s in scales)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.crops_per_image = int(crops_per_image)
        self.backbone = create_model(backbone, num_classes=1, pretrained=pretrained)
        if not hasattr(self.backbone, "forward_features"):
            raise ValueError(f"backbone {backbone!r} has no forward_features; use a registry classifier")
        self.backbone.reset_classifier(0)  # the heads below replace its linear layer
        c = self.backbone.num_features
        self.cls = nn.Conv2d(c, num_classes + 1, 1)  # the classifier's linear layer, as a 1x1 conv
        self.reg = nn.Conv2d(c, 4, 1)  # object box inside the window, in window units

    def _dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images N,3,H,W -> (logits N,K+1,h,w, box N,4,h,w): one window per output position."""
        f = self.backbone.forward_features(x)
        k = self.window // _STRIDE
        f = F.avg_pool2d(f, k, stride=1) if f.shape[-1] >= k and f.shape[-2] >= k else f.mean((2, 3), keepdim=True)
        return self.cls(f), self.reg(f)

    # -- training on window crops ------------------------------------------------------------
    def _sample_crops(self, img: Tensor, boxes: Tensor, labels: Tensor, gen: torch.Generator):
        """Positive windows around each object (jittered) and background windows with IoU < 0.3."""
        h, w = img.shape[-2:]
        wins, cls, reg = [], [], []
        for b, lab in zip(boxes, labels):
            side = float(max(b[2] - b[0], b[3] - b[1])) * (1.15 + 0.3 * float(torch.rand(1, generator=gen)))
            cx = float(b[0] + b[2]) / 2 + (float(torch.rand(1, generator=gen)) - 0.5) * 0.2 * side
            cy = float(b[1] + b[3]) / 2 + (float(torch.rand(1, generator=gen)) - 0.5) * 0.2 * side
            win = torch.tensor([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            wins.append(win)
            cls.append(int(lab))
            reg.append((b.float().cpu() - win[[0, 1, 0, 1]]) / side)
        n_neg = max(self.crops_per_image - len(wins), len(wins))
        tries = 0
        while n_neg > 0 and tries < 10 * self.crops_per_image:
            tries += 1
            side = float(torch.empty(1).uniform_(0.15, 0.8, generator=gen)) * min(h, w)
            x0 = float(torch.rand(1, generator=gen)) * max(w - side, 1)
            y0 = float(torch.rand(1, generator=gen)) * max(h - side, 1)
            win = torch.tensor([x0, y0, x0 + side, y0 + side])
            if len(boxes) and box_iou(win[None], boxes.float().cpu()).max() >= 0.3:
                continue
            wins.append(win)
            cls.append(0)
            reg.append(torch.zeros(4))
            n_neg -= 1
        return torch.stack(wins), torch.tensor(cls), torch.stack(reg)

    def compute_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Cross-entropy over window classes and smooth-L1 box regression on object windows."""
        from torchvision.ops import roi_align

        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        crops, cls, reg = [], [], []
        for img, t in zip(images, targets):
            wins, c, r = self._sample_crops(img, t["boxes"], t["labels"], gen)
            crops.append(roi_align(img[None], [wins.to(img)], self.window, aligned=True))
            cls.append(c)
            reg.append(r)
        x = torch.cat(crops)
        cls = torch.cat(cls).to(x.device)
        reg = torch.cat(reg).to(x)
        logits, box = self._dense(x)
        logits, box = logits.flatten(1), box.flatten(1)
        pos = cls > 0
        box_loss = F.smooth_l1_loss(box[pos], reg[pos], beta=0.1, reduction="sum") / max(int(pos.sum()), 1)
        return {"loss_classifier": F.cross_entropy(logits, cls), "loss_box_reg": box_loss}

    # -- inference: fully-convolutional over each scale --------------------------------------
    @inference
    def candidates(self, images: Sequence[Tensor]) -> list[Detections]:
        """Every window position at every scale with its best class above ``score_thresh``, boxes from the
        regressor, in the pixels of each image as given; best first."""
        images = check_images(images)
        out = []
        for img in images:
            h, w = img.shape[-2:]
            dets = []
            for s in self.scales:
                sh, sw = max(self.window, round(h * s)), max(self.window, round(w * s))
                x = F.interpolate(img[None], size=(sh, sw), mode="bilinear", align_corners=False)
                logits, box = self._dense(x)
                prob = F.softmax(logits[0], 0)[1:]  # K,gh,gw
                score, label = prob.max(0)
                gh, gw = score.shape
                ys = torch.arange(gh, device=x.device, dtype=x.dtype) * _STRIDE
                xs = torch.arange(gw, device=x.device, dtype=x.dtype) * _STRIDE
                y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
                side = float(self.window)
                b = torch.stack([x0 + box[0, 0] * side, y0 + box[0, 1] * side,
                                 x0 + box[0, 2] * side, y0 + box[0, 3] * side], -1).reshape(-1, 4)
                b = b * b.new_tensor([w / sw, h / sh, w / sw, h / sh])
                # The regressor's corners are free outputs: an untrained or unsure one can put x2 left of x1,
                # which clipping turned into an inverted box (x1 = 64, x2 = 0). Ordered, then clipped.
                lo, hi = torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])
                b = torch.stack([lo[:, 0].clamp(0, w), lo[:, 1].clamp(0, h), hi[:, 0].clamp(0, w),
                                 hi[:, 1].clamp(0, h)], 1)
                keep = score.reshape(-1) > self.score_thresh
                dets.append(Detections(b[keep], score.reshape(-1)[keep], label.reshape(-1)[keep] + 1))
            out.append(Detections.cat(dets).filter(0.0))
        return out


@register_model("sliding_window_resnet18", weights="resnet18", task="detection",
                description="Sliding-window detector: ResNet-18 classifier slid fully-convolutionally at 3 scales")
def sliding_window_resnet18(num_classes: int, **kw) -> SlidingWindowDetector:
    """Sliding-window detector over the registry's ResNet-18; keywords: window, scales, score_thresh."""
    return SlidingWindowDetector(num_classes, backbone="resnet18", **kw)
