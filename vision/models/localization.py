"""Localization: one object per image, its class and its box.

A backbone from the registry (any classifier with ``forward_features``), then 1x1-conv heads over its
feature map, one prediction per cell, as the fully convolutional OverFeat localizer: a centre score (is
the object's centre in this cell) and a box. The box is read at the cell of the highest centre score. In
training it is read at the cell that holds the true centre, and the centre scores learn that cell with a
cross-entropy over the cells.

The class head reads the region in the box (``glimpse``, the default): the box with some context
(``context``) is cut from the input by ``roi_align``, resized to ``glimpse`` x ``glimpse`` and run
through the same backbone, as R-CNN's warped regions. In training the region is the true box, jittered
by up to ``jitter`` of its size; at inference it is the predicted box. ``glimpse=None`` puts a class head
on every cell instead (cheaper, and slower to learn: one cell's view of a small shape).

Why per cell: a regressor on the flattened map (or a class head on globally pooled features) sees every
object of the scene at once. On the synth shapes, with up to four objects an image, such heads memorised
the training images and stayed at chance on val; a head shared by every cell reads only what is around it.
For a ResNet backbone the last stage keeps stride 16 (``output_stride=16``, not 32), so a 64 px input gives
a 4 x 4 grid, not 2 x 2.

``forward(x) -> (logits N,K, boxes N,4)``, boxes xyxy in pixels of the input;
``forward(x, target_boxes) -> (logits, boxes, centre_loss)`` in training. ``localization_loss`` is
cross-entropy + smooth L1 + GIoU on boxes scaled to [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image, generalized_box_iou_loss, roi_align

from vision.models.registry import create_model, get_entry, register_model


def _keep_stride_16(net: nn.Module) -> bool:
    """Turn the stride-2 entry of a torchvision ResNet's last stage into stride 1 (in place); False when
    ``net`` has no ResNet last stage."""
    layer4 = getattr(getattr(net, "net", None), "layer4", None)
    if layer4 is None:
        return False
    block = layer4[0]
    for conv in (getattr(block, "conv1", None), getattr(block, "conv2", None)):  # BasicBlock: conv1; Bottleneck: conv2
        if conv is not None and conv.stride == (2, 2):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
    return True


class Localizer(nn.Module):
    """Backbone + per-cell centre, class and box heads. ``backbone`` names a registered classifier."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", hidden: int = 128, output_stride: int = 16,
                 glimpse: int | None = 64, context: float = 1.2, jitter: float = 0.1, **backbone_kw):
        super().__init__()
        if get_entry(backbone).task != "classification":
            raise ValueError(f"backbone {backbone!r} is a {get_entry(backbone).task} model; expected a classifier")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        net = create_model(backbone, num_classes=num_classes, **backbone_kw)
        net.reset_classifier(0)  # only forward_features is used: drop the head so DDP sees no unused weights
        if output_stride == 16:
            _keep_stride_16(net)  # other families keep their own stride
        self.backbone = net
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.neck = nn.Sequential(nn.Conv2d(net.num_features, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.centre_head = nn.Conv2d(hidden, 1, 1)
        self.glimpse, self.context, self.jitter = glimpse, float(context), float(jitter)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.class_head = (nn.Linear(net.num_features, num_classes) if glimpse else nn.Conv2d(hidden, num_classes, 1))
        self.box_head = nn.Conv2d(hidden, 4, 1)  # centre offset in the cell, width and height of the image

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def dense(self, x: torch.Tensor):
        """Per cell: centre logits N,C; class logits N,C,K (None with a glimpse class head); boxes N,C,4
        xyxy in pixels of x (C = cells, row-major); and the grid (rows, cols)."""
        h, w = x.shape[-2:]
        f = self.neck(self.forward_features(x))
        gh, gw = f.shape[-2:]
        centre = self.centre_head(f).flatten(1)
        logits = None if self.glimpse else self.class_head(f).flatten(2).transpose(1, 2)
        t = torch.sigmoid(self.box_head(f).float()).flatten(2).transpose(1, 2)  # N,C,4 in (0, 1)
        gy, gx = torch.meshgrid(torch.arange(gh, device=x.device), torch.arange(gw, device=x.device), indexing="ij")
        # the centre may sit from half a cell before to half a cell past its own cell
        cx = (gx.flatten() + t[..., 0] * 2 - 0.5) * (w / gw)
        cy = (gy.flatten() + t[..., 1] * 2 - 0.5) * (h / gh)
        boxes = box_convert(torch.stack([cx, cy, t[..., 2] * w, t[..., 3] * h], -1), "cxcywh", "xyxy")
        return centre, logits, boxes, (gh, gw)

    def centre_cells(self, boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """Index (row-major) of the cell holding the centre of each box (N,4 xyxy pixels)."""
        (h, w), (gh, gw) = image_size, grid
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        col = (cx / (w / gw)).long().clamp(0, gw - 1)
        row = (cy / (h / gh)).long().clamp(0, gh - 1)
        return row * gw + col

    def forward(self, x: torch.Tensor, target_boxes: torch.Tensor | None = None):
        """Float RGB N,3,H,W in [0, 1] -> (logits N,K, boxes N,4 xyxy in pixels of x), read at the best
        cell; with ``target_boxes`` (training), read at each true centre's cell, plus the centre loss."""
        h, w = x.shape[-2:]
        centre, logits, boxes, grid = self.dense(x)
        rows = torch.arange(len(x), device=x.device)
        if target_boxes is not None:
            cell = self.centre_cells(target_boxes, (h, w), grid)
            if self.glimpse:
                logits = self.classify_regions(x, _jitter(target_boxes.float(), self.jitter))
            else:
                logits = logits[rows, cell]
            return logits, boxes[rows, cell], F.cross_entropy(centre.float(), cell)
        cell = centre.argmax(1)
        box = boxes[rows, cell]
        if not self.training:  # clipped to the image for use
            box = clip_boxes_to_image(box, (h, w))
        return (self.classify_regions(x, box.detach()) if self.glimpse else logits[rows, cell]), box

    def classify_regions(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Class logits N,K of one region per image (N,4 xyxy pixels): the region with some context, cut
        from the input by ``roi_align`` and resized to ``glimpse`` x ``glimpse``, through the backbone."""
        cxcywh = box_convert(boxes, "xyxy", "cxcywh")
        cxcywh = torch.cat([cxcywh[:, :2], cxcywh[:, 2:].clamp(min=1.0) * self.context], 1)
        rois = torch.cat([torch.arange(len(x), device=x.device, dtype=boxes.dtype)[:, None],
                          box_convert(cxcywh, "cxcywh", "xyxy")], 1)
        crops = roi_align(x, rois.to(x.dtype), output_size=self.glimpse, spatial_scale=1.0, sampling_ratio=2,
                          aligned=True)
        return self.class_head(torch.flatten(self.pool(self.forward_features(crops)), 1))

    def get_classifier(self) -> nn.Module:
        return self.class_head

    def reset_classifier(self, num_classes: int) -> None:
        head = self.class_head
        self.class_head = (nn.Linear(head.in_features, num_classes) if isinstance(head, nn.Linear)
                           else nn.Conv2d(head.in_channels, num_classes, 1))
        self.num_classes = num_classes


def _jitter(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Each side of each box moved by up to ``scale`` of the box's width or height (uniform)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + (torch.rand_like(boxes) * 2 - 1) * scale * wh


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


def _backbone_weights(backbone: str = "resnet18", **_) -> tuple:
    """The published weights of the localizer's backbone (its classifier's)."""
    from vision.models.weights import published_weights

    return published_weights(backbone)


@register_model("localizer", task="localization", weights=_backbone_weights,
                description="registry backbone + per-cell centre, class and box heads")
def localizer(num_classes: int, backbone: str = "resnet18", **kw) -> nn.Module:
    return Localizer(num_classes, backbone=backbone, **kw)
