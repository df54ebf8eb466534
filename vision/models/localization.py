"""Localization: one object per image, its class and its box.

A backbone from the registry (any classifier with ``forward_features``), then a class head on the globally
pooled features and a box-regression head on the feature map pooled to a ``grid`` x ``grid`` layout: the
box head must see where things are, which global average pooling throws away (the fully connected
regressors of OverFeat and VGG read the whole spatial map for the same reason).
``forward(x) -> (logits N,K, boxes N,4)``, boxes xyxy in pixels of the input. ``localization_loss`` is cross-entropy + smooth L1 + GIoU on boxes scaled to [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from vision.models.registry import create_model, get_entry, register_model


class Localizer(nn.Module):
    """Backbone + class head + box head. ``backbone`` names a registered classifier."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", hidden: int = 256, grid: int = 4,
                 box_channels: int = 32, **backbone_kw):
        super().__init__()
        if get_entry(backbone).task != "classification":
            raise ValueError(f"backbone {backbone!r} is a {get_entry(backbone).task} model; expected a classifier")
        net = create_model(backbone, num_classes=num_classes, **backbone_kw)
        net.reset_classifier(0)  # only forward_features is used: drop the head so DDP sees no unused weights
        self.backbone = net
        self.backbone_name = backbone
        self.num_classes = num_classes
        c = net.num_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.class_head = nn.Linear(c, num_classes)
        # A 1x1 conv first: a linear layer straight on c x grid x grid inputs has so large a fan-in that the
        # first Adam steps saturate the box sigmoid, and the boxes never move again.
        self.box_head = nn.Sequential(nn.Conv2d(c, box_channels, 1), nn.ReLU(inplace=True),
                                      nn.AdaptiveAvgPool2d(grid), nn.Flatten(),
                                      nn.Linear(box_channels * grid * grid, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, 4))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float RGB N,3,H,W in [0, 1] -> (logits N,K, boxes N,4 xyxy in pixels of x)."""
        h, w = x.shape[-2:]
        fmap = self.forward_features(x)
        logits = self.class_head(torch.flatten(self.pool(fmap), 1))
        # (cx, cy, w, h) as fractions of the image: sigmoid keeps every box valid
        boxes = box_convert(torch.sigmoid(self.box_head(fmap).float()), "cxcywh", "xyxy")
        if not self.training:  # clipped to the image for use; in training a clip would zero the gradient of
            boxes = boxes.clamp(0, 1)  # every coordinate past an edge, and the boxes collapse into a corner
        return logits, boxes * boxes.new_tensor([w, h, w, h])

    def get_classifier(self) -> nn.Module:
        return self.class_head

    def reset_classifier(self, num_classes: int) -> None:
        self.class_head = nn.Linear(self.class_head.in_features, num_classes)
        self.num_classes = num_classes


def localization_loss(logits, boxes, labels, target_boxes, image_size: tuple[int, int],
                      box_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on ``labels`` (0..K-1) + smooth L1 + GIoU on boxes (xyxy pixels; compared as
    fractions of ``image_size`` = (h, w)). Returns (loss, {"cls_loss", "box_loss"})."""
    h, w = image_size
    scale = boxes.new_tensor([w, h, w, h])
    pred, gt = boxes.float() / scale, target_boxes.float() / scale
    cls = F.cross_entropy(logits.float(), labels)
    box = F.smooth_l1_loss(pred, gt, beta=0.05) + generalized_box_iou_loss(pred, gt, reduction="mean")
    return cls + box_weight * box, {"cls_loss": float(cls.detach()), "box_loss": float(box.detach())}


def localization_hits(logits, boxes, labels, target_boxes, iou_threshold: float = 0.5) -> torch.Tensor:
    """Bool N: the class is right and the box overlaps the true box with IoU >= ``iou_threshold``."""
    iou = box_iou(boxes.float(), target_boxes.float()).diagonal()
    return (logits.argmax(1) == labels) & (iou >= iou_threshold)


@register_model("localizer", task="localization", description="registry backbone + class head + box head")
def localizer(num_classes: int, backbone: str = "resnet18", **kw) -> nn.Module:
    return Localizer(num_classes, backbone=backbone, **kw)
