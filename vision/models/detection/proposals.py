"""Classic, non-learned region proposals for R-CNN: selective search (Uijlings et al. 2013) in a
single-strategy form. Initial regions come from scikit-image's Felzenszwalb graph segmentation;
neighbouring regions are then merged greedily by colour, size and fill similarity, and every region
of the hierarchy (initial and merged) is a proposal.
"""
from __future__ import annotations

import numpy as np

_BINS = 25


def _colour_hist(pixels: np.ndarray) -> np.ndarray:
    h = np.concatenate([np.histogram(pixels[:, c], bins=_BINS, range=(0.0, 1.0))[0] for c in range(3)])
    h = h.astype(np.float64)
    return h / max(h.sum(), 1.0)


def _adjacent_pairs(seg: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((seg[:, :-1], seg[:, 1:]), (seg[:-1, :], seg[1:, :])):
        diff = a != b
        lo = np.minimum(a[diff], b[diff])
        hi = np.maximum(a[diff], b[diff])
        pairs.update(zip(lo.tolist(), hi.tolist()))
    return pairs


def selective_search(image: np.ndarray, *, scales=(50, 150), sigma: float = 0.8, min_size: int = 20,
                     max_proposals: int = 300, min_box: float = 4.0) -> np.ndarray:
    """Proposals for one image.

    ``image``: float or uint8 (H, W, 3). Runs one Felzenszwalb segmentation per value of ``scales``
    and a greedy hierarchical grouping on each. Returns float32 (P, 4) xyxy boxes in pixels, unique,
    at most ``max_proposals`` (larger hierarchies first cut by box size diversity: initial regions and
    merges interleaved), each side at least ``min_box`` pixels.
    """
    from skimage.segmentation import felzenszwalb

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"selective_search needs an (H, W, 3) image, got shape {img.shape}")
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    h, w = img.shape[:2]
    boxes = []
    for scale in scales:
        seg = felzenszwalb(img, scale=float(scale), sigma=sigma, min_size=min_size)
        boxes.extend(_group(img, seg, h * w))
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.asarray([[0, 0, w, h]], dtype=np.float32)
    wh_ok = ((boxes[:, 2] - boxes[:, 0]) >= min_box) & ((boxes[:, 3] - boxes[:, 1]) >= min_box)
    boxes = boxes[wh_ok]
    _, first = np.unique(np.round(boxes).astype(np.int32), axis=0, return_index=True)
    boxes = boxes[np.sort(first)]  # hierarchy order: small regions first, then their merges
    if len(boxes) > max_proposals:
        boxes = boxes[np.linspace(0, len(boxes) - 1, max_proposals).round().astype(int)]
    return boxes


def _group(img: np.ndarray, seg: np.ndarray, image_area: int) -> list[list[float]]:
    """Greedy hierarchical grouping of the segments of ``seg``; returns every region's xyxy box."""
    ids = np.unique(seg)
    flat = seg.ravel()
    pix = img.reshape(-1, 3)
    ys, xs = np.divmod(np.arange(flat.size), seg.shape[1])
    regions = {}
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], ids)
    ends = np.append(starts[1:], flat.size)
    for r, s, e in zip(ids.tolist(), starts, ends):
        idx = order[s:e]
        regions[r] = {"box": [float(xs[idx].min()), float(ys[idx].min()), float(xs[idx].max() + 1),
                              float(ys[idx].max() + 1)],
                      "size": float(len(idx)), "hist": _colour_hist(pix[idx])}
    out = [reg["box"] for reg in regions.values()]

    def sim(a, b):
        ra, rb = regions[a], regions[b]
        colour = np.minimum(ra["hist"], rb["hist"]).sum()
        size = 1.0 - (ra["size"] + rb["size"]) / image_area
        x1, y1 = min(ra["box"][0], rb["box"][0]), min(ra["box"][1], rb["box"][1])
        x2, y2 = max(ra["box"][2], rb["box"][2]), max(ra["box"][3], rb["box"][3])
        fill = 1.0 - ((x2 - x1) * (y2 - y1) - ra["size"] - rb["size"]) / image_area
        return colour + size + fill

    neighbours = {r: set() for r in regions}
    sims = {}
    for a, b in _adjacent_pairs(seg):
        neighbours[a].add(b)
        neighbours[b].add(a)
        sims[(a, b)] = sim(a, b)
    next_id = int(ids.max()) + 1 if len(ids) else 0
    while sims:
        a, b = max(sims, key=sims.get)
        ra, rb = regions.pop(a), regions.pop(b)
        size = ra["size"] + rb["size"]
        new = {"box": [min(ra["box"][0], rb["box"][0]), min(ra["box"][1], rb["box"][1]),
                       max(ra["box"][2], rb["box"][2]), max(ra["box"][3], rb["box"][3])],
               "size": size, "hist": (ra["hist"] * ra["size"] + rb["hist"] * rb["size"]) / size}
        out.append(new["box"])
        nb = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for key in [k for k in sims if a in k or b in k]:
            del sims[key]
        regions[next_id] = new
        neighbours[next_id] = nb
        for n in nb:
            neighbours[n] -= {a, b}
            neighbours[n].add(next_id)
            sims[(n, next_id)] = sim(n, next_id)
        next_id += 1
    return out
