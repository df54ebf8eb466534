"""Semantic segmentation (torchvision's FCN and DeepLabV3) on masks rendered from COCO instances.

Each model predicts K + 1 classes per pixel (0 = background); ``forward(x: N,3,H,W in [0, 1])`` returns
torchvision's ``{"out": logits N,K+1,H,W}``. ImageNet normalization happens inside. Instance
segmentation (Mask R-CNN) lives with the detectors (``vision.models.detection.faster_rcnn``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import segmentation as tvseg

from vision.models.registry import register_model

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class SemanticSegmenter(nn.Module):
    """A torchvision segmentation network with normalization inside (registered with
    ``segmentation="semantic"``, which tells the trainer to build per-pixel targets)."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float RGB N,3,H,W in [0, 1] (or a list of same-size CHW images) -> {"out": logits N,K+1,H,W}."""
        if isinstance(x, (list, tuple)):
            if len({tuple(i.shape) for i in x}) > 1:
                raise ValueError(f"a list of images must share one size to batch, got {[tuple(i.shape) for i in x]}")
            x = torch.stack(list(x))
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images N,3,H,W in [0, 1], got shape {tuple(x.shape)}")
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class map N,H,W (0 background, 1..K)."""
        return self.forward(x)["out"].argmax(1)


def _semantic(build, num_classes: int, pretrained: bool, **kw) -> SemanticSegmenter:
    """torchvision's segmentation builder ``build`` with ``num_classes + 1`` per-pixel classes, no auxiliary
    head, and ImageNet backbone weights when ``pretrained``."""
    net = build(weights=None, weights_backbone="DEFAULT" if pretrained else None, num_classes=num_classes + 1,
                aux_loss=False, **kw)
    return SemanticSegmenter(net, num_classes)


@register_model("fcn_resnet50", weights="fcn_resnet50", task="segmentation", segmentation="semantic",
                description="FCN (fully convolutional), ResNet-50 (torchvision)")
def fcn_resnet50(num_classes: int, *, pretrained: bool = False, **kw) -> SemanticSegmenter:
    """FCN-ResNet50 with ``num_classes + 1`` per-pixel classes."""
    return _semantic(tvseg.fcn_resnet50, num_classes, pretrained, **kw)


@register_model("deeplabv3_mobilenet_v3", weights="deeplabv3_mobilenet_v3_large", task="segmentation", segmentation="semantic",
                description="DeepLabV3 (atrous spatial pyramid pooling), MobileNetV3-Large (torchvision)")
def deeplabv3_mobilenet_v3(num_classes: int, *, pretrained: bool = False, **kw) -> SemanticSegmenter:
    """DeepLabV3-MobileNetV3-Large with ``num_classes + 1`` per-pixel classes (small enough for CPU)."""
    return _semantic(tvseg.deeplabv3_mobilenet_v3_large, num_classes, pretrained, **kw)
