"""ZFNet (Zeiler & Fergus, 2013): AlexNet with a 7x7 stride-2 first convolution, a stride-2 second
convolution and 384/384/256 filters in conv3-5.

Laid out like torchvision's AlexNet (``features`` / ``avgpool`` / ``classifier``), so that the deconvnet
visualizations can walk ``features`` layer by layer, and wrapped in the shared classifier face.
"""
from __future__ import annotations

import torch.nn as nn

from vision.models.alexnet import paper_lrn
from vision.models.classification import Classifier
from vision.models.registry import register_model


class ZFNetNet(nn.Module):
    """The bare network: float (normalized) N,3,H,W -> logits N,K; 224x224 gives 13x13 conv5 maps."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            paper_lrn(),
            # padding 2 (the paper used none) keeps 13x13 at 224 and lets 64x64 crops through
            nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            paper_lrn(),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)


@register_model("zfnet", task="classification", description="ZFNet (Zeiler & Fergus 2013)")
def zfnet(num_classes: int, pretrained: bool = False, **kw) -> nn.Module:
    if pretrained:
        raise ValueError("zfnet has no published torchvision weights; use pretrained=False")
    return Classifier(ZFNetNet(num_classes, **kw), "vgg")
