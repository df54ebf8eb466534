"""Postprocess deployment: boxes back to the image as sent, COCO ids and names, masks as COCO RLE."""
from __future__ import annotations

import time

import torch
from ray import serve

from vision.structures import Detections


def to_sent_image(dets: Detections, input_hw: tuple[int, int], sent_wh: tuple[int, int]) -> Detections:
    """Detections on the resized model input (``input_hw`` = (h, w)) -> on the image as sent
    (``sent_wh`` = (w, h)): boxes scaled and clipped to it, masks resized to it."""
    w, h = sent_wh
    out = dets.rescale(from_size=tuple(input_hw), to_size=(h, w))
    b = out.boxes.float()
    clipped = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    return Detections(clipped, out.scores, out.labels, out.masks)


def top_k_items(probs: torch.Tensor, k: int, categories: list[dict]) -> list[dict]:
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
    """``detections(dets, input_hw, sent_wh, categories)`` and ``classes(probs, k, categories)`` ->
    JSON-ready ``{"items": [...], "ms": float}`` (masks as COCO RLE of the image as sent)."""

    def detections(self, dets: Detections, input_hw, sent_wh, categories: list[dict]) -> dict:
        t0 = time.perf_counter()
        items = to_sent_image(dets, input_hw, sent_wh).to_items(categories)
        return {"items": items, "ms": (time.perf_counter() - t0) * 1e3}

    def classes(self, probs: torch.Tensor, k: int, categories: list[dict]) -> dict:
        t0 = time.perf_counter()
        items = top_k_items(probs, k, categories)
        return {"items": items, "ms": (time.perf_counter() - t0) * 1e3}
