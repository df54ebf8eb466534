"""vision.metrics.coco_eval against pycocotools' plain use on the same annotation file."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vision.data.synth import write_synth
from vision.metrics import STAT_NAMES, CocoEvaluator, evaluate_detections
from vision.structures import Detections


@pytest.fixture(scope="module")
def coco_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_eval")
    write_synth(out, images=30, size=96, seed=3, val_fraction=0.5)
    path = out / "annotations" / "instances_val.json"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    cats = sorted(coco.getCatIds())
    categories = [{"id": c, "name": coco.cats[c]["name"], "label": i + 1} for i, c in enumerate(cats)]
    return path, coco, categories


def shard_rows(coco):
    """Rows shaped like the ingested shards: xyxy boxes, original ids, compressed RLE."""
    rows = []
    for img in coco.dataset["images"]:
        anns = coco.imgToAnns[img["id"]]
        rles = []
        for a in anns:
            r = coco.annToRLE(a)
            rles.append({"size": r["size"], "counts": r["counts"].decode()})
        rows.append({"image_id": img["id"], "width": img["width"], "height": img["height"],
                     "boxes": [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                a["bbox"][1] + a["bbox"][3]] for a in anns],
                     "category_ids": [a["category_id"] for a in anns], "iscrowd": [a["iscrowd"] for a in anns],
                     "area": [a["area"] for a in anns], "segmentation": rles})
    return rows


def noisy_predictions(coco, categories, seed=0):
    """Ground truth jittered, with scores and a few false positives, as Detections per image."""
    rng = np.random.default_rng(seed)
    id_to_label = {c["id"]: c["label"] for c in categories}
    preds = {}
    for img in coco.dataset["images"]:
        anns = [a for a in coco.imgToAnns[img["id"]] if not a["iscrowd"]]
        boxes, labels, masks = [], [], []
        for a in anns + anns[:1]:
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 2, 4)
            boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
            labels.append(id_to_label[a["category_id"]])
            masks.append(coco.annToMask(a))
        n = len(boxes)
        if n == 0:
            preds[img["id"]] = Detections.empty(mask_size=(img["height"], img["width"]))
            continue
        preds[img["id"]] = Detections(torch.tensor(boxes, dtype=torch.float32),
                                      torch.tensor(rng.uniform(0.1, 1, n), dtype=torch.float32),
                                      torch.tensor(labels), torch.tensor(np.stack(masks)))
    return preds


def plain_pycocotools(path, results, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_matches_pycocotools_plain_use(coco_val):
    path, coco, categories = coco_val
    preds = noisy_predictions(coco, categories)
    metrics = evaluate_detections(shard_rows(coco), preds, categories, ("bbox", "segm"))
    results = [r for i, d in preds.items() for r in d.to_coco_results(i, categories)]
    for t in ("bbox", "segm"):
        # For segm the mask gives area and box (with a bbox present loadRes would size by the box).
        use = results if t == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        want = plain_pycocotools(path, use, t)
        got = [metrics[f"{t}/{k}"] for k in STAT_NAMES]
        np.testing.assert_allclose(got, want, atol=1e-9)
    assert 0.2 < metrics["bbox/AP"] < 1.0 and metrics["num_images"] == len(coco.dataset["images"])


def test_perfect_predictions_score_one(coco_val):
    _, coco, categories = coco_val
    id_to_label = {c["id"]: c["label"] for c in categories}
    preds = {}
    for img in coco.dataset["images"]:
        anns = [a for a in coco.imgToAnns[img["id"]] if not a["iscrowd"]]
        b = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)
        preds[img["id"]] = Detections(b, torch.ones(len(anns)), torch.tensor([id_to_label[a["category_id"]]
                                                                              for a in anns], dtype=torch.int64))
    m = evaluate_detections(shard_rows(coco), preds, categories)
    assert m["bbox/AP50"] == pytest.approx(1.0) and m["bbox/AP"] == pytest.approx(1.0)


def test_workers_merge_counts_every_image_once(coco_val):
    _, coco, categories = coco_val
    rows = shard_rows(coco)
    preds = noisy_predictions(coco, categories, seed=1)
    single = evaluate_detections(rows, preds, categories)
    # Two workers with overlapping shards (an image seen by both, as with padded sharding).
    halves = [rows[: len(rows) // 2 + 2], rows[len(rows) // 2:]]
    evs = []
    for part in halves:
        ev = CocoEvaluator(categories)
        ev.add_ground_truth(part)
        for r in part:
            ev.add(r["image_id"], preds[r["image_id"]])
        evs.append(ev)
    evs[0].merge(evs[1].state())
    merged = evs[0].compute()
    assert merged == single


def test_view_rows_with_labels_and_masks(coco_val):
    """Detection-view rows (labels 1..K, uint8 masks) give the same ground truth as shard rows."""
    _, coco, categories = coco_val
    id_to_label = {c["id"]: c["label"] for c in categories}
    view = []
    for r in shard_rows(coco):
        masks = np.stack([mask_utils.decode({"size": s["size"], "counts": s["counts"].encode()})
                          for s in r["segmentation"]]) if r["segmentation"] else np.zeros((0, r["height"], r["width"]))
        view.append({"image_id": r["image_id"], "image": np.zeros((r["height"], r["width"], 3), np.uint8),
                     "boxes": np.asarray(r["boxes"], np.float32).reshape(-1, 4),
                     "labels": np.asarray([id_to_label[c] for c in r["category_ids"]]),
                     "iscrowd": np.asarray(r["iscrowd"]), "masks": masks.astype(np.uint8)})
    preds = noisy_predictions(coco, categories, seed=2)
    a = evaluate_detections(shard_rows(coco), preds, categories, ("bbox", "segm"))
    b = evaluate_detections(view, preds, categories, ("bbox", "segm"))
    assert b["segm/AP50"] == pytest.approx(a["segm/AP50"], abs=1e-6)
    assert b["bbox/AP50"] == pytest.approx(a["bbox/AP50"], abs=1e-6)


def test_errors_and_empty_results(coco_val):
    _, coco, categories = coco_val
    ev = CocoEvaluator(categories)
    with pytest.raises(ValueError, match="no ground truth"):
        ev.compute()
    ev.add_ground_truth(shard_rows(coco))
    nothing = ev.compute()  # nothing predicted: 0 where there are objects, -1 (undefined) where there are none
    assert nothing["bbox/AP"] == nothing["bbox/AR100"] == 0.0
    assert nothing["bbox/APl"] == -1.0 and not any(a["area"] > 96 ** 2 for a in coco.dataset["annotations"])
    empty = CocoEvaluator(categories)  # images without objects: undefined whether something is predicted or not
    empty.add_ground_truth([{**row, "boxes": [], "category_ids": [], "iscrowd": [], "area": [], "segmentation": []}
                            for row in shard_rows(coco)[:2]])
    assert set(empty.compute().values()) - {2} == {-1.0}
    some = Detections(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([0.9]), torch.tensor([1]))
    empty.add(int(shard_rows(coco)[0]["image_id"]), some)
    assert set(empty.compute().values()) - {2} == {-1.0}
    with pytest.raises(ValueError, match="iou_types"):
        CocoEvaluator(categories, ("keypoints",))
    seg = CocoEvaluator(categories, ("bbox", "segm"))
    with pytest.raises(ValueError, match="needs predicted masks"):
        seg.add(1, Detections.empty())
    with pytest.raises(ValueError, match="without ground truth"):
        ev.add(10**9, Detections.empty())
        ev.compute()


def test_pycocotools_prints_nothing_where_print_ignores_redirected_stdout(coco_val, monkeypatch):
    """Ray Train's workers replace ``print`` by one that logs whatever ``sys.stdout`` is: there
    ``contextlib.redirect_stdout`` let pycocotools' lines through (the control below); the evaluator's own
    quieting does not. (The same in a real Ray Train worker: tests/test_console_output.py.)"""
    import builtins

    import pycocotools.coco
    import pycocotools.cocoeval

    printed: list[str] = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    path, coco, categories = coco_val
    preds = noisy_predictions(coco, categories)
    metrics = evaluate_detections(shard_rows(coco), preds, categories, ("bbox", "segm"))
    assert metrics["bbox/AP"] > 0.2 and printed == []
    assert "print" not in vars(pycocotools.coco) and "print" not in vars(pycocotools.cocoeval)  # restored
    plain_pycocotools(path, [r for i, d in preds.items() for r in d.to_coco_results(i, categories)], "bbox")
    assert "creating index..." in printed and any("Average Precision" in p for p in printed)
