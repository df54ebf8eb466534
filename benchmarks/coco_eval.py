"""COCO evaluation cost: ``vision.metrics.CocoEvaluator`` (ground truth from dataset rows, predictions as
``Detections``, original ids mapped back) against pycocotools' plain use (``COCO(gt.json)``,
``loadRes(results)``, ``COCOeval``) on the same 1,000 images, in one run; the 12 numbers are checked equal.
bbox and segm. Writes ``benchmarks/results/coco_eval.json``.

    .venv/bin/python -m benchmarks.coco_eval [--images 1000] [--size 128] [--per-image 4]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from vision.metrics import STAT_NAMES, CocoEvaluator
from vision.structures import Detections

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"
CATEGORIES = [{"id": c, "name": f"c{c}", "label": i + 1} for i, c in enumerate((3, 7, 18, 44, 62))]


def make_data(images: int, size: int, per_image: int, seed: int = 0):
    """Ground-truth rows (xyxy, original ids, RLE) and noisy predictions (Detections with masks) per image."""
    rng = np.random.default_rng(seed)
    rows, preds = [], {}
    for image_id in range(1, images + 1):
        n = int(rng.integers(1, per_image + 1))
        xy = rng.uniform(0, size * 0.7, (n, 2))
        wh = rng.uniform(8, size * 0.3, (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, size)], 1)
        labels = rng.integers(1, len(CATEGORIES) + 1, n)
        masks = np.zeros((n, size, size), np.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().astype(int)):
            masks[k, y1:y2, x1:x2] = 1
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
        rows.append({"image_id": image_id, "width": size, "height": size, "boxes": boxes.astype(np.float32),
                     "category_ids": [CATEGORIES[lab - 1]["id"] for lab in labels], "iscrowd": [0] * n,
                     "area": [float(mask_utils.area(r)) for r in rles],
                     "segmentation": [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]})
        jitter = rng.normal(0, 3, boxes.shape)
        pb = np.clip(boxes + jitter, 0, size)
        pm = np.roll(masks, int(rng.integers(-2, 3)), axis=2)
        preds[image_id] = Detections(torch.tensor(pb, dtype=torch.float32), torch.tensor(rng.uniform(0.2, 1, n)),
                                     torch.tensor(labels), torch.from_numpy(pm))
    return rows, preds


def ours(rows, preds, iou_types) -> dict:
    ev = CocoEvaluator(CATEGORIES, iou_types)
    ev.add_ground_truth(rows)
    for image_id, det in preds.items():
        ev.add(image_id, det)
    return ev.compute()


def plain(gt_path: Path, results: list[dict], iou_types) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        for t in iou_types:
            res = results if t == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
            ev = COCOeval(gt, gt.loadRes(res), t)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out.update({f"{t}/{k}": float(v) for k, v in zip(STAT_NAMES, ev.stats)})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--per-image", type=int, default=4)
    provenance.add_arguments(ap)
    args = ap.parse_args(argv)
    start = provenance.begin(args)
    iou_types = ("bbox", "segm")
    rows, preds = make_data(args.images, args.size, args.per_image)
    # The plain side gets its inputs ready-made: a gt.json on disk and result dicts in memory.
    images = [{"id": r["image_id"], "width": r["width"], "height": r["height"]} for r in rows]
    anns = []
    for r in rows:
        for k, b in enumerate(r["boxes"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": r["image_id"], "category_id": r["category_ids"][k],
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": r["area"][k], "iscrowd": 0,
                         "segmentation": r["segmentation"][k]})
    results = [x for i, d in preds.items() for x in d.to_coco_results(i, CATEGORIES)]
    with tempfile.TemporaryDirectory() as tmp:
        gt_path = Path(tmp) / "gt.json"
        gt_path.write_text(json.dumps({"images": images, "annotations": anns,
                                       "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]}))
        t = time.perf_counter()
        base = plain(gt_path, results, iou_types)
        t_plain = time.perf_counter() - t
    t = time.perf_counter()
    got = ours(rows, preds, iou_types)
    t_ours = time.perf_counter() - t
    for k, v in base.items():
        assert abs(got[k] - v) < 1e-9, f"{k}: ours {got[k]} != pycocotools {v}"
    result = {"benchmark": "coco_eval", "images": args.images, "instances": len(anns), "iou_types": list(iou_types),
              "ours_s": t_ours, "pycocotools_plain_s": t_plain, "ratio": t_ours / t_plain,
              "metrics": {k: got[k] for k in base},
              "note": "ours includes building the ground truth from rows and converting Detections (RLE encode); "
                      "shared 2-core machine"}
    provenance.write(RESULTS / "coco_eval.json", result, start)
    print(f"{'images':>8}{'instances':>11}{'ours s':>9}{'pycocotools s':>15}{'ratio':>8}   bbox AP50 / segm AP50")
    print(f"{args.images:>8}{len(anns):>11}{t_ours:>9.2f}{t_plain:>15.2f}{result['ratio']:>8.2f}   "
          f"{got['bbox/AP50']:.3f} / {got['segm/AP50']:.3f}")
    return result


if __name__ == "__main__":
    main()
