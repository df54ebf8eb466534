"""Box geometry on xyxy tensors: validation, IoU and generalized IoU.

Degenerate boxes (x2 < x1 or y2 < y1) count as empty: zero area, IoU 0 with everything,
itself included. fp16/bf16 inputs are computed in float32 so that areas do not overflow.
"""
from __future__ import annotations

import torch
from torch import Tensor
import torchvision.ops as tvops

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_boxes(boxes: Tensor, name: str = "boxes") -> Tensor:
    """Check ``boxes`` is a floating tensor of shape (N, 4); return it unchanged."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 4), got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) in xyxy, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {boxes.dtype}")
    return boxes


def check_scores(scores: Tensor, n: int, name: str = "scores") -> Tensor:
    """Check ``scores`` is a 1-D tensor of length ``n``; return it unchanged."""
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {n}, got {shape}")
    if scores.shape[0] != n:
        raise ValueError(f"{name} has {scores.shape[0]} entries but boxes has {n}; expected equal lengths")
    return scores


def working_dtype(t: Tensor) -> Tensor:
    """``t`` as float32 when it is fp16/bf16 (the CPU kernels lack them and areas overflow), else as is."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def sanitize_boxes(boxes: Tensor) -> Tensor:
    """Boxes with x2/y2 raised to at least x1/y1, so that an inverted box has zero area."""
    boxes = working_dtype(boxes)
    lo = boxes[:, :2]
    hi = torch.maximum(boxes[:, 2:], lo)
    return torch.cat([lo, hi], dim=1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of each xyxy box, 0 for degenerate boxes. Returns (N,)."""
    boxes = sanitize_boxes(check_boxes(boxes))
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _inter_union(b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area1[:, None] + area2[None, :] - inter


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair: (N, 4) x (M, 4) xyxy -> (N, M), float32 for fp16 inputs.

    Pairs with zero union (degenerate boxes) get IoU 0 rather than NaN.
    """
    b1 = sanitize_boxes(check_boxes(boxes1, "boxes1"))
    b2 = sanitize_boxes(check_boxes(boxes2, "boxes2"))
    inter, union = _inter_union(b1, b2)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of every pair: (N, 4) x (M, 4) -> (N, M) in [-1, 1].

    Degenerate pairs whose enclosing box is empty get GIoU 0 (IoU 0, no gap to penalize).
    """
    b1 = sanitize_boxes(check_boxes(boxes1, "boxes1"))
    b2 = sanitize_boxes(check_boxes(boxes2, "boxes2"))
    inter, union = _inter_union(b1, b2)
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(union))
    lt = torch.min(b1[:, None, :2], b2[None, :, :2])
    rb = torch.max(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    gap = torch.where(hull > 0, (hull - union) / hull.clamp(min=tiny), torch.zeros_like(hull))
    return iou - gap


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes clipped to an image of ``size`` = (height, width)."""
    return tvops.clip_boxes_to_image(check_boxes(boxes), size)
