"""Detection quality on the built-in shapes: each detector trained from scratch with the real pipeline
(synth -> ingest -> Ray Train -> COCOeval on val), against a chance baseline evaluated the same way in
the same run (random boxes of plausible sizes, random classes and scores). Reports bbox AP50 (segm AP50
for Mask R-CNN), the ratio to chance, epochs, images and wall seconds: the budget each took.
Writes ``benchmarks/results/detection_quality.json`` and per-model lines as they finish.

Default (a few minutes here): YOLO for 2 epochs on 64 images. The quality run of the README:

    .venv/bin/python -m benchmarks.detection_quality --images 300 --size 160 --epochs 12 \\
        --models fasterrcnn_resnet18_fpn maskrcnn_resnet18_fpn yolo_v1 ssdlite_mobilenet_v3 rcnn_resnet18
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
MAIN = {"segmentation": "segm/AP50", "detection": "bbox/AP50"}


def chance(data_dir: Path, seed: int = 0) -> dict:
    """bbox AP50/AP of random detections (10 per image, sizes drawn like the ground truth's) on val."""
    import pyarrow.parquet as pq

    from pipelines.data import read_manifest
    from vision.metrics import CocoEvaluator
    from vision.structures import Detections

    manifest = read_manifest(data_dir / "val")
    table = pq.read_table([str(data_dir / "val" / s) for s in manifest["shards"]],
                          columns=["image_id", "width", "height", "boxes", "category_ids", "iscrowd", "area"])
    rows = table.to_pylist()
    rng = np.random.default_rng(seed)
    sizes = np.concatenate([np.asarray(r["boxes"] or np.zeros((0, 4))).reshape(-1, 4) for r in rows])
    wh = sizes[:, 2:] - sizes[:, :2]
    ev = CocoEvaluator(manifest["categories"])
    ev.add_ground_truth(rows)
    k = len(manifest["categories"])
    for r in rows:
        n = 10
        pick = wh[rng.integers(0, len(wh), n)]
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([r["width"], r["height"]] - pick, 1)
        boxes = torch.tensor(np.concatenate([xy, xy + pick], 1), dtype=torch.float32)
        ev.add(r["image_id"], Detections(boxes, torch.rand(n), torch.randint(1, k + 1, (n,))))
    return ev.compute()


def prepare(root: Path, images: int, size: int, seed: int) -> Path:
    from pipelines.data import ingest
    from vision.data.synth import write_synth

    write_synth(root / "coco", images=images, size=size, seed=seed, val_fraction=0.2)
    for split in ("train", "val"):
        ingest(root / "coco" / "annotations" / f"instances_{split}.json", root / "coco" / split, root / "data" / split)
    return root / "data"


MODEL_KWARGS = {  # sized for the synth images and a CPU budget
    "fasterrcnn_resnet18_fpn": lambda s: {"min_size": s, "max_size": s},
    "maskrcnn_resnet18_fpn": lambda s: {"min_size": s, "max_size": s},
    "fasterrcnn_mobilenet_v3_fpn": lambda s: {"min_size": s, "max_size": s},
    "yolo_v1": lambda s: {"image_size": max(64, s // 16 * 16)},
    "rcnn_resnet18": lambda s: {"max_proposals": 100},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolo_v1"])
    ap.add_argument("--images", type=int, default=64, help="synth images (train + val, 20%% val)")
    ap.add_argument("--size", type=int, default=128, help="synth image side in pixels")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=str, default=None, help="keep data and runs under this directory")
    args = ap.parse_args(argv)

    import ray

    from pipelines.train import TrainConfig, fit
    from vision.models import model_task

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    result = {"benchmark": "detection_quality", "images": args.images, "size": args.size, "epochs": args.epochs,
              "batch": args.batch, "lr": args.lr, "workers": args.workers, "threads": torch.get_num_threads(),
              "note": "from scratch (weights=None), AdamW, cosine; shared 2-core machine", "models": []}
    try:
        data = prepare(root, args.images, args.size, args.seed)
        base = chance(data, args.seed)
        result["chance"] = {"bbox/AP50": base["bbox/AP50"], "bbox/AP": base["bbox/AP"]}
        print(f"chance: bbox AP50 {base['bbox/AP50']:.4f}", flush=True)
        for arch in args.models:
            task = model_task(arch)
            cfg = TrainConfig(task=task, arch=arch, data=str(data), out=str(root / "runs" / arch),
                              workers=args.workers, epochs=args.epochs, batch_size=args.batch, image_size=args.size,
                              optimizer="adamw", lr=args.lr, seed=args.seed, cpus_per_worker=1.0, augment_cpus=0.5,
                              model_kwargs=MODEL_KWARGS.get(arch, lambda s: {})(args.size))
            t = time.perf_counter()
            out = fit(cfg)
            m = out["metrics"]
            row = {"arch": arch, "task": task, "metric": MAIN[task], "value": m.get(f"val_{MAIN[task]}"),
                   "bbox/AP50": m.get("val_bbox/AP50"), "bbox/AP": m.get("val_bbox/AP"),
                   "segm/AP50": m.get("val_segm/AP50"), "epochs": out["epochs_run"],
                   "train_images": m.get("train_images", 0) * out["epochs_run"], "seconds": time.perf_counter() - t}
            row["ratio_to_chance"] = (row["bbox/AP50"] or 0.0) / max(base["bbox/AP50"], 1e-6)
            result["models"].append(row)
            print(f"{arch:<28} {row['metric']} {row['value']:.4f}  bbox AP50 {row['bbox/AP50']:.4f} "
                  f"({row['ratio_to_chance']:.0f}x chance)  {row['epochs']} epochs  {row['seconds']:.0f}s", flush=True)
            (RESULTS / "detection_quality.json").write_text(json.dumps(result, indent=2))
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    (RESULTS / "detection_quality.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'model':<28}{'metric':>12}{'value':>9}{'x chance':>10}{'epochs':>8}{'seconds':>9}")
    for r in result["models"]:
        print(f"{r['arch']:<28}{r['metric']:>12}{r['value']:>9.4f}{r['ratio_to_chance']:>10.1f}{r['epochs']:>8}"
              f"{r['seconds']:>9.0f}")
    return result


if __name__ == "__main__":
    main()
