"""Where a detector's AP is lost: finding the objects, or naming them; generalizing, or memorizing.

Scores one trained detector (a run directory or checkpoint of ``visionflow train``) with COCOeval four
ways: bbox AP50 on val as usual, on val with every class merged into one (class-agnostic: only finding
counts), and the same two on the train split seen without augmentation. A high agnostic and a low
class-aware AP means the classes are confused; a train AP far above val means the model memorized.

    .venv/bin/python -m benchmarks.detection_diagnosis RUN_DIR DATA_DIR [--limit 800] [--label NAME]

With ``--label`` the figures also go into ``benchmarks/results/detection_diagnosis.json`` under that name.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import provenance


def score_split(model, data: Path, split: str, *, image_size: int, batch: int = 8, limit: int | None = None) -> dict:
    """bbox AP50 and AP of ``model`` on ``split``: class-aware, and class-agnostic (all classes as one)."""
    from pipelines.data import collate_detection, read_split_table
    from pipelines.data.views import _detection_rows
    from vision.metrics import CocoEvaluator
    from vision.structures import Detections

    table, manifest = read_split_table(data, split)
    table, cats = (table if limit is None else table.slice(0, limit)), manifest["categories"]
    gt = table.drop_columns(["image"]).to_pylist()
    aware = CocoEvaluator(cats)
    aware.add_ground_truth(gt)
    one = cats[0]["id"]
    agnostic = CocoEvaluator([{"id": one, "name": "object", "label": 1}])
    agnostic.add_ground_truth([{**r, "category_ids": [one] * len(r["category_ids"] or [])} for r in gt])
    model.eval()
    with torch.no_grad():
        for start in range(0, table.num_rows, batch):
            raw = _detection_rows(table.slice(start, batch), size=image_size, train=False, seed=0, epoch=0,
                                  masks=False)
            images, targets = collate_detection(raw)
            for t, out in zip(targets, model(images)):
                aware.add(t["image_id"], Detections(out["boxes"], out["scores"], out["labels"]))
                agnostic.add(t["image_id"], Detections(out["boxes"], out["scores"], torch.ones_like(out["labels"])))
    a, g = aware.compute(), agnostic.compute()
    return {f"{split}_bbox/AP50": a["bbox/AP50"], f"{split}_bbox/AP": a["bbox/AP"],
            f"{split}_agnostic_bbox/AP50": g["bbox/AP50"], f"{split}_agnostic_bbox/AP": g["bbox/AP"]}


def diagnose(run: str, data: Path, *, limit: int | None = 800) -> dict:
    """Val and train (first ``limit`` images), class-aware and class-agnostic, of the run's latest checkpoint."""
    from pipelines.train.checkpoint import load_checkpoint

    model, cfg = load_checkpoint(run)
    out = {}
    for split in ("val", "train"):
        out.update(score_split(model, Path(data), split, image_size=cfg["image_size"], limit=limit))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory, checkpoint directory or checkpoint.pt")
    ap.add_argument("data", help="the ingested dataset (with train/ and val/)")
    ap.add_argument("--limit", type=int, default=800, help="images per split (first N)")
    ap.add_argument("--label", default=None, help="save under this name in results/detection_diagnosis.json")
    args = ap.parse_args(argv)
    start = provenance.begin(args)  # an accuracy diagnosis: recorded with its run, never refused for load
    out = diagnose(args.run, Path(args.data), limit=args.limit)
    print(json.dumps({k: round(v, 4) for k, v in out.items()}, indent=2))
    if args.label:
        path = Path(__file__).parent / "results" / "detection_diagnosis.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old[args.label] = {**out, "run": args.run, "data": args.data, "limit": args.limit, **start}
        provenance.write_atomic(path, json.dumps(old, indent=2))  # aside and renamed: never half a file
    return out


if __name__ == "__main__":
    main()
