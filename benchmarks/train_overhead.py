"""What Ray Train costs: 2 Ray Train workers (DDP over gloo) against a plain single-process PyTorch loop,
same data, same model, same global batch, in one run.

The data are the synth classification crops (written, ingested and cropped once with the real pipeline,
then held in memory; each Ray worker takes every other image from the object store), so both sides time
the same thing: the training steps (collate, forward, backward, optimizer) over the
same images. The baseline uses all the process's threads; each Ray worker gets its share. The first
epoch of each side is a warm-up and is not timed; the baseline is timed before and after the Ray side, and
the ratio is against the mean of the two. Writes ``benchmarks/results/train_overhead.json``.

    .venv/bin/python -m benchmarks.train_overhead [--arch resnet18] [--size 64] [--batch 64] [--epochs 4] [--images 400]
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


def crops(images: int, size: int, seed: int = 0) -> dict:
    """Synth classification crops as numpy: {"image": uint8 N,size,size,3, "label": int64 N}."""
    from pipelines.data import augment, ingest, load_split
    from vision.data.synth import write_synth

    with tempfile.TemporaryDirectory() as tmp:
        write_synth(Path(tmp) / "coco", images=images, size=128, seed=seed, val_fraction=0.01)
        ingest(Path(tmp) / "coco/annotations/instances_train.json", Path(tmp) / "coco/train", Path(tmp) / "train")
        ds, _ = load_split(tmp, "train")
        rows = augment(ds, task="classification", size=size, train=False).take_all()
    return {"image": np.stack([r["image"] for r in rows]), "label": np.array([r["label"] for r in rows])}


def _steps(cfg, model, optimizer, batches, device) -> int:
    """One epoch of training steps over numpy batches; returns the images seen."""
    from pipelines.train.tasks import classification as task

    seen = 0
    for raw in batches:
        loss, _ = task.train_step(model, task.collate(raw, device), cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(raw["label"])
    return seen


def _batches(data: dict, batch: int, rank: int = 0, world: int = 1):
    n = len(data["label"]) // (batch * world) * (batch * world)  # whole global batches only, as DDP needs
    for start in range(0, n, batch * world):
        s = slice(start + rank * batch, start + (rank + 1) * batch)
        yield {"image": data["image"][s], "label": data["label"][s]}


def plain(data: dict, cfg, epochs: int, threads: int) -> float:
    """Images/s of a single-process loop with the global batch."""
    from pipelines.train.tasks import classification as task
    from pipelines.train.trainer import make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = task.build_model(cfg).train()
    optimizer = make_optimizer(model, cfg)
    _steps(cfg, model, optimizer, _batches(data, cfg.batch_size * 2), "cpu")  # warm-up epoch
    t0, seen = time.perf_counter(), 0
    for _ in range(epochs - 1):
        seen += _steps(cfg, model, optimizer, _batches(data, cfg.batch_size * 2), "cpu")
    return seen / (time.perf_counter() - t0)


def _ray_loop(config: dict) -> None:
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from pipelines.train.config import TrainConfig
    from pipelines.train.distributed import all_reduce_sums
    from pipelines.train.tasks import classification as task
    from pipelines.train.trainer import make_optimizer

    cfg = TrainConfig.model_validate(config["cfg"])
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    full = ray.get(config["data"][0])
    n = len(full["label"]) // (cfg.batch_size * world) * (cfg.batch_size * world)  # the baseline's images
    data = {k: v[:n][rank::world] for k, v in full.items()}  # this worker's half, in memory like the baseline's
    model = DistributedDataParallel(task.build_model(cfg).train())
    optimizer = make_optimizer(model, cfg)
    _steps(cfg, model, optimizer, _batches(data, cfg.batch_size), "cpu")  # warm-up epoch
    t0, seen = time.perf_counter(), 0
    for _ in range(config["epochs"] - 1):
        seen += _steps(cfg, model, optimizer, _batches(data, cfg.batch_size), "cpu")
    total = all_reduce_sums({"seen": seen})["seen"]
    seconds = all_reduce_sums({"s": time.perf_counter() - t0}, op="max")["s"]
    metrics = {"images_per_s": total / seconds}
    with tempfile.TemporaryDirectory() as d:  # Train V2 keeps metrics only with a checkpoint
        (Path(d) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def ray_train(data: dict, cfg, epochs: int, threads: int) -> float:
    """Images/s of 2 Ray Train workers (DDP, gloo), each with half the global batch."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        config = {"cfg": cfg.model_dump(mode="json"), "epochs": epochs, "threads": threads,
                  "data": [ray.put(data)]}  # in a list: Ray passes the reference, not the arrays
        trainer = TorchTrainer(_ray_loop, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name="overhead", storage_path=tmp))
        return trainer.fit().metrics["images_per_s"]


def main() -> None:
    import os

    import ray

    from pipelines.ray_runtime import LOCAL, connect
    from pipelines.train.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="per Ray worker; the baseline's batch is twice this")
    p.add_argument("--epochs", type=int, default=4, help="epochs per side, the first one untimed")
    p.add_argument("--images", type=int, default=400, help="synth images (about 2-3 crops each)")
    provenance.add_arguments(p)
    args = p.parse_args()
    if args.epochs < 2:  # the first epoch is untimed: one epoch timed nothing (a division by zero at the end)
        p.error(f"--epochs must be >= 2 (the first is an untimed warm-up), got {args.epochs}")
    start = provenance.begin(args)

    cores = os.cpu_count() or 2
    connect(LOCAL, num_cpus=max(4, cores), dashboard=False, log_to_driver=False)
    try:
        data = crops(args.images, args.size)
        cfg = TrainConfig(arch=args.arch, data="-", out="-", image_size=args.size, batch_size=args.batch,
                          num_classes=int(data["label"].max()) + 1, optimizer="sgd", lr=0.01)
        # The baseline before and after the Ray side: a single short timing of it moved by 25% between
        # runs (147-189 images/s); the ratio is against the mean of the two.
        before = plain(data, cfg, args.epochs, threads=cores)
        print(f"plain PyTorch: {before:.1f} images/s", flush=True)
        dist = ray_train(data, cfg, args.epochs, threads=max(1, cores // 2))
        after = plain(data, cfg, args.epochs, threads=cores)
        print(f"plain PyTorch again: {after:.1f} images/s", flush=True)
    finally:
        ray.shutdown()
    base = (before + after) / 2
    result = {"arch": args.arch, "size": args.size, "global_batch": 2 * args.batch, "images": len(data["label"]),
              "timed_epochs": args.epochs - 1, "cores": cores, "plain_images_per_s": base,
              "plain_before_after": [before, after],
              "ray_train_2_workers_images_per_s": dist, "ratio": dist / base}
    provenance.write(RESULTS / "train_overhead.json", result, start)
    print(f"| loop | images/s | ratio |\n| --- | ---: | ---: |\n| plain PyTorch, 1 process | {base:.1f} | 1.00 |\n"
          f"| Ray Train, 2 workers (DDP, gloo) | {dist:.1f} | {dist / base:.2f} |")
    print(f"{args.arch} at {args.size}px, global batch {2 * args.batch}, {len(data['label'])} crops, "
          f"{args.epochs - 1} timed epochs, {cores} cores")


if __name__ == "__main__":
    main()
