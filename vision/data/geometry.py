"""Exact polygon geometry for the shapes dataset: clipping and subtraction of convex polygons.

Polygons are float arrays (V, 2) of (x, y) vertices in order. Subtracting a convex occluder from a
convex polygon gives a few disjoint convex pieces, so visible parts stay exact polygons (COCO style).
"""
from __future__ import annotations

import numpy as np


def polygon_area(poly: np.ndarray) -> float:
    """Area of a simple polygon (V, 2) by the shoelace formula; 0 for fewer than 3 vertices."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _orient_ccw(poly: np.ndarray) -> np.ndarray:
    x, y = poly[:, 0], poly[:, 1]
    signed = np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))
    return poly if signed >= 0 else poly[::-1]


def clip_halfplane(poly: np.ndarray, a: np.ndarray, b: np.ndarray, keep_left: bool = True) -> np.ndarray:
    """The part of ``poly`` left of (or right of) the directed line a -> b (Sutherland-Hodgman, one edge)."""
    if len(poly) == 0:
        return poly
    d = b - a
    side = d[0] * (poly[:, 1] - a[1]) - d[1] * (poly[:, 0] - a[0])
    if not keep_left:
        side = -side
    out = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        sp, sq = side[i], side[(i + 1) % n]
        if sp >= 0:
            out.append(p)
        if (sp >= 0) != (sq >= 0):
            t = sp / (sp - sq)
            out.append(p + t * (q - p))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def clip_to_rect(poly: np.ndarray, width: float, height: float) -> np.ndarray:
    """``poly`` clipped to the rectangle [0, width] x [0, height]."""
    rect = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    return clip_convex(poly, rect)


def clip_convex(poly: np.ndarray, convex: np.ndarray) -> np.ndarray:
    """Intersection of ``poly`` with the convex polygon ``convex``."""
    convex = _orient_ccw(np.asarray(convex, dtype=np.float64))
    out = np.asarray(poly, dtype=np.float64)
    for i in range(len(convex)):
        out = clip_halfplane(out, convex[i], convex[(i + 1) % len(convex)])
        if len(out) < 3:
            return np.zeros((0, 2))
    return out


def subtract_convex(poly: np.ndarray, convex: np.ndarray, min_area: float = 1e-6) -> list[np.ndarray]:
    """``poly`` minus the convex polygon ``convex`` as a list of disjoint convex pieces.

    Piece i is what lies inside edges 0..i-1 of ``convex`` and outside edge i; the pieces tile the
    difference exactly.
    """
    convex = _orient_ccw(np.asarray(convex, dtype=np.float64))
    pieces = []
    rest = np.asarray(poly, dtype=np.float64)
    for i in range(len(convex)):
        a, b = convex[i], convex[(i + 1) % len(convex)]
        outside = clip_halfplane(rest, a, b, keep_left=False)
        if len(outside) >= 3 and polygon_area(outside) > min_area:
            pieces.append(outside)
        rest = clip_halfplane(rest, a, b, keep_left=True)
        if len(rest) < 3:
            break
    return pieces
