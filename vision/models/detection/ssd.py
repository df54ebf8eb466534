"""SSD (torchvision's SSDlite with a MobileNetV3-Large backbone, 320 px), from scratch by default."""
from __future__ import annotations

import torchvision

from vision.models.detection.base import TorchvisionDetector
from vision.models.registry import register_model


@register_model("ssdlite_mobilenet_v3", weights="ssdlite320_mobilenet_v3_large", task="detection",
                description="SSDlite: MobileNetV3-Large, multi-scale default boxes, 320 px (torchvision)")
def ssdlite_mobilenet_v3(num_classes: int, *, pretrained: bool = False, candidates_per_img: int = 1000,
                         **kw) -> TorchvisionDetector:
    """SSDlite320 with ``num_classes + 1`` outputs (0 = background); ``pretrained`` loads an ImageNet backbone."""
    net = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone="DEFAULT" if pretrained else None, num_classes=num_classes + 1, **kw)
    return TorchvisionDetector(net, candidates_per_img=candidates_per_img)
