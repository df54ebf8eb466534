"""Overlays people look at (``pipelines.overlays``): small images drawn larger, no label on another."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from pipelines.overlays import PALETTE, MIN_SIDE, draw, place_labels, scale_for


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_labels_of_boxes_sharing_a_corner_go_where_no_other_label_is():
    # Five boxes with one top-left corner, and one at the image's edge: every label inside the image.
    boxes = [(100, 100, 100 + 40 * k, 100 + 30 * k) for k in range(1, 6)] + [(480, 0, 512, 30)]
    sizes = [(90, 18)] * 6
    rects = place_labels(boxes, sizes, 512, 512)
    for (x1, y1, x2, y2), (w, h) in zip(rects, sizes):
        assert 0 <= x1 and 0 <= y1 and x2 <= 512 and y2 <= 512 and (x2 - x1, y2 - y1) == (w, h)
    assert not [(a, b) for a, b in itertools.combinations(rects, 2) if _overlap(a, b)], rects
    assert rects[0] == (100, 82, 190, 100)  # the first, free: just above its box's corner
    assert rects[5][2] == 512  # moved inside the image


def test_with_no_free_place_a_label_goes_where_it_overlaps_least():
    rects = place_labels([(0, 0, 10, 10)] * 3, [(60, 40)] * 3, 64, 64)  # room for one label only
    assert rects[0] == (0, 0, 60, 40) and all(r[2] <= 64 and r[3] <= 64 for r in rects)


@pytest.mark.parametrize("side, drawn", [(96, 576), (300, 600), (512, 512), (1024, 1024)])
def test_a_small_image_is_drawn_larger_by_whole_multiples(side, drawn):
    assert side * scale_for(side, side // 2) == drawn >= MIN_SIDE
    rgb = np.full((side // 2, side, 3), 90, dtype=np.uint8)
    item = {"box": [side / 4, side / 8, side / 2, side / 4], "label": "circle", "score": 0.9, "category_id": 1}
    with Image.open(io.BytesIO(draw(rgb, [item]))) as img:
        assert img.size == (drawn, drawn // 2)
        px = np.asarray(img.convert("RGB"))
    s = drawn // side
    colour = tuple(int(PALETTE[1][i:i + 2], 16) for i in (1, 3, 5))
    # The box's edge in its category's colour at the drawn scale, and the label's background beside it.
    assert tuple(px[int(side / 8 * s) + 1, int(side / 3 * s)]) == colour
    assert (px == colour).all(axis=2).sum() > 200


def test_an_image_without_detections_is_drawn_as_it_is():
    rgb = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(draw(rgb, []))) as img:
        px = np.asarray(img.convert("RGB"))
    s = scale_for(48, 32)
    assert px.shape == (32 * s, 48 * s, 3) and (px[::s, ::s] == rgb).all()


@pytest.mark.parametrize("s", [1, 3])
def test_masks_drawn_one_at_a_time_are_torchvisions_pixel_for_pixel(s):
    """Each mask is decoded and painted on its own (a stack of every mask at the drawn size was 1.6 GB for 100
    masks on a 4096 x 4096 image): the same pixels as torchvision's draw_segmentation_masks of the stack,
    overlaps (black) included."""
    import torch
    from pycocotools import mask as mask_utils
    from torchvision.utils import draw_segmentation_masks

    from pipelines.overlays import _draw_masks

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 255, (3, 40, 50), dtype=np.uint8))
    masks = [rng.random((40, 50)) > 0.6 for _ in range(5)]
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    up = lambda t: t.repeat_interleave(s, 1).repeat_interleave(s, 2)  # noqa: E731
    want = draw_segmentation_masks(up(img), up(torch.from_numpy(np.stack(masks))), alpha=0.45, colors=PALETTE[:5])
    assert torch.equal(_draw_masks(up(img), list(zip(rles, PALETTE[:5])), s), want)


def test_at_most_max_labels_are_placed_the_highest_scores(monkeypatch):
    """Placing a label checks the labels before it: 400 of them took 12 s an image (a predict with a high
    --max-detections looked hung). Every box is drawn; the MAX_LABELS highest scores get labels."""
    from pipelines import overlays

    given = []
    real = overlays.place_labels
    monkeypatch.setattr(overlays, "place_labels", lambda boxes, *a: given.append(boxes) or real(boxes, *a))
    rgb = np.full((256, 512, 3), 90, dtype=np.uint8)
    items = [{"box": [k % 500, k // 2 % 250, k % 500 + 12, k // 2 % 250 + 6], "label": "circle", "score": k / 400,
              "category_id": 1} for k in range(400)]
    draw(rgb, items)
    (boxes,) = given
    assert len(boxes) == overlays.MAX_LABELS and boxes[0] == tuple(float(v) for v in items[-1]["box"])
