"""vision.structures.Detections: equal lengths, selection, device moves, HTTP and COCO formats."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from vision.structures import Detections

CATEGORIES = [{"id": 7, "name": "circle", "label": 1}, {"id": 12, "name": "square", "label": 2}]


def make(masks=False):
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 40]], dtype=torch.float32)
    m = None
    if masks:
        m = torch.zeros(3, 48, 40, dtype=torch.uint8)
        m[0, :10, :10] = 1
        m[1, 1:11, 1:11] = 1
        m[2, 20:40, 20:30] = 1
    return Detections(boxes, torch.tensor([0.9, 0.8, 0.3]), torch.tensor([1, 1, 2]), m)


def test_lengths_are_checked():
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\)"):
        Detections(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="masks"):
        Detections(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 5, 5))
    with pytest.raises(TypeError, match="labels must be integers"):
        Detections(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3))


def test_selection_moves_every_field():
    d = make(masks=True)
    high = d[d.scores > 0.5]
    assert len(high) == 2 and high.masks.shape == (2, 48, 40) and high.labels.tolist() == [1, 1]
    picked = d[torch.tensor([2, 0])]
    assert picked.scores.tolist() == pytest.approx([0.3, 0.9]) and picked.masks[0].sum() == 200
    assert len(d[1]) == 1 and d[1].scores.item() == pytest.approx(0.8)
    assert len(d[1:]) == 2
    with pytest.raises(IndexError, match="boolean index"):
        d[torch.tensor([True, False])]
    assert d.to("cpu").boxes.device.type == "cpu"


def test_nms_filter_and_postprocess():
    d = make()
    assert d.nms(0.5).scores.tolist() == pytest.approx([0.9, 0.3])
    assert len(d.filter(0.5)) == 2
    assert len(d.postprocess(0.5, 0.0, max_detections=1)) == 1
    assert len(Detections.empty().nms(0.5)) == 0
    both = Detections.cat([d, d[:1]])
    assert len(both) == 4


def test_http_items_use_original_ids_and_rle():
    items = make(masks=True).to_items(CATEGORIES)
    assert items[0]["category_id"] == 7 and items[0]["label"] == "circle"
    assert items[2]["category_id"] == 12 and items[2]["box"] == [20, 20, 30, 40]
    rle = items[2]["mask"]
    assert rle["size"] == [48, 40] and isinstance(rle["counts"], str)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.sum() == 200 and decoded[25, 25] == 1
    with pytest.raises(KeyError, match="label 2"):
        make().to_items({1: 7})


def test_coco_results_are_xywh():
    res = make(masks=True).to_coco_results(42, {1: 7, 2: 12})
    assert res[2] == {**res[2], "image_id": 42, "category_id": 12, "bbox": [20.0, 20.0, 10.0, 20.0]}
    assert mask_utils.area({"size": res[0]["segmentation"]["size"],
                            "counts": res[0]["segmentation"]["counts"].encode()}) == 100


def test_float_masks_are_thresholded_and_rescaled():
    d = make(masks=True)
    probs = Detections(d.boxes, d.scores, d.labels, d.masks.float()[:, None] * 0.9)
    assert probs.masks.shape == (3, 48, 40)
    big = probs.rescale((48, 40), (96, 80))
    assert big.boxes[2].tolist() == [40, 40, 60, 80] and big.masks.shape == (3, 96, 80)
    items = big.to_items(CATEGORIES)
    area = mask_utils.area({"size": items[0]["mask"]["size"], "counts": items[0]["mask"]["counts"].encode()})
    assert 350 <= area <= 450  # 10x10 scaled by 2 per side
