"""Soft-NMS (Bodla et al. 2017): decay overlapping scores instead of dropping boxes.

The pick order is inherently sequential (each pick changes the scores the next one is chosen
from), so there is one step per kept box; each step is a handful of vectorized tensor ops over
all boxes at once, with no Python loop over boxes. Stops as soon as no box is above
``score_threshold``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vision.ops.boxes import check_boxes, check_scores, sanitize_boxes, working_dtype

_METHODS = ("linear", "gaussian")


def _one_vs_all_iou(box: Tensor, boxes: Tensor, areas: Tensor) -> Tensor:
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = areas + ((box[2] - box[0]) * (box[3] - box[1])) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor | None = None, *, method: str = "gaussian",
             iou_threshold: float = 0.3, sigma: float = 0.5, score_threshold: float = 0.001
             ) -> tuple[Tensor, Tensor]:
    """Soft-NMS, per class when ``labels`` is given.

    ``method="linear"``: a box with IoU > ``iou_threshold`` against the pick has its score times (1 - IoU).
    ``method="gaussian"``: every box has its score times exp(-IoU^2 / sigma).
    Returns ``(keep, new_scores)``: int64 indices in pick order (decayed score, best first) of the boxes
    whose decayed score stayed above ``score_threshold``, and those decayed scores (input dtype).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma must be > 0 for the gaussian method, got {sigma}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    check_boxes(boxes)
    check_scores(scores, boxes.shape[0])
    if labels is not None:
        check_scores(labels, boxes.shape[0], "labels")
    n = boxes.shape[0]
    out_dtype = scores.dtype
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)

    b = sanitize_boxes(boxes)
    s = working_dtype(scores).to(b.dtype).clone()
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    active = s > score_threshold
    keep = torch.empty(n, dtype=torch.int64, device=b.device)
    kept_scores = torch.empty(n, dtype=b.dtype, device=b.device)
    neg_inf = torch.tensor(-math.inf, dtype=b.dtype, device=b.device)
    count = 0
    # One .item() sync per step: the loop must know when to stop.
    for count in range(n):
        masked = torch.where(active, s, neg_inf)
        i = int(torch.argmax(masked))
        if not bool(active[i]):
            break
        keep[count] = i
        kept_scores[count] = s[i]
        active[i] = False
        iou = _one_vs_all_iou(b[i], b, areas)
        if labels is not None:
            iou = iou * (labels == labels[i])
        if method == "linear":
            decay = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / sigma)
        s = s * decay
        active &= s > score_threshold
    else:
        count = n
    return keep[:count], kept_scores[:count].to(out_dtype)
