"""torchvision's standard COCO detectors as published, so that their published weights have a model to load
into: Faster R-CNN ResNet-50 FPN (v1 and v2), Mask R-CNN ResNet-50 FPN, RetinaNet ResNet-50 FPN and SSD300
VGG-16 (SSDlite is ``ssd.ssdlite_mobilenet_v3``, Faster R-CNN MobileNetV3 ``faster_rcnn``).

Each is torchvision's own builder with ``num_classes + 1`` outputs (0 = background) and torchvision's
defaults (800-1333 px for the ResNet-50 ones, 300 x 300 for SSD300: ``--model-kwargs '{"min_size": 320}'``
for smaller images), behind ``TorchvisionDetector`` (losses in training, eval outputs, ``candidates``).
Built from random weights; ``pretrained=True`` loads torchvision's COCO weights (needs the internet),
re-initialising the class-dependent head when the class count is not COCO's 91. A torchvision state dict on
disk loads through ``--init-from`` (``vision.models.weights.load_matching``), the same way.

``frozen_bn=True`` (ResNet-50 ones) builds torchvision's fine-tuning setup: the backbone's batch norm frozen
(``FrozenBatchNorm2d``: statistics and affine fixed) and its stem and ``layer1`` not trained, as torchvision
builds these detectors around its published weights (``trainable_backbone_layers=3``). It suits
fine-tuning from COCO weights with small batches; from scratch, leave it off.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from vision.models.detection.base import TorchvisionDetector
from vision.models.registry import register_model


def _freeze_resnet_body(net: nn.Module) -> None:
    """Batch norm of ``net.backbone.body`` -> FrozenBatchNorm2d; its stem and layer1 stop training."""
    body = net.backbone.body

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(module, name, frozen)
            else:
                swap(child)

    swap(body)
    for name, p in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)


def _build(tv_name: str, num_classes: int, *, pretrained: bool, frozen_bn: bool, candidates_per_img: int,
           resnet: bool, **kw) -> TorchvisionDetector:
    builder: Callable[..., nn.Module] = getattr(torchvision.models.detection, tv_name)
    if frozen_bn and not resnet:
        raise ValueError(f"frozen_bn applies to the ResNet-50 detectors; {tv_name} has no batch norm backbone to freeze")
    net = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kw)
    if frozen_bn:
        _freeze_resnet_body(net)
    model = TorchvisionDetector(net, candidates_per_img=candidates_per_img)
    if pretrained:
        from vision.models.weights import load_matching, torchvision_weights

        state, what = torchvision_weights(tv_name)
        load_matching(model, state, what)  # the class-dependent head is skipped when K + 1 != 91
    return model


def _register(name: str, tv_name: str, description: str, *, resnet: bool = True, task: str = "detection",
              segmentation: str | None = None, candidates: int = 1000) -> None:
    def builder(num_classes: int, *, pretrained: bool = False, frozen_bn: bool = False,
                candidates_per_img: int = candidates, **kw) -> TorchvisionDetector:
        return _build(tv_name, num_classes, pretrained=pretrained, frozen_bn=frozen_bn,
                      candidates_per_img=candidates_per_img, resnet=resnet, **kw)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"torchvision's ``{tv_name}`` with ``num_classes + 1`` outputs; keywords: pretrained (COCO "
                       f"weights, needs the internet), frozen_bn, candidates_per_img, and torchvision's own.")
    register_model(name, task=task, segmentation=segmentation, weights=tv_name, description=description)(builder)


_register("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn",
          "Faster R-CNN ResNet-50 FPN as torchvision publishes it (800 px, COCO weights with --pretrained)")
_register("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn_v2",
          "Faster R-CNN ResNet-50 FPN v2 (Li et al. 2021 recipe: conv box head with batch norm), as torchvision's")
_register("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
          "Mask R-CNN ResNet-50 FPN as torchvision publishes it (800 px)", task="segmentation",
          segmentation="instance", candidates=100)
_register("retinanet_resnet50_fpn", "retinanet_resnet50_fpn",
          "RetinaNet ResNet-50 FPN: one-stage, focal loss, as torchvision publishes it (800 px)")
_register("ssd300_vgg16", "ssd300_vgg16", "SSD300 VGG-16 as torchvision publishes it (300 x 300)", resnet=False)
