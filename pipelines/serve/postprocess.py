"""Postprocess deployment: boxes back to the image as sent, COCO ids and names, masks as COCO RLE."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from ray import serve
from torchvision.models.detection.roi_heads import paste_masks_in_image


def to_original(boxes: torch.Tensor, scale: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """Boxes in resized pixels -> pixels of the image as sent (``size`` = (w, h)), clipped to it."""
    sx, sy = scale
    b = boxes.float() / torch.tensor([sx, sy, sx, sy])
    w, h = size
    return torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)


def masks_to_rle(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> list[dict]:
    """Instance masks -> COCO RLE ``{"size": [h, w], "counts": str}`` at the sent image's size.

    ``masks`` is ``N x 1 x M x M`` box-relative (pasted into ``boxes``, already in sent pixels) or
    ``N x 1 x h x w`` / ``N x h x w`` whole-image probabilities of the resized image (resized back).
    """
    w, h = size
    if masks.numel() == 0:
        return []
    m = masks.float()
    if m.dim() == 3:
        m = m[:, None]
    if m.shape[-1] == m.shape[-2] and m.shape[-1] <= 56 and (m.shape[-2], m.shape[-1]) != (h, w):
        full = paste_masks_in_image(m, boxes.float(), (h, w))
    else:
        full = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    binary = (full[:, 0] >= threshold).numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def detections_json(dets: dict, scale, size, categories: list[dict]) -> list[dict]:
    """Kept detections -> the HTTP items ``{"box", "score", "category_id", "label"[, "mask"]}``."""
    by_label = {int(c["label"]): c for c in categories}
    boxes = to_original(dets["boxes"], scale, size)
    rles = masks_to_rle(dets["masks"], boxes, size) if "masks" in dets else None
    out = []
    for i, (box, score, label) in enumerate(zip(boxes.tolist(), dets["scores"].tolist(), dets["labels"].tolist())):
        cat = by_label.get(int(label), {"id": int(label), "name": f"class_{int(label)}"})
        item = {"box": [round(v, 2) for v in box], "score": round(float(score), 5),
                "category_id": int(cat["id"]), "label": cat["name"]}
        if rles is not None:
            item["mask"] = rles[i]
        out.append(item)
    return out


def top_k_json(probs: torch.Tensor, k: int, categories: list[dict]) -> list[dict]:
    """Class probabilities (index = label - 1) -> the best ``k`` as ``{"score", "category_id", "label"}``."""
    by_label = {int(c["label"]): c for c in categories}
    scores, idx = probs.topk(min(k, probs.numel()))
    out = []
    for s, i in zip(scores.tolist(), idx.tolist()):
        cat = by_label.get(i + 1, {"id": i + 1, "name": f"class_{i + 1}"})
        out.append({"score": round(float(s), 5), "category_id": int(cat["id"]), "label": cat["name"]})
    return out


@serve.deployment
class Postprocess:
    """``detections(dets, scale, size, categories)`` and ``classes(probs, k, categories)`` -> JSON-ready
    ``{"items": [...], "ms": float}``."""

    def detections(self, dets: dict, scale, size, categories: list[dict]) -> dict:
        t0 = time.perf_counter()
        items = detections_json(dets, scale, size, categories)
        return {"items": items, "ms": (time.perf_counter() - t0) * 1e3}

    def classes(self, probs: torch.Tensor, k: int, categories: list[dict]) -> dict:
        t0 = time.perf_counter()
        items = top_k_json(probs, k, categories)
        return {"items": items, "ms": (time.perf_counter() - t0) * 1e3}
