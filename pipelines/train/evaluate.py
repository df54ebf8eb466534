"""Evaluate a checkpoint on a data directory's val split (what `visionflow eval` and the DAG run)."""
from __future__ import annotations

import time

import torch

from pipelines import storage


def _inference_rate(model, batches: list, repeats: int = 2, warmup=None) -> float | None:
    """Images/s of the model's forward pass alone on already collated batches (after one warm-up pass on
    ``warmup``, default the first batch's inputs)."""
    if not batches:
        return None
    with torch.no_grad():
        model(batches[0][0] if warmup is None else warmup)
        n, t0 = 0, time.perf_counter()
        for _ in range(repeats):
            for b in batches:
                model(b[0])
                n += len(b[0])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return n / max(time.perf_counter() - t0, 1e-9)


def evaluate_checkpoint(checkpoint, data_dir, out=None, *, split: str = "val", batch_size: int = 32,
                        device: str | None = None) -> dict:
    """Metrics of ``checkpoint`` (run dir, checkpoint dir or ``.pt``) on ``data_dir/split``: the task's
    metrics (top-1/top-5, localization accuracy, COCO AP) plus ``inference_images_per_s``, ``images``,
    ``arch``, ``task``, ``epoch``. Writes ``out/metrics.json`` when ``out`` is given. Ray Data's console
    in this process passes warnings only from then on (``pipelines.data.console``)."""
    from pipelines.data import load_split, quiet_data_console, quiet_execution
    from pipelines.train.checkpoint import category_names, check_categories, load_checkpoint
    from pipelines.train.config import TrainConfig
    from pipelines.train.tasks import get_task

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_checkpoint(checkpoint, device=device)
    cfg = TrainConfig.model_validate({k: v for k, v in config.items() if k != "epoch"})
    task = get_task(cfg.task)
    ds, manifest = load_split(data_dir, split, num_cpus=cfg.augment_cpus)
    check_categories(config, category_names(manifest.get("categories")), checkpoint, storage.join(str(data_dir), split))
    quiet_data_console()
    view = quiet_execution(task.view(ds, cfg, train=False, epoch=0))
    batches = (task.collate(b, device) for b in view.iter_batches(batch_size=batch_size, batch_format="numpy"))
    first = []
    for b in batches:  # keep a few for the timing; then evaluate all of them
        first.append(b)
        if len(first) == 3:
            break
    rate = _inference_rate(model, first)

    def all_batches():
        yield from first
        yield from batches

    t0 = time.perf_counter()
    with torch.no_grad():
        metrics = task.evaluate(model, all_batches(), cfg)
    result = {"arch": cfg.arch, "task": cfg.task, "epoch": config["epoch"], "checkpoint": str(checkpoint),
              "data": str(data_dir), "split": split, **{k: v for k, v in metrics.items()},
              "inference_images_per_s": rate, "eval_seconds": time.perf_counter() - t0}
    if out is not None:
        result["metrics_path"] = storage.write_json(str(out), "metrics.json", result)
    return result


# A validation record's fields that describe the pass rather than the model.
_PASS_FIELDS = {"val_seconds", "val_images_per_s"}


def metrics_from_training(checkpoint, data_dir, out=None, *, split: str = "val", rate_images: int = 8,
                          device: str | None = None) -> dict | None:
    """What ``evaluate_checkpoint`` returns, without repeating the work: a training validates its model
    on the val split after every epoch, so the latest checkpoint's metrics are its last epoch's ``val_*``.
    The checkpoint is still loaded (a torn file fails here, not when it is served) and
    ``inference_images_per_s`` is measured on its first ``rate_images`` val images (one pass, after a
    warm-up on two), read in this process.
    None, to evaluate instead, when the run's last record is not the checkpoint's epoch, the training
    validated on other data or on more than one worker (equal shards may leave a row out), or ``split``
    is not val. Those checks read the run's records and config.json first: the checkpoint is loaded only
    when its metrics will be taken."""
    from pipelines.data import augment_table, read_split_table
    from pipelines.train.checkpoint import load_checkpoint
    from pipelines.train.config import TrainConfig
    from pipelines.train.tasks import get_task

    if split != "val" or str(checkpoint).endswith(".pt"):
        return None
    run = storage.RunDir(str(checkpoint))
    records, run_config = run.read_metrics(), run.read_json("config.json") or {}
    if not records or records[-1].get("workers") != 1 or not storage.same_place(run_config.get("data"), data_dir):
        return None
    last = records[-1]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_checkpoint(checkpoint, device=device)
    if last.get("epoch") != config["epoch"]:
        return None
    cfg = TrainConfig.model_validate({k: v for k, v in config.items() if k != "epoch"})
    task = get_task(cfg.task)
    t0 = time.perf_counter()
    table, _ = read_split_table(data_dir, split)
    rows = augment_table(table.slice(0, rate_images), task=cfg.task, size=cfg.image_size, train=False, seed=cfg.seed)
    # One pass over a few images after a warm-up on two: a detector's forward pass takes a second an image
    # here (R-CNN, Mask R-CNN), and 3 x 32 images cost what the whole evaluation used to.
    rate = None
    if len(next(iter(rows.values()))):
        warm = task.collate({k: v[:2] for k, v in rows.items()}, device)[0]
        rate = _inference_rate(model, [task.collate(rows, device)], repeats=1, warmup=warm)
    metrics = {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_") and k not in _PASS_FIELDS}
    result = {"arch": cfg.arch, "task": cfg.task, "epoch": config["epoch"], "checkpoint": str(checkpoint),
              "data": str(data_dir), "split": split, **metrics, "inference_images_per_s": rate,
              "eval_seconds": time.perf_counter() - t0,
              "source": f"the training's validation after epoch {config['epoch'] + 1}"}
    if out is not None:
        result["metrics_path"] = storage.write_json(str(out), "metrics.json", result)
    return result


