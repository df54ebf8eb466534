"""Postprocess deployment: boxes back to the image as sent, COCO ids and names, masks as COCO RLE.

Masks arrive as probabilities at the model input's size. Each one is resized (bilinear, as
``F.interpolate(align_corners=False)``) only over the region of the image as sent where it can be
above 0.5, thresholded there, and run-length encoded from that region: memory and time follow the
masks' regions, one mask at a time, never ``N x H x W`` floats. ``limits.max_mask_pixels`` caps the
regions' total per response (413).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from ray import serve

from pipelines.serve.errors import ApiError, too_large
from vision.structures import Detections, as_tensor

# Input probabilities at or above this may give an output pixel above 0.5 (a bilinear value is a convex
# combination of its 4 sources; the margin covers float rounding).
_SUPPORT = 0.5 - 1e-3
_CHUNK = 1 << 20  # output pixels interpolated at a time (a few MB of float32 temporaries)


def to_sent_image(dets: Detections, input_hw: tuple[int, int], sent_wh: tuple[int, int]) -> Detections:
    """Detections on the resized model input (``input_hw`` = (h, w)) -> on the image as sent
    (``sent_wh`` = (w, h)): boxes scaled and clipped to it, masks resized to it (full size: for small
    images and tests; the Postprocess deployment encodes masks region by region instead)."""
    w, h = sent_wh
    out = dets.rescale(from_size=tuple(input_hw), to_size=(h, w))
    b = out.boxes.float()
    clipped = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    return Detections(clipped, out.scores, out.labels, out.masks)


def _axis(n_out: int, n_in: int, lo: int, hi: int):
    """Output indices ``[i0, i1)`` whose bilinear sources (align_corners=False) may touch input indices
    ``lo..hi``, with their two source indices and the weight of the second."""
    s = np.float32(n_in / n_out)
    i0 = max(0, math.ceil((lo - 0.5) / float(s) - 0.5) - 1)
    i1 = min(n_out, math.ceil((hi + 1.5) / float(s) - 0.5) + 1)
    src = np.maximum((np.arange(i0, i1, dtype=np.float32) + np.float32(0.5)) * s - np.float32(0.5), np.float32(0))
    a = np.minimum(src.astype(np.int64), n_in - 1)
    b = np.minimum(a + 1, n_in - 1)
    return i0, i1, a, b, (src - a).astype(np.float32)


def mask_region(prob: np.ndarray, sent_hw: tuple[int, int]):
    """Where one mask (probabilities at the model input's size) can exceed 0.5 once resized to
    ``sent_hw`` = (H, W): ``(rows, cols)`` as produced by ``_axis``, or None for an empty mask."""
    on = prob >= _SUPPORT
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    if not len(rows):
        return None
    (h_in, w_in), (h, w) = prob.shape, sent_hw
    return _axis(h, h_in, int(rows[0]), int(rows[-1])), _axis(w, w_in, int(cols[0]), int(cols[-1]))


def region_pixels(region) -> int:
    if region is None:
        return 0
    (i0, i1, *_), (j0, j1, *_) = region
    return (i1 - i0) * (j1 - j0)


def paste(prob: np.ndarray, region) -> np.ndarray:
    """The mask thresholded at 0.5 over its region of the image as sent, column-major with a zero row above
    and below each column: an int8 ``(cols, rows + 2)`` array (what ``rle_counts`` reads). Inside, it equals
    ``F.interpolate(prob, (H, W), mode="bilinear") > 0.5`` cropped to the region."""
    (i0, i1, ay, by, wy), (j0, j1, ax, bx, wx) = region
    r0, r1 = int(ay.min()), int(by.max()) + 1
    p = prob[r0:r1].astype(np.float32, copy=False)
    left = p[:, ax]
    cols = np.ascontiguousarray((left + (p[:, bx] - left) * wx).T)  # resized along x: (cols, source rows), small
    del left
    ay, by = ay - r0, by - r0
    nh, nw = i1 - i0, j1 - j0
    out = np.zeros((nw, nh + 2), np.int8)
    step = max(1, _CHUNK // max(1, nh))
    for c in range(0, nw, step):
        c_ = cols[c:c + step]
        top = c_[:, ay]
        out[c:c + step, 1:-1] = (top + (c_[:, by] - top) * wy) > 0.5
    return out


def rle_counts(padded: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """COCO RLE run lengths (column-major, starting with zeros) of an ``h x w`` mask that is zero outside a
    region whose first pixel is at row ``top``, column ``left``: computed from the region only, given as
    ``paste`` returns it (``padded``: int8 0/1, one row per region column, a zero before and after each)."""
    nw, nh = padded.shape[0], padded.shape[1] - 2
    flat = padded.ravel()
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a new run begins, in padded positions
    if not len(starts):
        return np.array([h * w], np.int64)
    col, off = np.divmod(starts, nh + 2)
    at = (left + col) * h + (top - 1 + off)  # the same positions in the full image, column-major
    # A run of ones down to the bottom of one column and on from the top of the next ends and starts at
    # the same position: it is one run.
    same = np.flatnonzero(at[1:] == at[:-1])
    if len(same):
        at = np.delete(at, np.concatenate([same, same + 1]))
    counts = np.diff(np.concatenate(([0], at, [h * w])))
    return counts[:-1] if counts[-1] == 0 else counts


def encode_counts(counts: np.ndarray, h: int, w: int) -> dict:
    """Run lengths -> compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.astype(np.uint32)}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def masks_to_rles(masks: torch.Tensor, sent_wh: tuple[int, int], max_pixels: int | None = None) -> list[dict]:
    """COCO RLEs at the image as sent (``sent_wh`` = (w, h)) of ``masks`` (N, h_in, w_in) probabilities
    (or 0/1) at the model input's size, one mask at a time, each over its own region.

    Raises 413 when the regions together exceed ``max_pixels`` (before any is resized)."""
    w, h = sent_wh
    probs = masks.detach().cpu()
    probs = (probs.float() if probs.dtype in (torch.bool, torch.uint8) else probs).numpy()
    regions = [mask_region(p, (h, w)) for p in probs]
    total = sum(region_pixels(r) for r in regions)
    if max_pixels is not None and total > max_pixels:
        raise too_large(
            f"the {len(regions)} masks to return cover {total} pixels of the {w}x{h} image (each over its own "
            f"region), over the limit limits.max_mask_pixels = {max_pixels}; ask for fewer masks (a lower "
            f"max_detections) or fewer weak ones (a higher score_threshold, a lower iou_threshold), or send a "
            f"smaller image")
    out = []
    for p, r in zip(probs, regions):
        if r is None:
            out.append(encode_counts(np.array([h * w], np.int64), h, w))
            continue
        window = paste(p, r)
        out.append(encode_counts(rle_counts(window, r[0][0], r[1][0], h, w), h, w))
        del window  # one region at a time
    return out


