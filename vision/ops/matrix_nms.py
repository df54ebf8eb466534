"""Matrix NMS (SOLOv2, Wang et al. 2020): every decay in one matrix operation, no sequence.

Each box's score is decayed by its most suppressive higher-scored box, compensated by how much
that box was itself suppressed. On boxes, or on masks when ``masks`` is given.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vision.ops.boxes import box_iou, check_boxes, check_scores, working_dtype

_KERNELS = ("gaussian", "linear")


def mask_iou(masks: Tensor) -> Tensor:
    """IoU of every pair of binary masks (N, H, W) -> (N, N) float32; empty pairs get 0."""
    m = (masks > 0.5 if masks.is_floating_point() else masks.bool()).flatten(1).float()
    inter = m @ m.T
    area = m.sum(1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.zeros_like(union))


def matrix_nms(boxes: Tensor, scores: Tensor, labels: Tensor | None = None, *, masks: Tensor | None = None,
               kernel: str = "gaussian", sigma: float = 2.0, score_threshold: float = 0.05
               ) -> tuple[Tensor, Tensor]:
    """Matrix NMS, per class when ``labels`` is given.

    boxes (N, 4) xyxy, scores (N,), optional masks (N, H, W) whose IoU replaces box IoU.
    ``kernel="gaussian"``: decay exp(-sigma * (iou^2 - comp^2)); ``"linear"``: (1 - iou) / (1 - comp).
    Returns ``(keep, new_scores)``: int64 indices sorted by decayed score, best first, of the boxes whose
    decayed score is at least ``score_threshold``, and those scores. Memory is O(N^2): cap N beforehand.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "gaussian" and not 0 < sigma < float("inf"):  # sigma <= 0 meant no suppression at all
        raise ValueError(f"sigma must be a finite number > 0 for the gaussian kernel, got {sigma}")
    check_boxes(boxes)
    check_scores(scores, boxes.shape[0])
    if labels is not None:
        check_scores(labels, boxes.shape[0], "labels")
    if masks is not None and (masks.dim() != 3 or masks.shape[0] != boxes.shape[0]):
        raise ValueError(f"masks must have shape (N, H, W) with N={boxes.shape[0]}, got {tuple(masks.shape)}")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)

    s = working_dtype(scores).float()
    order = torch.argsort(s, descending=True, stable=True)
    iou = mask_iou(masks[order]) if masks is not None else box_iou(boxes[order], boxes[order]).float()
    if labels is not None:
        lab = labels[order]
        iou = iou * (lab[:, None] == lab[None, :])
    iou = iou.triu(diagonal=1)  # iou[i, j], i ranked above j
    comp = iou.max(dim=0).values  # how much each box is suppressed by anything above it
    comp = comp[:, None].expand(n, n)  # row i: compensation of the suppressor i
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou ** 2 - comp ** 2))
    else:
        decay = (1.0 - iou) / (1.0 - comp).clamp(min=1e-6)
    decay = decay.min(dim=0).values.clamp(max=1.0)
    new = s[order] * decay
    ranked = torch.argsort(new, descending=True, stable=True)
    new = new[ranked]
    idx = order[ranked]
    sel = new >= score_threshold
    return idx[sel], new[sel].to(scores.dtype)
