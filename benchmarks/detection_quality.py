"""Detection quality on the built-in shapes: each detector trained from scratch with the real pipeline
(synth -> ingest -> Ray Train -> COCOeval on val), against a chance baseline evaluated the same way in
the same run (random boxes of plausible sizes, random classes and scores). Reports bbox AP50 (segm AP50
for Mask R-CNN), the ratio to chance, epochs, images and wall seconds: the budget each took.
Writes one row per model into ``benchmarks/results/detection_quality.json`` (a later run of a model
replaces its row; the others stay), and per-model lines as they finish.

Default (a few minutes here): YOLO for 2 epochs on 64 images. The README's runs, one model each
(``--keep DIR`` reuses a set already made there; ``--diagnose`` adds benchmarks.detection_diagnosis):

    B=".venv/bin/python -m benchmarks.detection_quality --size 128 --batch 8 --cpus-per-worker 2"
    $B --models ssdlite_mobilenet_v3 --images 1000 --epochs 4
    $B --models rcnn_resnet18 --images 250 --epochs 3 --batch 4
    $B --models yolo_v1 --images 4000 --epochs 10
    $B --models fasterrcnn_resnet18_fpn --images 4000 --epochs 4 --diagnose
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"
MAIN = {"segmentation": "segm/AP50", "detection": "bbox/AP50"}


def chance(data_dir: Path, seed: int = 0) -> dict:
    """bbox AP50/AP of random detections (10 per image, sizes drawn like the ground truth's) on val."""
    from pipelines.data import read_split_table
    from vision.metrics import CocoEvaluator
    from vision.structures import Detections

    table, manifest = read_split_table(data_dir, "val", ["image_id", "width", "height", "boxes", "category_ids",
                                                         "iscrowd", "area"])
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
        ev.add(r["image_id"], Detections(boxes, torch.tensor(rng.uniform(0, 1, n), dtype=torch.float32),
                                         torch.tensor(rng.integers(1, k + 1, n))))
    return ev.compute()


def prepare(root: Path, images: int, size: int, seed: int) -> Path:
    from pipelines.data import ingest
    from vision.data.synth import write_synth

    write_synth(root / "coco", images=images, size=size, seed=seed, val_fraction=0.2)
    for split in ("train", "val"):
        ingest(root / "coco" / "annotations" / f"instances_{split}.json", root / "coco" / split, root / "data" / split)
    return root / "data"


def prepare_local(root: Path, images: int, size: int, seed: int) -> Path:
    """Without Ray (for --engine local where a cluster cannot start): the synth set written as one
    Parquet shard per split in the shard schema, with the manifest fields the trainer reads."""
    import contextlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO

    from pipelines.data.schema import SHARD_SCHEMA
    from vision.data.synth import write_synth

    write_synth(root / "coco", images=images, size=size, seed=seed, val_fraction=0.2)
    for split in ("train", "val"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(root / "coco" / "annotations" / f"instances_{split}.json"))
        cats = sorted(coco.getCatIds())
        label = {c: i + 1 for i, c in enumerate(cats)}
        rows = []
        for img in coco.dataset["images"]:
            anns = coco.imgToAnns[img["id"]]
            rles = [coco.annToRLE(a) for a in anns]
            rows.append({"image_id": img["id"], "file_name": img["file_name"], "width": img["width"],
                         "height": img["height"], "image": (root / "coco" / split / img["file_name"]).read_bytes(),
                         "boxes": [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                   for a in anns],
                         "category_ids": [a["category_id"] for a in anns],
                         "labels": [label[a["category_id"]] for a in anns], "iscrowd": [a["iscrowd"] for a in anns],
                         "area": [a["area"] for a in anns],
                         "segmentation": [{"size": list(r["size"]), "counts": r["counts"].decode()} for r in rles]})
        out = root / "data" / split
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), out / "part-0.parquet")
        manifest = {"num_images": len(rows), "shards": ["part-0.parquet"], "quarantined": [], "dropped": [],
                    "categories": [{"id": c, "name": coco.cats[c]["name"], "label": label[c]} for c in cats]}
        (out / "_manifest.json").write_text(json.dumps(manifest))
    return root / "data"


