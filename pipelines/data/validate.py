"""Checking COCO segmentations in Python before pycocotools' C code ever sees them.

pycocotools trusts its input: a polygon with a NaN or a coordinate of 4e7 makes ``frPyObjects`` allocate
gigabytes or write out of bounds, and RLE counts that do not add up to ``h * w`` make ``decode`` write past
its buffer. One such annotation kills the worker process that rasterises it. So every segmentation is
checked here, on the driver, and only what passes goes on to the C code:

- polygons: a list of numbers (no bools, no strings), all finite, an even count of at least 6; parts of a
  polygon beyond the image plus ``MARGIN`` pixels are clipped off (Sutherland-Hodgman against that
  rectangle), and a polygon with nothing left, or no area, is left out; an annotation whose polygons'
  outline is longer than ``OUTLINE_LIMIT`` times the image's width + height is refused (pycocotools walks
  the outline at 5 points a pixel, about 24 bytes each, unchecked: a 10,000-vertex star in an 8192-pixel
  image, every other vertex 4,000 pixels out, has a 36 M pixel outline, some 4 GiB);
- uncompressed RLE (``counts`` a list): non-negative integers adding up to ``h * w``;
- compressed RLE (``counts`` a str or bytes): COCO's string format, decoded here, with the same sum;
- RLE ``size`` must be the image's ``[h, w]``.
"""
from __future__ import annotations

import math

import numpy as np

from vision.data.geometry import clip_convex, polygon_area

# How far past the image edge polygon vertices may lie before they are clipped (annotators' clicks land
# a little outside; pycocotools only rasterises inside the image anyway).
MARGIN = 2.0
# The longest outline an annotation's polygons may have, in image widths + heights: 64 x (640 + 480) is
# 71,680 pixels for a COCO image (its polygons' outlines are a few thousand at most), 1 Mi pixels at 8192 x
# 8192, for which pycocotools allocates about 120 MB.
OUTLINE_LIMIT = 64


class BadSegmentation(ValueError):
    """A segmentation that must not reach pycocotools; the message says what is wrong."""


def _number(v) -> bool:
    return type(v) in (int, float)


def finite_number(v) -> bool:
    """True for an int or float (not a bool) that is finite as a float."""
    return _number(v) and _finite((v,))


def _finite(values) -> bool:
    try:
        return all(map(math.isfinite, values))
    except OverflowError:  # an integer too large for a float (JSON allows 1000 digits)
        return False


def _edges(xs: list, ys: list):
    """A polygon's edges as ``(x0, y0, x1, y1)``, the last one closing it."""
    return zip(xs, ys, xs[1:] + xs[:1], ys[1:] + ys[:1])


def _twice_area(xs: list, ys: list) -> float:
    """Twice a polygon's signed area (shoelace), in plain Python: the in-bounds check of every polygon."""
    return sum(x0 * y1 - x1 * y0 for x0, y0, x1, y1 in _edges(xs, ys))


def clean_polygon(poly, height: int, width: int) -> list[float] | None:
    """``poly`` clipped to the image plus MARGIN, as a flat list of floats; None when nothing with an
    area is left (or it has fewer than 3 points). Raises BadSegmentation when it is malformed."""
    if not isinstance(poly, list) or not all(_number(v) for v in poly):
        raise BadSegmentation("polygon must be a flat list of numbers [x1, y1, x2, y2, ...]")
    if not _finite(poly):
        raise BadSegmentation("polygon has a non-finite coordinate (NaN or infinity)")
    if len(poly) % 2:
        raise BadSegmentation(f"polygon has an odd number of coordinates ({len(poly)})")
    if len(poly) < 6:
        return None
    xs, ys = poly[0::2], poly[1::2]
    lo_x, hi_x, lo_y, hi_y = -MARGIN, width + MARGIN, -MARGIN, height + MARGIN
    if min(xs) >= lo_x and max(xs) <= hi_x and min(ys) >= lo_y and max(ys) <= hi_y:
        # The common case, in plain Python (a COCO file has ~1M polygons): inside, so only the area.
        return [float(v) for v in poly] if _twice_area(xs, ys) != 0 else None
    rect = np.array([[lo_x, lo_y], [hi_x, lo_y], [hi_x, hi_y], [lo_x, hi_y]])
    with np.errstate(over="ignore", invalid="ignore"):  # coordinates near 1e308 overflow: NaN, dropped below
        clipped = clip_convex(np.asarray(poly, dtype=np.float64).reshape(-1, 2), rect)
    if len(clipped) < 3 or not polygon_area(clipped) > 0:  # (not > 0: NaN from coordinates near 1e308)
        return None
    out = clipped.ravel().tolist()
    # What comes out must pass this check again as it is (the ingest task checks it once more before
    # pycocotools): finite, and an area by the in-bounds formula above.
    return out if _finite(out) and _twice_area(out[0::2], out[1::2]) != 0 else None


def rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python).
    Raises BadSegmentation for a character outside the format, a negative run, or a run of more than six
    characters: the C code shifts each character's 5 bits into a 32-bit int, so a seventh overflows it and
    C and this function would read different runs (ones that add up here but not there)."""
    runs: list[int] = []
    x = k = 0
    more = False
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise BadSegmentation(f"compressed RLE has a character outside COCO's format: {ch!r}")
        x |= (c & 0x1F) << (5 * k)
        more = bool(c & 0x20)
        k += 1
        if k > 6:  # 30 bits: runs up to 2**29, past any image's pixels (max_image_pixels: 8192**2 = 2**26)
            raise BadSegmentation("compressed RLE has a run longer than 6 characters (pycocotools reads 30 bits)")
        if more:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise BadSegmentation("compressed RLE decodes to a negative run length")
        runs.append(x)
        x = k = 0
    if more:
        raise BadSegmentation("compressed RLE ends in the middle of a number")
    return runs


def check_rle(rle: dict, height: int, width: int) -> dict:
    """``rle`` checked against the image (``size`` [h, w], counts adding up to h * w); compressed
    ``counts`` come back as a str. Raises BadSegmentation naming the problem."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
        raise BadSegmentation("RLE segmentation needs 'size' [h, w] and 'counts'")
    if size != [height, width]:
        raise BadSegmentation(f"RLE size {size} does not match the image ({height}x{width})")
    if isinstance(counts, list):
        if not all(type(c) is int and c >= 0 for c in counts):
            raise BadSegmentation("uncompressed RLE counts must be non-negative integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        if isinstance(counts, bytes):
            try:
                counts = counts.decode("ascii")
            except UnicodeDecodeError:
                raise BadSegmentation("compressed RLE counts are not ASCII") from None
        runs = rle_string_counts(counts)
    else:
        raise BadSegmentation(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    total = sum(runs)
    if total != height * width:
        raise BadSegmentation(f"RLE counts add up to {total}, not h*w = {height * width}")
    return {"size": size, "counts": counts}


def _outline(poly: list[float]) -> float:
    """The length pycocotools walks along a polygon's edges: each edge's larger side, in pixels."""
    return sum(max(abs(x1 - x0), abs(y1 - y0)) for x0, y0, x1, y1 in _edges(poly[0::2], poly[1::2]))


def check_outline(polys: list[list[float]], height: int, width: int) -> None:
    """Raise BadSegmentation when the (clipped) polygons' outline is longer than ``OUTLINE_LIMIT`` x
    (width + height). Every edge is at most the image's larger side plus the margins long, so polygons with
    few vertices (nearly all) pass without being measured."""
    limit = OUTLINE_LIMIT * (width + height)
    edge = max(width, height) + 2 * MARGIN
    if sum(len(p) // 2 for p in polys) * edge <= limit:
        return
    length = sum(_outline(p) for p in polys)
    if length > limit:
        raise BadSegmentation(f"polygon outline is {length:,.0f} pixels long, over {OUTLINE_LIMIT} x (width + "
                              f"height) = {limit:,} for this image (pycocotools would need about "
                              f"{length * 5 * 24 / 2**30:.1f} GiB to rasterise it)")


def clean_segmentation(seg, height: int, width: int):
    """The checked form of an annotation's ``segmentation`` for a ``height`` x ``width`` image:
    None when absent (the box stands in), a list of clipped polygons, or an RLE dict. Raises
    BadSegmentation (a ValueError) with the reason when it must be dropped."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, list):
        polys = []
        for i, poly in enumerate(seg):
            try:
                cleaned = clean_polygon(poly, height, width)
            except BadSegmentation as e:
                raise BadSegmentation(f"polygon {i}: {e}") from None
            if cleaned is not None:
                polys.append(cleaned)
        if not polys:
            raise BadSegmentation("segmentation has no polygon with at least 3 points and an area "
                                  "inside the image")
        check_outline(polys, height, width)
        return polys
    if isinstance(seg, dict):
        return check_rle(seg, height, width)
    raise BadSegmentation(f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}")
