"""Hard NMS on torchvision's kernels (CPU or CUDA), with the edge cases made explicit.

"Suppress if IoU > iou_threshold", as torchvision: a box whose IoU with a kept, higher-scored
box equals the threshold survives. Returned indices are sorted by decreasing score. A NaN score (a
diverging model) ranks below every other: it never suppresses a scored box (torch sorts NaN first).
"""
from __future__ import annotations

import torch
from torch import Tensor
import torchvision.ops as tvops

from vision.ops.boxes import check_boxes, check_scores, sanitize_boxes, working_dtype


def _check_threshold(iou_threshold: float) -> float:
    t = float(iou_threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    return t


def _prepare(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    check_boxes(boxes)
    check_scores(scores, boxes.shape[0])
    # Kernels lack fp16 on CPU; inverted boxes would get a negative area and odd IoUs.
    s = working_dtype(scores).to(dtype=working_dtype(boxes).dtype)
    return sanitize_boxes(boxes), torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Class-agnostic NMS. boxes (N, 4) xyxy, scores (N,) -> int64 indices of kept boxes, best first."""
    t = _check_threshold(iou_threshold)
    if boxes.numel() == 0 and boxes.dim() == 2 and boxes.shape[-1] == 4:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    b, s = _prepare(boxes, scores)
    return tvops.nms(b, s, t)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS: boxes of different ``labels`` never suppress each other.

    boxes (N, 4) xyxy, scores (N,), labels (N,) integer -> int64 indices of kept boxes, best first.
    """
    t = _check_threshold(iou_threshold)
    check_boxes(boxes)
    check_scores(labels, boxes.shape[0], "labels")
    if labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    b, s = _prepare(boxes, scores)
    # torchvision offsets each label's boxes by label * (largest coordinate + 1), which does not separate
    # the labels when coordinates are negative (two labels' equal boxes suppressed each other): moved to
    # start at 0 first (IoU does not change under a shift).
    low = b.min()
    if low < 0:
        b = b - low
    # ... and in float64 when the offset boxes would lose precision in float32 (24-bit mantissa): the
    # Serve NMS stage's groups are (request, label), so 256 requests of 80 classes at 320 px put boxes near
    # 6.6e6, where float32 steps by 0.5 px and small boxes' IoUs came out wrong.
    if b.dtype != torch.float64 and (float(labels.abs().max()) + 1) * (float(b.max()) + 1) > 2 ** 16:
        b, s = b.double(), s.double()
    return tvops.batched_nms(b, s, labels, t)