def save(row: dict, start: dict) -> None:
    """Put one model's row into ``results/detection_quality.json``, replacing that model's earlier row:
    each model is trained in its own run (each takes minutes to hours here), so every row carries the
    settings it was measured with, and its run's command, date and load (``benchmarks.provenance``)."""
    if provenance.loaded(start) and not start["allow_load"]:
        print(f"not saving {row['arch']}'s row: the machine was loaded at the start (--allow-load to override)")
        return
    path = RESULTS / "detection_quality.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = [r for r in old.get("models", []) if r.get("arch") != row["arch"]] + [{**row, **start}]
    path.write_text(json.dumps({"benchmark": "detection_quality",
                                "note": "from scratch (weights=None), AdamW, cosine; each row its own run",
                                "models": rows}, indent=2))


MODEL_KWARGS = {  # sized for the synth images and a CPU budget
    "fasterrcnn_resnet18_fpn": lambda s: {"min_size": s, "max_size": s},
    "maskrcnn_resnet18_fpn": lambda s: {"min_size": s, "max_size": s},
    "fasterrcnn_mobilenet_v3_fpn": lambda s: {"min_size": s, "max_size": s},
    "yolo_v1": lambda s: {"image_size": max(64, s // 16 * 16)},
    "rcnn_resnet18": lambda s: {"max_proposals": 100},
}


def fit_local(cfg, log_every: int = 0) -> dict:
    """The trainer's task plug-ins (view rows, collate, train_step, evaluate) in one process, without Ray:
    same code path for the model and the metrics, none of the cluster start-up. Returns fit()'s shape."""
    from pipelines.data import read_split_table
    from pipelines.data.views import _detection_rows
    from pipelines.train.tasks import get_task
    from pipelines.train.trainer import make_optimizer, resolve_config

    cfg = resolve_config(cfg)
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    model = task.build_model(cfg)
    optimizer = make_optimizer(model, cfg)
    masks = cfg.task == "segmentation"

    train, val = (read_split_table(cfg.data, split)[0] for split in ("train", "val"))
    records = []
    for epoch in range(cfg.epochs):
        lr = cfg.learning_rate() * cfg.lr_factor(epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        model.train()
        order = np.random.default_rng(cfg.seed + epoch).permutation(train.num_rows)
        t0, seen, losses = time.perf_counter(), 0, []
        for start in range(0, len(order) - getattr(task, "MIN_BATCH", 1) + 1, cfg.batch_size):
            rows = train.take(order[start:start + cfg.batch_size])
            raw = _detection_rows(rows, size=cfg.image_size, train=True, seed=cfg.seed, epoch=epoch, masks=masks)
            loss, _ = task.train_step(model, task.collate(raw, "cpu"), cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(raw["image"])
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            batches = (task.collate(_detection_rows(val.slice(i, cfg.batch_size), size=cfg.image_size, train=False,
                                                    seed=cfg.seed, epoch=0, masks=masks), "cpu")
                       for i in range(0, val.num_rows, cfg.batch_size))
            metrics = task.evaluate(model, batches, cfg)
        rec = {"epoch": epoch, "train_images": seen, "train_loss": float(np.mean(losses)),
               "seconds": time.perf_counter() - t0, **{f"val_{k}": v for k, v in metrics.items()}}
        records.append(rec)
        key = "val_segm/AP50" if masks else "val_bbox/AP50"
        print(f"  {cfg.arch} epoch {epoch + 1}/{cfg.epochs}  loss {rec['train_loss']:.3f}  {key} {rec[key]:.4f}  "
              f"{rec['seconds']:.0f}s", flush=True)
    return {"metrics": records[-1], "epochs_run": len(records)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolo_v1"])
    ap.add_argument("--images", type=int, default=64, help="synth images (train + val, 20%% val)")
    ap.add_argument("--size", type=int, default=128, help="synth image side in pixels")
    ap.add_argument("--model-size", type=int, default=None,
                    help="the side the model resizes its input to (R-CNNs' min/max_size, YOLO's image_size); "
                         "default --size")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0,
                    help="CPUs (and torch threads) of each Ray Train worker; 2 on an idle 2-core box")
    ap.add_argument("--diagnose", action="store_true",
                    help="also score the trained model class-agnostic and on train (benchmarks.detection_diagnosis)")
    ap.add_argument("--keep", type=str, default=None, help="keep data and runs under this directory")
    ap.add_argument("--engine", choices=("ray", "local"), default="ray",
                    help="ray: visionflow's Ray Train fit(); local: the same task plug-ins in this process")
    provenance.add_arguments(ap)
    args = ap.parse_args(argv)
    start = provenance.begin(args)

    import ray

    from pipelines.ray_runtime import LOCAL, connect
    from pipelines.train import TrainConfig, fit
    from vision.models import model_task

    def start_ray():  # ingest runs on Ray Data; training on Ray Train unless --engine local
        if not ray.is_initialized():
            connect(LOCAL, num_cpus=4, dashboard=False, log_to_driver=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    model_size = args.model_size or args.size
    settings = {"engine": args.engine, "images": args.images, "size": args.size, "model_size": model_size,
                "epochs": args.epochs,
                "batch": args.batch, "lr": args.lr, "workers": args.workers, "cpus_per_worker": args.cpus_per_worker}
    rows = []
    try:
        data = root / "data"
        if not (data / "val" / "_manifest.json").exists():  # --keep reuses an ingested set
            if args.engine == "local":
                data = prepare_local(root, args.images, args.size, args.seed)
            else:
                start_ray()
                data = prepare(root, args.images, args.size, args.seed)
        if args.engine == "ray":
            start_ray()
        base = chance(data, args.seed)
        print(f"chance: bbox AP50 {base['bbox/AP50']:.4f}", flush=True)
        for arch in args.models:
            task = model_task(arch)
            cfg = TrainConfig(task=task, arch=arch, data=str(data), out=str(root / "runs" / arch),
                              workers=args.workers, epochs=args.epochs, batch_size=args.batch, image_size=args.size,
                              optimizer="adamw", lr=args.lr, seed=args.seed,
                              cpus_per_worker=args.cpus_per_worker, augment_cpus=0.5,
                              model_kwargs=MODEL_KWARGS.get(arch, lambda s: {})(model_size))
            t = time.perf_counter()
            out = fit(cfg, restart=True) if args.engine == "ray" else fit_local(cfg)  # --keep: trained again
            m = out["metrics"]
            row = {"arch": arch, "task": task, "metric": MAIN[task], "value": m.get(f"val_{MAIN[task]}"),
                   "bbox/AP50": m.get("val_bbox/AP50"), "bbox/AP": m.get("val_bbox/AP"),
                   "segm/AP50": m.get("val_segm/AP50"), "segm/AP": m.get("val_segm/AP"), "epochs": out["epochs_run"],
                   "train_images": m.get("train_images", 0) * out["epochs_run"], "seconds": time.perf_counter() - t,
                   **settings, "chance_bbox/AP50": base["bbox/AP50"]}
            row["ratio_to_chance"] = (row["bbox/AP50"] or 0.0) / max(base["bbox/AP50"], 1e-6)
            if args.diagnose:
                from benchmarks.detection_diagnosis import diagnose

                row["diagnosis"] = diagnose(cfg.out, data)
                print(f"  diagnosis: {json.dumps({k: round(v, 3) for k, v in row['diagnosis'].items()})}", flush=True)
            rows.append(row)
            print(f"{arch:<28} {row['metric']} {row['value']:.4f}  bbox AP50 {row['bbox/AP50']:.4f} "
                  f"({row['ratio_to_chance']:.0f}x chance)  {row['epochs']} epochs  {row['seconds']:.0f}s", flush=True)
            save(row, start)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    print(f"\n{'model':<28}{'metric':>12}{'value':>9}{'x chance':>10}{'epochs':>8}{'seconds':>9}")
    for r in rows:
        print(f"{r['arch']:<28}{r['metric']:>12}{r['value']:>9.4f}{r['ratio_to_chance']:>10.1f}{r['epochs']:>8}"
              f"{r['seconds']:>9.0f}")
    return {"settings": settings, "models": rows}


if __name__ == "__main__":
    main()
