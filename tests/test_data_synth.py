"""The built-in shapes dataset: real COCO layout with everything real COCO carries."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vision.data.geometry import clip_to_rect, polygon_area, subtract_convex
from vision.data.synth import CATEGORIES, uncompressed_rle, write_synth


def _load(root, split):
    with open(root / "annotations" / f"instances_{split}.json") as f:
        return json.load(f)


def test_layout_and_counts(synth_dir):
    train, val = _load(synth_dir, "train"), _load(synth_dir, "val")
    assert len(train["images"]) == 48 and len(val["images"]) == 12  # 60 images, val_fraction 0.2
    for split, data in (("train", train), ("val", val)):
        for im in data["images"]:
            path = synth_dir / split / im["file_name"]
            with Image.open(path) as pic:
                assert pic.format == "JPEG" and pic.mode == "RGB" and pic.size == (96, 96)
        ann_ids = [a["id"] for a in data["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))  # annotation ids start at 1
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    assert len(set(image_ids)) == len(image_ids) == 60  # unique across splits


def test_carries_what_coco_carries(synth_dir):
    data = _load(synth_dir, "train")
    ids = sorted(c["id"] for c in data["categories"])
    assert len(ids) >= 4 and ids != list(range(1, len(ids) + 1))  # non-contiguous ids
    names = {c["name"] for c in CATEGORIES}
    assert {"circle", "square", "triangle"} <= names
    anns = data["annotations"]
    crowd = [a for a in anns if a["iscrowd"] == 1]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed RLE
    polys = [a for a in anns if a["iscrowd"] == 0]
    assert all(isinstance(a["segmentation"], list) for a in polys)
    assert any(len(a["segmentation"]) >= 2 for a in polys)  # multi-part polygons (occlusion)
    with_anns = {a["image_id"] for a in anns}
    assert any(im["id"] not in with_anns for im in data["images"])  # background-only images
    assert {a["category_id"] for a in anns} <= set(ids)
    # pycocotools reads it as it reads COCO, and every mask lies inside its box.
    coco = COCO(str(synth_dir / "annotations" / "instances_train.json"))
    for a in anns:
        m = coco.annToMask(a)
        assert m.any(), a["id"]
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
        assert ys.min() >= np.floor(y) - 1 and ys.max() <= np.ceil(y + h) + 1


def test_occlusion_matches_pixels(synth_dir):
    """The visible-part masks of two shapes never overlap: the one on top hides the one below."""
    coco = COCO(str(synth_dir / "annotations" / "instances_train.json"))
    overlapping = 0
    for iid in coco.getImgIds():
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=iid))
                 if a["iscrowd"] == 0]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                inter = (masks[i] & masks[j]).sum()
                overlapping += inter
                assert inter <= 0.05 * min(masks[i].sum(), masks[j].sum()) + 3  # only rasterised edges touch
    assert overlapping < 400


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_synth(tmp_path / "a", images=6, size=64, seed=3)
    b = write_synth(tmp_path / "b", images=6, size=64, seed=3)
    c = write_synth(tmp_path / "c", images=6, size=64, seed=4)
    assert a == b
    ja, jb, jc = (_load(tmp_path / n, "train") for n in "abc")
    assert ja == jb and ja["annotations"] != jc["annotations"]
    name = ja["images"][0]["file_name"]
    assert (tmp_path / "a/train" / name).read_bytes() == (tmp_path / "b/train" / name).read_bytes()
    assert a["train"]["images"] + a["val"]["images"] == 6 and c["val"]["images"] == 1


@pytest.mark.parametrize("kw, message", [({"images": 0}, "images"), ({"size": 8}, "size"),
                                          ({"val_fraction": 1.5}, "val_fraction")])
def test_bad_arguments_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        write_synth(tmp_path, **{"images": 4, **kw})


def test_synth_command(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["synth", "--out", str(tmp_path), "--images", "5", "--size", "48", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "synth: 1/5 images" and lines[-2] == "synth: 5/5 images"  # progress
    assert json.loads(lines[-1])["train"]["images"] == 4
    assert len(list((tmp_path / "train").glob("*.jpg"))) == 4
    assert main(["synth", "--out", str(tmp_path), "--images", "0"]) == 2
    with pytest.raises(SystemExit) as e:  # numpy's "expected non-negative integer" named no flag
        main(["synth", "--out", str(tmp_path), "--seed", "-1"])
    assert e.value.code == 2 and "--seed: must be an integer >= 0, got -1" in capsys.readouterr().err


def test_uncompressed_rle_round_trips():
    rng = np.random.default_rng(0)
    for first in (0, 1):
        m = rng.random((7, 5)) > 0.5
        m[0, 0] = bool(first)
        rle = uncompressed_rle(m)
        back = mask_utils.decode(mask_utils.frPyObjects(rle, 7, 5))
        assert (back.astype(bool) == m).all()


def test_polygon_subtraction_is_exact():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    hole = np.array([[3, 3], [6, 3], [6, 6], [3, 6]], float)
    pieces = subtract_convex(square, hole)
    assert abs(sum(polygon_area(p) for p in pieces) - 91.0) < 1e-9
    band = np.array([[-1, 4], [11, 4], [11, 6], [-1, 6]], float)  # cuts the square in two
    assert abs(sum(polygon_area(p) for p in subtract_convex(square, band)) - 80.0) < 1e-9
    assert abs(polygon_area(clip_to_rect(square + 5, 12, 12)) - 49.0) < 1e-9
