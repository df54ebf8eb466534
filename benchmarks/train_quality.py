"""Learning works: ResNet-18 on the synth classification crops (64x64) and the ResNet-18 localizer, trained
with `pipelines.train.fit` (Ray Train, the real data pipeline), against the targets >= 90% val top-1 and
>= 70% localization accuracy. The baseline in the same run is chance (1/K). Figures are wall-clock on
whatever this machine is (a shared 2-core box in the README). Writes ``benchmarks/results/train_quality.json``.

    .venv/bin/python -m benchmarks.train_quality [--tasks classification localization] [--images 2000]
        [--cls-epochs 12] [--loc-epochs 16] [--loc-size 64] [--batch 32]

The README's runs: ``--tasks classification --images 2000`` and ``--tasks localization --images 4000``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"
TARGETS = {"classification": ("top1", 0.90), "localization": ("loc_acc", 0.70)}


def main() -> None:
    import ray

    from pipelines.data import ingest
    from pipelines.ray_runtime import LOCAL, connect
    from pipelines.train import TrainConfig, fit
    from vision.data.synth import write_synth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="synth images (80%% train, 20%% val)")
    p.add_argument("--cls-epochs", type=int, default=12)
    p.add_argument("--loc-epochs", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                   help="which of the two runs (each replaces its own row in the results file)")
    p.add_argument("--loc-size", type=int, default=64, help="localization input side (the classification crops are 64)")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    provenance.add_arguments(p)
    args = p.parse_args()
    start = provenance.begin(args)

    connect(LOCAL, num_cpus=4, dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        write_synth(root / "coco", images=args.images, size=128, seed=0, val_fraction=0.2)
        for split in ("train", "val"):
            ingest(root / f"coco/annotations/instances_{split}.json", root / "coco" / split, root / "data" / split)
        for task, epochs in (("classification", args.cls_epochs), ("localization", args.loc_epochs)):
            if task not in args.tasks:
                continue
            size = args.loc_size if task == "localization" else 64
            cfg = TrainConfig(task=task, arch="resnet18", data=str(root / "data"), out=str(root / f"run_{task}"),
                              workers=args.workers, epochs=epochs, batch_size=args.batch, image_size=size,
                              optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1,
                              cpus_per_worker=2, augment_cpus=0.5)
            t0 = time.perf_counter()
            result = fit(cfg, restart=True)  # --out reused: trained again, not resumed at its last epoch
            key, target = TARGETS[task]
            m = result["metrics"]
            rows.append({"task": task, "arch": "resnet18", "metric": key, "value": m[f"val_{key}"],
                         "target": target, "chance": 1 / cfg_classes(root), "met": m[f"val_{key}"] >= target,
                         "epochs": epochs, "image_size": size, "images": args.images, "workers": args.workers,
                         "train_images_per_epoch": m["train_images"],
                         "val_images": m.get("val_images"), "train_images_per_s": m["train_images_per_s"],
                         "wall_seconds": time.perf_counter() - t0})
            print(f"{task}: val {key} {m[f'val_{key}']:.3f} (target {target}) after {epochs} epochs, "
                  f"{rows[-1]['wall_seconds']:.0f}s", flush=True)
    ray.shutdown()
    path = RESULTS / "train_quality.json"
    for row in rows:  # one run per task, each with its own command, date and load (the other task's kept)
        provenance.write_run(path, "train_quality", row["task"], row, start)
    print("| task | metric | value | chance | target | epochs | wall s | train img/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['task']} | {r['metric']} | {r['value']:.3f} | {r['chance']:.3f} | {r['target']:.2f} | "
              f"{r['epochs']} | {r['wall_seconds']:.0f} | {r['train_images_per_s']:.1f} |")


def cfg_classes(root: Path) -> int:
    manifest = json.loads((root / "data" / "train" / "_manifest.json").read_text())
    return len(manifest["categories"])


if __name__ == "__main__":
    main()
