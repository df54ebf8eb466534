"""Faster R-CNN and Mask R-CNN (torchvision), sized to train from scratch on CPU.

Small backbones (ResNet-18 + FPN with 128 channels, or MobileNetV3 + FPN), anchors for objects of
16-256 px, lighter box and mask heads than torchvision's defaults. Training returns torchvision's four
losses separately (``loss_objectness``, ``loss_rpn_box_reg`` for the RPN, ``loss_classifier``,
``loss_box_reg`` for the heads), plus ``loss_mask`` for Mask R-CNN. ``pretrained=True`` loads
ImageNet backbone weights (needs internet).
"""
from __future__ import annotations

import torch.nn as nn
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from vision.models.detection.base import TorchvisionDetector
from vision.models.registry import register_model
from vision.ops.roi_align import MultiScaleRoIAlign

_LEVELS = ["0", "1", "2", "3"]


def roi_pools(masks: bool = False) -> dict:
    """torchvision's default RoI pools (7x7 boxes, 14x14 masks, sampling ratio 2 on FPN levels 0-3) with a
    CPU training pass that is a sparse matrix product (vision/ops/roi_align.py): same outputs and gradients,
    1.6-1.8x faster training steps on a CPU."""
    pools = {"box_roi_pool": MultiScaleRoIAlign(_LEVELS, 7, 2)}
    if masks:
        pools["mask_roi_pool"] = MultiScaleRoIAlign(_LEVELS, 14, 2)
    return pools

# Kept small for CPU: fewer proposals than torchvision's 2000/1000.
_RPN = dict(rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300, box_batch_size_per_image=128)


def resnet_fpn_backbone(arch: str = "resnet18", out_channels: int = 128, pretrained: bool = False) -> BackboneWithFPN:
    """A torchvision ResNet with an FPN on layers 1-4 (+ max-pool level); BatchNorm trains when from scratch."""
    weights = "DEFAULT" if pretrained else None
    norm = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = getattr(torchvision.models, arch)(weights=weights, norm_layer=norm)
    if pretrained:  # as torchvision: the stem stays frozen with pretrained weights
        for name, p in net.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    c = net.fc.in_features
    return BackboneWithFPN(net, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           [c // 8, c // 4, c // 2, c], out_channels, extra_blocks=LastLevelMaxPool())


def _small_anchors(levels: int = 5) -> AnchorGenerator:
    sizes = ((16,), (32,), (64,), (128,), (256,))[:levels]
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _rcnn(num_classes: int, *, masks: bool, arch: str, fpn_channels: int, representation: int,
          min_size: int, max_size: int, pretrained: bool, candidates_per_img: int, **kw) -> TorchvisionDetector:
    backbone = resnet_fpn_backbone(arch, fpn_channels, pretrained)
    common = dict(rpn_anchor_generator=_small_anchors(), min_size=min_size, max_size=max_size,
                  box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
                  box_predictor=FastRCNNPredictor(representation, num_classes + 1), **{**_RPN, **roi_pools(masks), **kw})
    if masks:
        net = MaskRCNN(backbone, num_classes=None, mask_head=MaskRCNNHeads(fpn_channels, [64] * 4, 1),
                       mask_predictor=MaskRCNNPredictor(64, 64, num_classes + 1), **common)
    else:
        net = FasterRCNN(backbone, num_classes=None, **common)
    return TorchvisionDetector(net, candidates_per_img=candidates_per_img)


@register_model("fasterrcnn_resnet18_fpn", weights="resnet18", task="detection",
                description="Faster R-CNN: ResNet-18 FPN backbone, RPN + RoI heads (torchvision)")
def fasterrcnn_resnet18_fpn(num_classes: int, *, min_size: int = 320, max_size: int = 512, pretrained: bool = False,
                            candidates_per_img: int = 1000, **kw) -> TorchvisionDetector:
    """Faster R-CNN with a ResNet-18 FPN (128 channels); ``num_classes`` object classes, labels 1..K."""
    return _rcnn(num_classes, masks=False, arch="resnet18", fpn_channels=128, representation=256,
                 min_size=min_size, max_size=max_size, pretrained=pretrained,
                 candidates_per_img=candidates_per_img, **kw)


@register_model("fasterrcnn_mobilenet_v3_fpn", weights="fasterrcnn_mobilenet_v3_large_320_fpn", task="detection",
                description="Faster R-CNN: MobileNetV3-Large FPN backbone, 320 px (torchvision)")
def fasterrcnn_mobilenet_v3_fpn(num_classes: int, *, min_size: int = 320, max_size: int = 512,
                                pretrained: bool = False, candidates_per_img: int = 1000, **kw) -> TorchvisionDetector:
    """torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn`` with ``num_classes + 1`` outputs."""
    net = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone="DEFAULT" if pretrained else None, num_classes=num_classes + 1,
        min_size=min_size, max_size=max_size, **{**roi_pools(), **kw})
    return TorchvisionDetector(net, candidates_per_img=candidates_per_img)


@register_model("maskrcnn_resnet18_fpn", weights="resnet18", task="segmentation", segmentation="instance",
                description="Mask R-CNN: Faster R-CNN + a mask head per region (torchvision)")
def maskrcnn_resnet18_fpn(num_classes: int, *, min_size: int = 320, max_size: int = 512, pretrained: bool = False,
                          candidates_per_img: int = 100, **kw) -> TorchvisionDetector:
    """Mask R-CNN with a ResNet-18 FPN; eval output adds ``masks`` (N, 1, H, W) probabilities."""
    return _rcnn(num_classes, masks=True, arch="resnet18", fpn_channels=128, representation=256,
                 min_size=min_size, max_size=max_size, pretrained=pretrained,
                 candidates_per_img=candidates_per_img, **kw)
