"""Overlays people look at: an image with its detections drawn (boxes, masks, category and score), readable.

torchvision draws the boxes and masks (``draw_bounding_boxes``, ``draw_segmentation_masks``); what it lacks is
done here: an image smaller than ``MIN_SIDE`` on its longer side is drawn larger (whole multiples, nearest
neighbour, so its pixels stay sharp: the 96 px shapes of the quickstart came out as a tangle of 11 px
labels on top of each other), the font grows with the image, and each label is placed where it overlaps
no other label (``place_labels``), with a line to its box when that place is away from it.
"""
from __future__ import annotations

import io
import itertools

import numpy as np
import torch

MIN_SIDE = 512
# Labels drawn per image, highest scores first (every box is drawn): placing each label checks the ones placed
# before at up to about 450 places, 0.6 s for 100 labels and 12 s for 400; more than this many are unreadable.
MAX_LABELS = 100
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
Rect = tuple[float, float, float, float]  # x1, y1, x2, y2


def scale_for(width: int, height: int) -> int:
    """The whole multiple an image is drawn at: 1 for one of ``MIN_SIDE`` or more on its longer side."""
    return max(1, -(-MIN_SIDE // max(width, height, 1)))


def font_size_for(width: int, height: int) -> int:
    """Pixels of the labels' font on an image of this (drawn) size: 14, growing past 896 px."""
    return max(14, round(max(width, height) / 64))


def _overlap(a: Rect, b: Rect) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(boxes: list[Rect], sizes: list[tuple[int, int]], width: int, height: int) -> list[Rect]:
    """Where each box's label goes: ``sizes`` are the labels' (width, height) in pixels, in the order they are
    placed (give the most important first). Each is tried above the box's top-left corner, inside it, below
    the box, then at its right edge, then in the column of the box's left edge and across the image,
    nearest the box first, moved inside the image; the first place that overlaps no label placed before
    wins, else the one that overlaps least."""
    placed: list[Rect] = []
    for (x1, y1, x2, y2), (tw, th) in zip(boxes, sizes):
        tw, th = min(tw, width), min(th, height)

        def at(x, y):
            x, y = min(max(x, 0), width - tw), min(max(y, 0), height - th)
            return (x, y, x + tw, y + th)

        ys = range(0, max(1, height - th + 1), max(1, th, height // 20))  # at most about 20 rows and columns
        xs = range(0, max(1, width - tw + 1), max(1, tw // 2, width // 20))
        candidates = itertools.chain(
            (at(x1, y1 - th), at(x1, y1), at(x1, y2), at(x1, y2 - th), at(x2 - tw, y1 - th), at(x2 - tw, y2)),
            (at(x1, y) for y in sorted(ys, key=lambda y: abs(y - y1))),  # nearest its box first
            (at(x, y) for x, y in sorted(itertools.product(xs, ys), key=lambda p: abs(p[0] - x1) + abs(p[1] - y1))))
        best = None
        for rect in candidates:
            cost = sum(_overlap(rect, p) for p in placed)
            if best is None or cost < best[0]:
                best = (cost, rect)
            if cost == 0:
                break
        placed.append(best[1])
    return placed


def draw(rgb: np.ndarray, items: list[dict]) -> bytes:
    """PNG of ``rgb`` (H x W x 3 uint8) with ``items`` drawn: each ``{"box": [x1, y1, x2, y2], "label",
    "score", "category_id"[, "mask": COCO RLE]}`` in the image's pixels, labelled "label score", the
    highest scores' labels placed first."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import draw_bounding_boxes

    h, w = rgb.shape[:2]
    s = scale_for(w, h)
    # A writable copy (a decoder's array may view a read-only buffer: torch warns, and writing is undefined).
    img = _upscale(torch.from_numpy(np.require(rgb, requirements=("C", "W"))).permute(2, 0, 1), s)
    colours = [PALETTE[int(it["category_id"]) % len(PALETTE)] for it in items]
    with_masks = [(it["mask"], c) for it, c in zip(items, colours) if "mask" in it]
    if with_masks:
        img = _draw_masks(img, with_masks, s)
    if not items:
        return _png(img)
    boxes = [tuple(float(v) * s for v in it["box"]) for it in items]
    img = draw_bounding_boxes(img, torch.tensor(boxes, dtype=torch.float32), colors=colours, width=2)
    canvas = Image.fromarray(img.permute(1, 2, 0).numpy())
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=font_size_for(w * s, h * s))
    texts = [f"{it['label']} {float(it['score']):.2f}" for it in items]
    order = sorted(range(len(items)), key=lambda i: -float(items[i]["score"]))[:MAX_LABELS]
    bbox = {i: pen.textbbox((0, 0), texts[i], font=font) for i in order}  # left, top, right, bottom
    sizes = [(bbox[i][2] - bbox[i][0] + 4, bbox[i][3] - bbox[i][1] + 4) for i in order]
    for i, rect in zip(order, place_labels([boxes[i] for i in order], sizes, w * s, h * s)):
        x1, y1, x2, y2 = boxes[i]
        if rect[2] < x1 or rect[0] > x2 or rect[3] < y1 or rect[1] > y2:  # away from its box: a line to it
            cx, cy = min(max((rect[0] + rect[2]) / 2, x1), x2), min(max((rect[1] + rect[3]) / 2, y1), y2)
            pen.line([((rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2), (cx, cy)], fill=colours[i], width=1)
        pen.rectangle(rect, fill=colours[i])
        left, top = bbox[i][:2]
        pen.text((rect[0] + 2 - left, rect[1] + 2 - top), texts[i], fill="white", font=font,
                 stroke_width=1, stroke_fill="black")
    return _png(canvas)


def _draw_masks(img: torch.Tensor, masks: list[tuple[dict, str]], s: int, alpha: float = 0.45) -> torch.Tensor:
    """torchvision's ``draw_segmentation_masks``, pixel for pixel (each mask painted in its colour, black where
    masks overlap, the whole blended at ``alpha``), one mask decoded at a time: its (N, H, W) stack of every mask
    at the drawn size was 1.6 GB for 100 masks on a 4096 x 4096 image."""
    from PIL import ImageColor
    from pycocotools import mask as mask_utils

    painted, count = img.clone(), torch.zeros(img.shape[1:], dtype=torch.uint8)
    for rle, colour in masks:
        counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
        m = _upscale(torch.from_numpy(mask_utils.decode({"size": rle["size"], "counts": counts}).astype(bool))[None],
                     s)[0]
        painted[:, m] = torch.tensor(ImageColor.getrgb(colour), dtype=img.dtype)[:, None]
        count[m] = torch.clamp(count[m] + 1, max=2)
    painted[:, count > 1] = 0
    return (img * (1 - alpha) + painted * alpha).to(img.dtype)


def _upscale(t: torch.Tensor, s: int) -> torch.Tensor:
    """A (C, H, W) tensor (pixels or masks) at ``s`` times its size, each value repeated (nearest neighbour)."""
    return t.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2) if s > 1 else t


def _png(img) -> bytes:
    from PIL import Image

    if isinstance(img, torch.Tensor):
        img = Image.fromarray(img.permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
