"""SSD (torchvision's SSDlite with a MobileNetV3-Large backbone, 320 px), from scratch by default."""
from __future__ import annotations

import torchvision

from vision.models.detection.base import TorchvisionDetector
from vision.models.registry import register_model


@register_model("ssdlite_mobilenet_v3", weights="ssdlite320_mobilenet_v3_large", task="detection",
                description="SSDlite: MobileNetV3-Large, multi-scale default boxes, 320 px (torchvision)")
def ssdlite_mobilenet_v3(num_classes: int, *, pretrained: bool = False, candidates_per_img: int = 1000,
                         size: int = 320, **kw) -> TorchvisionDetector:
    """SSDlite with ``num_classes + 1`` outputs (0 = background); ``pretrained`` loads an ImageNet backbone.

    ``size``: the side of the square the network sees (torchvision's builder fixes 320, the paper's). Every
    input is resized to it, so smaller images are upscaled: on 96 px data ``size=96`` costs about a tenth
    of 320's compute. The default boxes are fractions of the input, so they scale with it; the feature maps
    shrink (stride 16: 6 x 6 cells at 96 px against 20 x 20 at 320)."""
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 4096:
        raise ValueError(f"ssdlite_mobilenet_v3: size must be an integer from 32 to 4096 pixels, got {size!r}")
    net = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone="DEFAULT" if pretrained else None, num_classes=num_classes + 1, **kw)
    if size != 320:
        t = net.transform  # GeneralizedRCNNTransform with fixed_size=(320, 320)
        t.min_size, t.max_size, t.fixed_size = (size,), size, (size, size)
    return TorchvisionDetector(net, candidates_per_img=candidates_per_img)