def top_k_items(probs: torch.Tensor, k: int, categories: list[dict]) -> list[dict]:
    """Class probabilities (index = label - 1) -> the best ``k`` as ``{"score", "category_id", "label"}``."""
    by_label = {int(c["label"]): c for c in categories}
    probs = as_tensor(probs)
    scores, idx = probs.topk(min(k, probs.numel()))
    out = []
    for s, i in zip(scores.tolist(), idx.tolist()):
        cat = by_label.get(i + 1, {"id": i + 1, "name": f"class_{i + 1}"})
        out.append({"score": round(float(s), 5), "category_id": int(cat["id"]), "label": cat["name"]})
    return out


def detection_items(dets: Detections, input_hw, sent_wh, categories: list[dict],
                    max_mask_pixels: int | None = None) -> list[dict]:
    """HTTP items of ``dets`` (on the model input ``input_hw``) at the image as sent ``sent_wh``;
    masks as COCO RLE, region by region. Raises 413 past ``max_mask_pixels``."""
    boxes = to_sent_image(Detections(dets.boxes, dets.scores, dets.labels), input_hw, sent_wh)
    rles = masks_to_rles(dets.masks, sent_wh, max_mask_pixels) if dets.masks is not None else None
    items = boxes.to_items(categories)
    if rles is not None:
        for item, rle in zip(items, rles):
            item["mask"] = rle
    return items


@serve.deployment
class Postprocess:
    """``detections(dets, input_hw, sent_wh, categories, max_mask_pixels)`` and ``classes(probs, k,
    categories)`` -> JSON-ready ``{"items": [...], "ms": float}`` (masks as COCO RLE of the image as sent);
    a refusal (too many mask pixels) is returned as the :class:`ApiError` value, never raised."""

    def detections(self, dets: Detections, input_hw, sent_wh, categories: list[dict],
                   max_mask_pixels: int | None = None):
        t0 = time.perf_counter()
        try:
            items = detection_items(dets, input_hw, sent_wh, categories, max_mask_pixels)
        except ApiError as e:
            return e
        return {"items": items, "ms": (time.perf_counter() - t0) * 1e3}

    def classes(self, probs: torch.Tensor, k: int, categories: list[dict]) -> dict:
        t0 = time.perf_counter()
        items = top_k_items(probs, k, categories)
        return {"items": items, "ms": (time.perf_counter() - t0) * 1e3}

    def pid(self) -> int:
        """The replica's process id (tests read its memory from /proc)."""
        return os.getpid()
