"""The built-in shapes dataset, written in real COCO layout.

It carries what real COCO carries, so every code path meets it on a laptop: polygon masks of the
*visible* part of each shape (occluded shapes get several polygons), non-contiguous category ids,
``iscrowd=1`` regions in uncompressed RLE, background-only images, textured backgrounds, shapes cut
by the image edge. Images are written one at a time, so 10,000 of them never sit in memory together.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vision.data.geometry import clip_to_rect, polygon_area, subtract_convex

# Non-contiguous on purpose, like COCO's 1..90 with holes.
CATEGORIES = [
    {"id": 3, "name": "circle", "supercategory": "shape"},
    {"id": 7, "name": "square", "supercategory": "shape"},
    {"id": 18, "name": "triangle", "supercategory": "shape"},
    {"id": 44, "name": "hexagon", "supercategory": "shape"},
    {"id": 62, "name": "ellipse", "supercategory": "shape"},
]
# The crowd regions are clusters of small dots of this category.
CROWD_CATEGORY = 3
MIN_VISIBLE_FRACTION = 0.3


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float, rng) -> np.ndarray:
    """Vertices (V, 2) of a convex shape centred at (cx, cy) with radius ``r``."""
    if name == "circle":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif name == "ellipse":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r * rng.uniform(0.45, 0.7)], 1)
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[name]
        t = np.arange(sides) * 2 * math.pi / sides
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def _background(rng, size: int) -> np.ndarray:
    """A textured background: a colour gradient, stripes and noise (uint8 HxWx3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    w = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    w = (w - w.min()) / (np.ptp(w) + 1e-6)
    img = c0 * (1 - w) + c1 * w
    freq, phase = rng.uniform(4, 14), rng.uniform(0, 2 * math.pi)
    img += 18 * np.sin(2 * math.pi * freq * (xx + 0.5 * yy) + phase)[..., None]
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE ``{"counts": [int], "size": [h, w]}`` of a binary HxW mask (column-major)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # COCO runs always start with a run of zeros
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _render_image(rng, size: int, n_shapes: int, crowd: bool):
    """Draw one image; return (uint8 HxWx3, list of annotation dicts without ids)."""
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    anns = []
    if crowd:
        # Bottom layer: a cluster of small dots annotated as one crowd region.
        crowd_mask = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(crowd_mask)
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for _ in range(int(rng.integers(6, 14))):
            dx, dy = rng.normal(0, size * 0.07, 2)
            rad = max(1.5, size * rng.uniform(0.012, 0.025))
            box = [cx + dx - rad, cy + dy - rad, cx + dx + rad, cy + dy + rad]
            draw.ellipse(box, fill=colour)
            mdraw.ellipse(box, fill=1)
        anns.append({"crowd_mask": np.asarray(crowd_mask, dtype=bool)})
    names = [c["name"] for c in CATEGORIES]
    ids = [c["id"] for c in CATEGORIES]
    full: list[np.ndarray] = []
    cats: list[int] = []
    for _ in range(n_shapes):
        # Rejection sampling keeps every earlier shape at least partly visible.
        for _try in range(20):
            k = int(rng.integers(len(names)))
            r = size * rng.uniform(0.1, 0.24)
            # Centres may sit near the edge, so some shapes are cut by it (truncated objects).
            cx, cy = rng.uniform(0.05, 0.95, 2) * size
            poly = _shape_polygon(names[k], cx, cy, r, rng.uniform(0, math.pi), rng)
            ok = True
            for j, prev in enumerate(full):
                before = sum(polygon_area(p) for p in _visible([prev], full[j + 1:], size))
                after = sum(polygon_area(p) for p in _visible([prev], full[j + 1:] + [poly], size))
                if before > 0 and after / before < MIN_VISIBLE_FRACTION:
                    ok = False
                    break
            if ok and polygon_area(clip_to_rect(poly, size, size)) > 0.5 * polygon_area(poly):
                break
        full.append(poly)
        cats.append(ids[k])
    for poly in full:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.polygon([tuple(p) for p in poly.tolist()], fill=colour, outline=None)
    for i, (poly, cat) in enumerate(zip(full, cats)):
        pieces = [p for p in _visible([poly], full[i + 1:], size) if polygon_area(p) >= 0.5]
        if not pieces:
            continue
        pts = np.concatenate(pieces)
        x1, y1 = pts.min(0)
        x2, y2 = pts.max(0)
        anns.append({
            "category_id": cat,
            "segmentation": [[round(float(v), 2) for v in p.ravel()] for p in pieces],
            "area": round(float(sum(polygon_area(p) for p in pieces)), 2),
            "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
            "iscrowd": 0,
        })
    if crowd:
        # Shapes drawn on top hide parts of the crowd region.
        shapes_mask = Image.new("L", (size, size), 0)
        sdraw = ImageDraw.Draw(shapes_mask)
        for poly in full:
            sdraw.polygon([tuple(p) for p in poly.tolist()], fill=1)
        mask = anns[0].pop("crowd_mask") & ~np.asarray(shapes_mask, dtype=bool)
        anns.pop(0)
        if mask.any():
            ys, xs = np.nonzero(mask)
            anns.append({
                "category_id": CROWD_CATEGORY,
                "segmentation": uncompressed_rle(mask),
                "area": float(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()),
                         float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                "iscrowd": 1,
            })
    return np.asarray(img), anns


def _visible(polys: list[np.ndarray], occluders: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Convex pieces of ``polys`` inside the image and outside every occluder."""
    pieces = [clip_to_rect(p, size, size) for p in polys]
    pieces = [p for p in pieces if len(p) >= 3]
    for occ in occluders:
        pieces = [q for p in pieces for q in subtract_convex(p, occ)]
    return pieces


def write_synth(out, images: int = 200, size: int = 128, seed: int = 0, val_fraction: float = 0.2,
                progress=None) -> dict:
    """Write the shapes dataset to ``out`` in COCO layout.

    Takes the output directory, the number of images (train + val), their side in pixels, the seed,
    the fraction of images that go to val, and an optional ``progress(done, total)`` callable.
    Writes ``out/annotations/instances_{train,val}.json`` and ``out/{train,val}/<id>.jpg``.
    Returns ``{"train": {"images": n, "instances": m}, "val": {...}}``.
    Deterministic for a given (images, size, seed, val_fraction).
    """
    if int(images) < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if int(size) < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    images, size = int(images), int(size)
    n_val = int(round(images * val_fraction))
    if images >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), images - 1)
    splits = {"train": images - n_val, "val": n_val}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {}
    image_id = 0
    for split, n in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        coco = {
            "info": {"description": "visionflow built-in shapes", "version": "1.0", "year": 2026},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}],
            "images": [], "annotations": [], "categories": CATEGORIES,
        }
        ann_id = 0
        for i in range(n):
            image_id += 1
            # One generator per image: any image can be regenerated alone, and order does not matter.
            rng = np.random.default_rng([seed, image_id])
            background_only = i % 9 == 4
            crowd = i % 7 == 1
            n_shapes = 0 if background_only else int(rng.integers(1, 5))
            pixels, anns = _render_image(rng, size, n_shapes, crowd and not background_only)
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(out / split / file_name, quality=92)
            coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                                   "license": 1})
            for ann in anns:
                ann_id += 1
                coco["annotations"].append({"id": ann_id, "image_id": image_id, **ann})
            if progress is not None:
                progress(image_id, images)
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)
        counts[split] = {"images": n, "instances": ann_id}
    return counts
