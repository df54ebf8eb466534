"""The one Ray Train loop: workers, DDP, AMP, checkpoints, resume, fault tolerance and progress.

Everything task-specific comes from the task plug-in (``pipelines/train/tasks/<task>.py``):

- ``build_model(cfg)``; the loop moves it to the worker's device unless it has a ``devices`` attribute
  (a model that placed its own parts, like the two-tower AlexNet on two GPUs).
- ``view(ds, cfg, train=, epoch=)``: the training view is built once per epoch (``train_<epoch>``), so each
  epoch gets its own augmentation draws; several workers split it equally (``_split``; ``val`` through
  Ray Train's ``get_dataset_shard``), so every worker runs the same number of steps; one worker iterates
  each dataset whole.
- ``collate(numpy_batch, device)`` -> whatever ``train_step`` and ``evaluate`` take. Numpy batches come from
  ``iter_batches`` (not ``iter_torch_batches``), so ragged detection rows are the task's to collate.
- ``MIN_BATCH`` (optional, default 1): smaller batches are skipped (batch norm needs 2 samples).
- ``train_step(model, batch, cfg) -> (loss, stats)``: ``stats`` are batch means (floats); an ``"n"`` entry
  (images in the batch) weights them, otherwise the numpy batch's length does.
- ``evaluate(model, batches, cfg) -> dict``: called on every worker with its val shard's collated batches
  (``model`` unwrapped, in eval mode, under no_grad); the task reduces over workers itself.

Each epoch: one progress line (images/s, metrics), one ``metrics.jsonl`` record and one checkpoint
``RUN_DIR/checkpoints/epoch_NNNN/checkpoint.pt`` = {"model", "optimizer", "epoch", "config"} ("optimizer" left
out with ``save_optimizer`` off).

A non-finite loss stops every worker at the same step (one all-reduced flag per step), and weights that are
not finite are never saved (checked before each checkpoint): rank 0 writes ``RUN_DIR/diverged.json`` and
``fit`` raises ``TrainingDiverged`` with one line; the last good checkpoint stays the latest.
"""
from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from pipelines import storage
from pipelines.train.config import TrainConfig
from pipelines.train.devices import is_multi_device
from pipelines.train.distributed import all_reduce_sums, any_bad_rank, gather_strings
from pipelines.train.tasks import get_task

CHECKPOINTS = "checkpoints"  # Ray Train's run name: RUN_DIR/checkpoints/epoch_NNNN/
CHECKPOINT_FILE = "checkpoint.pt"
DIVERGED = "diverged.json"  # RUN_DIR/diverged.json: why the last run stopped on non-finite numbers
PHASES = "phases.json"  # RUN_DIR/phases.json: where the last fit's wall time went (rank 0's clock)


class TrainingDiverged(RuntimeError):
    """Training stopped at a non-finite loss (or weights); the message is one line with the advice."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov-free, as the canon trained) or AdamW over the trainable parameters;
    biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.learning_rate()
    fused = fused_supported(decay + no_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


# torch's fused optimizer kernels: one pass over each parameter instead of one operation at a time (AdamW
# on a CPU: VGG-16's 138M parameters 0.09 s a step against 1.0-1.2 s; docs/training.md).
_FUSED_DEVICES = {"cpu", "cuda"}
_FUSED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def fused_supported(params: list) -> bool:
    """Whether torch's fused SGD/AdamW kernels take ``params``: floating point, on a CPU or CUDA device
    (a model split over two GPUs included), not sparse."""
    return bool(params) and all(p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES and not p.is_sparse
                                for p in params)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` for its state (momentum buffers, AdamW's moments), keeping this
    optimizer's own settings: torch takes each group's settings from the saved state, so a resume with
    another ``--weight-decay`` or ``--momentum`` kept the old ones, and a checkpoint from before the fused
    kernels (or from a device without them) would switch them off, or on where they cannot run."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    lr = cfg.learning_rate() * cfg.lr_factor(epoch)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


# DDP's reducer compares a gradient's strides with its bucket view's, size-1 dimensions included: the CPU
# backward of a 1x1 convolution gives its weight's gradient (e.g. [512, 256, 1, 1]) strides [256, 1, 256, 256]
# against the bucket's [256, 1, 1, 1], the same memory order, and each worker warned of it once, in four lines
# between the progress lines (the gradient is copied into its bucket either way).
DDP_STRIDES_WARNING = "Grad strides do not match bucket view strides"


def _wrap_ddp(model: nn.Module, device: torch.device, task) -> nn.Module:
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    warnings.filterwarnings("ignore", message=DDP_STRIDES_WARNING, category=UserWarning)
    single_gpu = device.type == "cuda" and not is_multi_device(model)
    return DistributedDataParallel(model, device_ids=[device] if single_gpu else None,
                                   find_unused_parameters=getattr(task, "FIND_UNUSED_PARAMETERS", False))


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of ``epoch``'s checkpoint under ``RUN_DIR/checkpoints`` (Ray Train's and a lane's)."""
    return f"epoch_{epoch:04d}"


def _checkpoint_registered(cfg: TrainConfig, epoch: int) -> bool:
    """Whether Ray Train's controller has recorded ``epoch``'s checkpoint (its snapshot on storage)."""
    snapshot = storage.read_json(cfg.out, f"{CHECKPOINTS}/checkpoint_manager_snapshot.json") or {}
    names = {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results", [])}
    return checkpoint_dir_name(epoch) in names


def _chaos(cfg: TrainConfig, epoch: int, rank: int, committed=_checkpoint_registered, wait_s: float = 600.0) -> None:
    """Fault injection for tests: SIGKILL this worker process once, at the configured epoch.

    It first waits until the controller has registered the previous epoch's checkpoint: Ray Train collects
    reports when it polls the workers, so a worker dying right after ``report`` can take that epoch's
    checkpoint with it (training would then resume from the one before, which is not what is tested)."""
    c = cfg.chaos
    if not (c and epoch == c.kill_at_epoch and rank == c.rank and not os.path.exists(c.marker)):
        return
    deadline = time.monotonic() + wait_s
    while epoch > 0 and not committed(cfg, epoch - 1) and time.monotonic() < deadline:
        time.sleep(0.5)
    Path(c.marker).write_text(f"killed rank {rank} at epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _chaos_loss(cfg: TrainConfig, loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """Fault injection for tests: the configured rank's loss becomes NaN at the configured step of the run."""
    c = cfg.chaos
    if c and c.nan_loss_at_step is not None and step == c.nan_loss_at_step and rank == c.rank:
        return loss * float("nan")
    return loss


def _finite_state(model: nn.Module) -> bool:
    """Whether every floating tensor of the model's state (weights, batch-norm statistics) is finite. One
    reduction per tensor (its min and max: NaN and inf show in them), not a boolean copy of every weight
    (docs/training.md: 12x faster for VGG-16)."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point() and v.numel():
                low, high = torch.aminmax(v)
                if not (torch.isfinite(low) and torch.isfinite(high)):
                    return False
        return True


def _divergence(cfg: TrainConfig, what: str, *, epoch: int, step: int | None, loss: float | None,
                last_finite: float | None, bad_rank: int) -> dict:
    """The record of a stop on non-finite numbers, with its one line (epochs and steps 1-based as in the
    progress lines)."""
    where = f"epoch {epoch + 1}/{cfg.epochs}" + (f", step {step + 1}" if step is not None else "")
    worker = f" on worker {bad_rank}" if bad_rank != 0 else ""
    if what == "loss":
        shown = f"is {loss}" if loss is not None else "is not finite"
        head = f"training diverged: the loss {shown}{worker} at {where}"
    else:
        head = f"training diverged: the weights are not finite{worker} after {where}"
    last = f"last finite loss {last_finite:.6g}" if last_finite is not None else "no finite loss before it in this run"
    if epoch > 0:
        kept = f"nothing of epoch {epoch + 1} was saved; the latest checkpoint stays epoch {epoch}'s"
        advice = f"lower --lr (now {cfg.learning_rate():g}) and rerun the same command to resume from it"
    else:
        kept = "no checkpoint was saved"
        advice = f"lower --lr (now {cfg.learning_rate():g}) and rerun"
    return {"what": what, "epoch": epoch, "step": step, "loss": None if loss is None else str(loss),
            "last_finite_loss": last_finite, "worker": bad_rank, "lr": cfg.learning_rate(),
            "message": f"{head} ({last}); {kept}: {advice}"}


def _load_payload(checkpoint, device) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)


def checkpoint_payload(model: nn.Module, optimizer, cfg: TrainConfig, epoch: int) -> dict:
    """What ``checkpoint.pt`` holds: {"model" (CPU tensors), "optimizer" (unless ``cfg.save_optimizer`` is
    off), "epoch", "config"}."""
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "epoch": epoch,
               "config": cfg.model_dump(mode="json")}
    if cfg.save_optimizer:
        payload["optimizer"] = optimizer.state_dict()
    return payload


def _save_and_report(record: dict, model: nn.Module, optimizer, cfg: TrainConfig, epoch: int, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(record)  # a barrier: every worker reports every epoch
        return
    payload = checkpoint_payload(model, optimizer, cfg, epoch)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, os.path.join(tmp, CHECKPOINT_FILE))
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(epoch))
    storage.append_metrics(cfg.out, record)


def _split(ds, worker_nodes: list[str] | None = None):
    """This worker's equal part of an epoch's training view. Rank 0 splits it (``streaming_split``: a
    coordinator process that rank 0 owns) and hands the parts to the others through the object store.
    Ray Train's own split of a dataset is kept by its dataset manager, which at shutdown asks every
    coordinator it made to stop and logs a traceback for each one ``_release`` already ended; these it
    never sees. Every worker calls this at the same point of the loop (``broadcast_from_rank_zero`` is a
    barrier). ``worker_nodes`` (each rank's node id) become the split's locality hints, as Ray Train's own
    split passes them. Returns ``(this rank's part, the parts' object ref on rank 0 else None)``."""
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hints = worker_nodes if worker_nodes is not None and len(worker_nodes) == world else None
    ref = ray.put(ds.streaming_split(world, equal=True, locality_hints=hints)) if rank == 0 else None
    got = broadcast_from_rank_zero([ref])[0]
    # Returned with rank 0's ref, which the caller holds until every rank has fetched its part.
    return ray.get(got)[rank], ref


def _release(shard) -> None:
    """End the finished epoch's split coordinator (one actor process per epoch's view); ``report`` was a
    barrier, so no worker reads that shard any more."""
    import ray

    from pipelines.ray_private import split_coordinator

    coordinator = split_coordinator(shard)  # absent for a shard that is not a streaming split
    if coordinator is not None:
        ray.kill(coordinator, no_restart=True)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def build_model(cfg: TrainConfig, task=None) -> nn.Module:
    """The model a training of ``cfg`` starts from: the task's builder, then ``cfg.bn_momentum``."""
    model = (task or get_task(cfg.task)).build_model(cfg)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    return model


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> int:
    """Set the running-statistics momentum of every batch norm in ``model``; returns how many.

    Evaluation uses the running statistics, an exponential average over training batches. With few steps
    and fast-moving weights, a small momentum (SSDlite's 0.03 averages over ~33 steps) leaves them behind
    the weights, and the model evaluates far worse than it trains until the learning rate decays."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    for m in norms:
        m.momentum = momentum
    return len(norms)


def view_mib(cfg: TrainConfig, rows: int | None, world: int) -> float | None:
    """Estimated MiB of one worker's part of a view of ``rows`` rows: uint8 images at the training size,
    scale jitter's largest side for detection and segmentation (masks: one byte per pixel, about three
    objects an image). None when the rows are unknown."""
    if not rows:
        return None
    side = cfg.image_size * (1.25 if cfg.task in ("detection", "segmentation") else 1.0)
    per_row = side * side * (3 + (3 if cfg.task == "segmentation" else 0))
    return rows / max(world, 1) * per_row / 2**20


def in_memory(cfg: TrainConfig, rows: int | None, world: int) -> bool:
    """Whether a worker reads a view of ``rows`` rows whole before using it (``cfg.in_memory_mib``)."""
    mib = view_mib(cfg, rows, world)
    return mib is not None and mib <= cfg.in_memory_mib


def format_progress(record: dict, epochs: int) -> str:
    """One progress line: epoch, images/s, losses and metrics."""
    skip = {"epoch", "start_epoch", "train_images", "val_images", "train_seconds", "val_seconds", "lr"}
    parts = [f"epoch {record['epoch'] + 1}/{epochs}", f"{record['train_images_per_s']:.1f} img/s"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k not in skip and k != "train_images_per_s"
              and isinstance(v, float)]
    return "  ".join(parts)


def _say(line: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver. Not through ``print``: Ray Train
    patches it to log *and* echo whenever ``sys.stdout`` is wrapped, so each line showed up twice."""
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()


class RayTrainIO:
    """How one training of ``train_one`` reaches its data and keeps its checkpoints under a fit of its own:
    Ray Train's dataset shards (``val``; ``train_<epoch>`` too with one worker), the epochs' own splits with
    several workers (``_split``), its checkpoint registry (``report``) and its restore (``get_checkpoint``)."""

    def __init__(self, epochs: dict | None = None):
        self.epochs = epochs or {}  # train_<epoch> -> Dataset: split here, not by Ray Train
        self.worker_nodes: list[str] | None = None  # each rank's node (train_one sets it): locality hints
        self.parts: list = []  # rank 0: the splits' object refs, held until every rank has its part

    def shard(self, name: str):
        import ray.train

        if name in self.epochs:
            part, ref = _split(self.epochs[name], self.worker_nodes)
            if ref is not None:
                self.parts.append(ref)
            return part
        return ray.train.get_dataset_shard(name)

    def resume(self, cfg: TrainConfig, device) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return _load_payload(checkpoint, device)
        from pipelines.train.checkpoint import checkpoint_candidates, load_payload, registered_checkpoints
        from pipelines.train.lane import LANE_FILE, LANE_STARTED

        # A run trained in a lane (pipelines.train.lane) keeps its checkpoints without Ray Train's registry,
        # whether the lane ended it or its worker died for good meanwhile (then only LANE_STARTED is there).
        if registered_checkpoints(cfg.out) is None and checkpoint_candidates(cfg.out) \
                and (storage.exists(cfg.out, LANE_STARTED) or storage.exists(cfg.out, LANE_FILE)):
            return load_payload(cfg.out, map_location=device)
        return None

    def save(self, record: dict, model: nn.Module, optimizer, cfg: TrainConfig, epoch: int, rank: int) -> None:
        _save_and_report(record, model, optimizer, cfg, epoch, rank)

    def committed(self, cfg: TrainConfig, epoch: int) -> bool:
        """Whether a restart would resume from ``epoch``'s checkpoint (the controller registered it)."""
        return _checkpoint_registered(cfg, epoch)

    def release(self, shard) -> None:
        """After an epoch's ``report`` (a barrier): every rank has long had its parts of this epoch's split
        and the next one's."""
        _release(shard)
        self.parts.clear()


def train_loop(config: dict) -> None:
    """The per-worker loop (``TorchTrainer``'s ``train_loop_per_worker``); ``config = {"cfg": TrainConfig dict}``."""
    train_one(TrainConfig.model_validate(config["cfg"]), config.get("rows") or {}, RayTrainIO(config.get("epochs")))


def train_one(cfg: TrainConfig, rows: dict, io) -> None:
    """One architecture's training on this worker, epochs ``[resumed epoch, cfg.epochs)``; ``rows``: the
    rows of the train and val views over all workers, from the manifests (``watch.expected_split_rows``: the
    progress bar's total, whether a view is read whole), ``io``: where data and checkpoints live
    (``RayTrainIO``, or a lane's: ``pipelines.train.lane``)."""
    import ray.train
    import ray.train.torch

    from pipelines import ray_private
    from pipelines.data import quiet_data_console

    loop_started_at = time.time()
    quiet_data_console()  # each epoch's view executions: in Ray Data's log file, not on the console
    ray_private.quiet_train_reports()  # each epoch's report: in metrics.jsonl, not as a line on the console
    task = get_task(cfg.task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The Ray node of each worker, by rank: every epoch's record says where it trained (spread placement,
    # an elastic group that shrank or grew, a restart on other nodes after a node was lost).
    worker_nodes = gather_strings(ray.get_runtime_context().get_node_id())
    io.worker_nodes = worker_nodes  # the locality hints of the epochs' splits
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)

    model = build_model(cfg, task)
    if not is_multi_device(model):
        model.to(device)
    optimizer = make_optimizer(model, cfg)
    start = 0
    payload = io.resume(cfg, device)
    if payload is not None:  # a rerun of the same command, or a restart after a worker failure
        model.load_state_dict(payload["model"])
        saved_optimizer = "optimizer" in payload  # absent when the run saves weights only
        if saved_optimizer:
            load_optimizer_state(optimizer, payload["optimizer"])
        start = payload["epoch"] + 1
        if rank == 0:
            fresh = "" if saved_optimizer else " (weights only: the optimizer starts afresh)"
            ignored = ("; --init-from and --pretrained start a fresh run only: ignored"
                       if cfg.init_from or cfg.pretrained else "")
            _say(f"resuming {cfg.arch} from epoch {payload['epoch'] + 1}/{cfg.epochs}{fresh}{ignored}")
    elif cfg.init_from or cfg.pretrained:  # a fresh run from other weights (checked on the driver by fit)
        from pipelines.train import init_weights

        report = init_weights.apply(model, cfg)
        if rank == 0:
            _say(report.line())
    net = _wrap_ddp(model, device, task) if world > 1 else model

    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext

    min_batch = getattr(task, "MIN_BATCH", 1)
    watch = None
    if rank == 0:  # progress bars, TensorBoard, metrics.csv, curves.png (pipelines/train/watch.py)
        from pipelines.train import watch as watching

        watch = watching.Watch(cfg.out, cfg.task, f"{cfg.arch} ({cfg.task}): {os.path.basename(cfg.out.rstrip('/'))}",
                               start)
    next_shard, val_cache = None, None
    # A small view is read whole before it is used (from the run's second epoch on; val once): streaming it
    # while the steps run costs them 3-10% (Ray Data's executor and the augmentation share the cores with
    # the step's threads; docs/training.md).
    expected = rows.get("train")
    whole = in_memory(cfg, expected, world)
    val_whole = in_memory(cfg, rows.get("val"), world)
    steps, last_finite, diverged = 0, None, None
    first_batch_at, step_seconds, val_seconds_sum = None, 0.0, 0.0
    for epoch in range(start, cfg.epochs):
        _chaos(cfg, epoch, rank, io.committed)
        lr = _set_lr(optimizer, cfg, epoch)
        net.train()
        sums, images, t0 = {"loss": 0.0}, 0, time.perf_counter()
        shard = next_shard if next_shard is not None else io.shard(f"train_{epoch}")
        # The next epoch's shard (with several workers, its split coordinator process) starts while this
        # epoch trains.
        next_shard = io.shard(f"train_{epoch + 1}") if epoch + 1 < cfg.epochs else None
        batches = epoch_batches(shard, cfg, epoch, rank)
        if whole and epoch > start:  # a small epoch: augmented in one burst, then steps with the CPU to
            batches = list(batches)  # themselves (not the run's first: its map workers are still starting,
            # and reading all of it would wait for every one of them before the first step)
        bar = (watching.EpochBar(f"{cfg.arch} epoch {epoch + 1}/{cfg.epochs}", expected, batch_size=cfg.batch_size,
                                 world=world) if rank == 0 else None)
        for step, raw in enumerate(batches):
            if first_batch_at is None:  # the data pipeline's start is its own phase, not the steps'
                first_batch_at, step_seconds = time.time(), step_seconds - (time.perf_counter() - t0)
            n = len(next(iter(raw.values())))
            if n < min_batch:  # equal shards: every worker skips the same step, DDP stays in step
                continue
            batch = task.collate(raw, device)
            with autocast():
                loss, stats = task.train_step(net, batch, cfg)
            loss = _chaos_loss(cfg, loss, rank, steps)
            value = float(loss.detach())
            # Before the backward pass, so that no worker enters DDP's gradient all-reduce alone.
            bad = any_bad_rank(not math.isfinite(value), rank)
            if bad is not None:
                diverged = _divergence(cfg, "loss", epoch=epoch, step=step, last_finite=last_finite, bad_rank=bad,
                                       loss=value if not math.isfinite(value) else None)
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps, last_finite = steps + 1, value
            w = float(stats.get("n", n))
            sums["loss"] += value * w
            for k, v in stats.items():
                if k != "n":
                    sums[k] = sums.get(k, 0.0) + float(v) * w
            images += int(w)
            if bar is not None:
                bar.update(int(w), value)
        if bar is not None:
            bar.close()
        if diverged is not None:
            break
        seconds = time.perf_counter() - t0
        total = all_reduce_sums({"images": float(images), **sums})
        if total["images"] == 0:  # every batch below min_batch: weights untouched, a checkpoint would lie
            raise ValueError(f"{cfg.arch}: epoch {epoch + 1} ran no training step: every batch had fewer than "
                             f"{min_batch} images (each worker's part of the train split is too small); use more "
                             f"training images or fewer workers")

        net.eval()
        t1 = time.perf_counter()
        val_rows = (val_cache if val_cache is not None
                    else io.shard("val").iter_batches(batch_size=cfg.batch_size, batch_format="numpy"))
        if val_whole and val_cache is None:  # the val view is the same every epoch (no augmentation): read
            val_rows = val_cache = list(val_rows)  # once, kept
        val_batches = (task.collate(b, device) for b in val_rows)
        with torch.no_grad(), autocast():
            val = task.evaluate(model, val_batches, cfg)
        val_seconds = time.perf_counter() - t1
        step_seconds, val_seconds_sum = step_seconds + seconds, val_seconds_sum + val_seconds

        slowest = all_reduce_sums({"seconds": seconds, "val_seconds": val_seconds}, op="max")
        n_all = max(total.pop("images"), 1.0)
        record = {"epoch": epoch, "start_epoch": start, "lr": lr, "train_images": int(n_all), "train_seconds": slowest["seconds"],
                  "train_images_per_s": n_all / max(slowest["seconds"], 1e-9),
                  **{f"train_{k}": v / n_all for k, v in sorted(total.items())},
                  **{f"val_{k}": float(v) for k, v in val.items()},
                  "val_seconds": slowest["val_seconds"], "workers": world, "worker_nodes": worker_nodes}
        if "val_images" in record:
            record["val_images_per_s"] = record["val_images"] / max(slowest["val_seconds"], 1e-9)
        bad = any_bad_rank(not _finite_state(model), rank)  # never checkpoint non-finite weights
        if bad is not None:
            diverged = _divergence(cfg, "weights", epoch=epoch, step=None, loss=None, last_finite=last_finite,
                                   bad_rank=bad)
            break
        io.save(record, model, optimizer, cfg, epoch, rank)
        expected = record["train_images"]
        if rank == 0:
            _say(format_progress(record, cfg.epochs))
            watch.after_epoch(record)
            io.release(shard)
    if watch is not None:
        watch.close()
    if rank == 0 and first_batch_at is not None:
        storage.write_json(cfg.out, PHASES, {"loop_started_at": loop_started_at, "first_batch_at": first_batch_at,
                                             "steps_s": step_seconds, "val_s": val_seconds_sum,
                                             "loop_ended_at": time.time(), "data_in_memory": whole,
                                             "val_in_memory": val_whole})
    if diverged is not None and rank == 0:  # every worker stopped at the same step; fit raises
        storage.write_json(cfg.out, DIVERGED, diverged)


def shuffle_seed(cfg: TrainConfig, epoch: int, rank: int | None = None) -> int | None:
    """The seed of an epoch's shard order (``rank`` None) or of a rank's local shuffle buffer in it; None
    when ``cfg.shuffle_buffer`` is 0 (no shuffling). The same seed, epoch and rank draw the same order."""
    if not cfg.shuffle_buffer:
        return None
    key = f"{cfg.seed}:{epoch}:{'shards' if rank is None else rank}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def epoch_batches(shard, cfg: TrainConfig, epoch: int, rank: int):
    """The numpy batches of one rank's part of an epoch's training view (a ``DataIterator``), drawn from
    a local shuffle buffer of ``cfg.shuffle_buffer`` rows (none when 0)."""
    return shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", prefetch_batches=2,
                              local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                              local_shuffle_seed=shuffle_seed(cfg, epoch, rank))


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill in what the data decides (number of classes, categories) from the train split's manifest."""
    from pipelines.data import read_manifest

    manifest = read_manifest(storage.join(str(cfg.data), "train"))
    categories = sorted(manifest.get("categories", []), key=lambda c: c["label"])
    if not categories:
        raise ValueError(f"{cfg.data}/train/_manifest.json lists no categories; expected an ingested split")
    val = sorted(read_manifest(storage.join(str(cfg.data), "val")).get("categories", []), key=lambda c: c["label"])
    if [(c["id"], c["label"]) for c in val] != [(c["id"], c["label"]) for c in categories]:
        # Each split numbers its labels 1..K by its own categories: validation scored other classes, silently.
        raise ValueError(f"{cfg.data}: the val split's categories (ids {[c['id'] for c in val]}) are not the train "
                         f"split's (ids {[c['id'] for c in categories]}), and each split numbers its labels by its "
                         "own; give both annotation files the same 'categories' list and ingest again")
    update = {"categories": categories}
    if cfg.pretrained:  # what the published weights need, recorded in the config (and so in each checkpoint)
        from vision.models.weights import published_model_kwargs

        needed = {k: v for k, v in published_model_kwargs(cfg.arch).items() if k not in cfg.model_kwargs}
        if needed:
            update["model_kwargs"] = {**cfg.model_kwargs, **needed}
    if cfg.num_classes is None:
        update["num_classes"] = len(categories)
    elif cfg.num_classes < len(categories):  # labels 1..K: a smaller head fails in the loss at the first step
        raise ValueError(f"--num-classes {cfg.num_classes} is smaller than the {len(categories)} categories of "
                         f"{cfg.data}/train; leave it out (it follows the data) or give at least {len(categories)}")
    return cfg.model_copy(update=update)


@contextmanager
def _own_sigint_handler():
    """Put back the SIGINT handler Ray Train's ``fit`` replaces: that handler holds the run's controller
    actor, which would then outlive the run (with its dataset actors, ~0.6 GiB) for as long as this
    process lives: a pipeline stage process or a notebook training one model after another."""
    if threading.current_thread() is not threading.main_thread():
        yield  # fit registers no handler off the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def cluster_shortfall(cfg: TrainConfig) -> str | None:
    """What the connected cluster lacks for ``cfg``'s smallest worker group (``min_workers`` x the per-worker
    CPUs and GPUs, plus its data pipeline's CPUs), as one line, or None when it fits. Ray Train waits for
    resources that never come, retrying without end and logging below the console's level."""
    import ray

    have = ray.cluster_resources()
    cpus = cfg.min_workers * cfg.cpus_per_worker + cfg.augment_cpus
    gpus = cfg.min_workers * cfg.gpus_per_worker
    if gpus > float(have.get("GPU", 0)) + 1e-9:
        return (f"{cfg.min_workers} worker(s) x --gpus-per-worker {cfg.gpus_per_worker:g} need {gpus:g} GPUs but the "
                f"cluster has {float(have.get('GPU', 0)):g}: leave --gpus-per-worker out for a CPU run, or join a "
                "cluster with GPUs (--address)")
    if cpus > float(have.get("CPU", 0)) + 1e-9:
        return (f"{cfg.min_workers} worker(s) x --cpus-per-worker {cfg.cpus_per_worker:g} plus {cfg.augment_cpus:g} for "
                f"the data pipeline need {cpus:g} CPUs but the cluster has {float(have.get('CPU', 0)):g}: use fewer "
                "--workers or --cpus-per-worker, or a larger --num-cpus")
    return None


def _check_builds(cfg: TrainConfig, task) -> None:
    """A model that does not build with these settings (``--model-kwargs`` its builder does not take) is
    one line here, before Ray Train starts its processes: built on the meta device (no memory, no weights).
    Skipped where workers have GPUs (a model may place its own parts on devices there)."""
    if cfg.gpus_per_worker > 0:
        return
    try:
        with torch.device("meta"):
            model = task.build_model(cfg)
    except (TypeError, ValueError, KeyError) as e:  # an argument, or a value of one, the builder refuses
        raise ValueError(f"{cfg.arch} does not build with these settings (model_kwargs "
                         f"{dict(cfg.model_kwargs)}): {type(e).__name__}: {e}") from None
    except Exception:  # noqa: BLE001 -- what the meta device cannot do (a model copying its parts to devices,
        return  # the two-tower AlexNet): the worker builds it for real and reports any error there
    if cfg.task not in ("classification", "localization"):
        return  # detectors take lists of images of any size and resize them themselves
    try:  # shapes only, on the meta device: AlexNet's last pooling has nothing left below 63 px
        with torch.no_grad():
            model.eval()(torch.empty((2, 3, cfg.image_size, cfg.image_size), device="meta"))
    except RuntimeError as e:
        if "too small" in str(e) or "greater than" in str(e):
            raise ValueError(f"--image-size {cfg.image_size} is too small for {cfg.arch}: {str(e).splitlines()[0]}; "
                             "give a larger --image-size") from None
    except Exception:  # noqa: BLE001 -- an op without a meta kernel: the worker finds out for real
        pass


def prepare(cfg: TrainConfig, *, restart: bool = False) -> tuple[TrainConfig, str, dict, dict]:
    """What a fit does on the driver before training: the config completed from the data, the run directory
    checked and recorded (``RunMismatch``, a bad ``--init-from`` or ``--distill-from``: one line before
    anything of the run is touched), the lazy datasets (``train_<epoch>`` for each epoch, ``val``) and each worker's resources.
    Returns ``(cfg, out, datasets, resources)``."""
    from pipelines.data import load_split, quiet_execution, read_shards, shard_items, split_shards
    from pipelines.data.ingest import shards_per_read_task
    from pipelines.train import init_weights, run_record
    from pipelines.train.checkpoint import checkpoint_candidates
    from pipelines.train.defenses import check_teacher

    cfg = resolve_config(cfg)
    task = get_task(cfg.task)
    _check_builds(cfg, task)
    shards, manifest, fs = split_shards(cfg.data, "train", max_images=cfg.limit_train_images)
    per_task = shards_per_read_task(manifest, len(shards))
    shards = shard_items(shards) if shards else shards  # made once, read in each epoch's order
    val_ds, _ = load_split(cfg.data, "val", num_cpus=cfg.augment_cpus)
    # Lazy datasets: an epoch's augmentation runs only when that epoch iterates its shard. Each epoch reads
    # the shards in its own order (read fused into the augmentation: same num_cpus).
    datasets = {f"train_{e}": task.view(read_shards(shards, fs, num_cpus=cfg.augment_cpus, shards_per_task=per_task,
                                                    shuffle_seed=shuffle_seed(cfg, e)), cfg, train=True, epoch=e)
                for e in range(cfg.epochs)}
    datasets["val"] = task.view(val_ds, cfg, train=False, epoch=0)
    for ds in datasets.values():
        quiet_execution(ds)  # the training's own progress line says how far it is
    if cfg.workers == 1:
        # Blocks reach the seeded local shuffle in the seeded shard order, not in whichever augmentation
        # task finishes first, and batches leave the iterator's format threads in order: a fast reader (a
        # small epoch read whole) otherwise got another order of images or of batches in some runs, so two
        # fits of one seed differed (docs/training.md). No cost measured. (``fit`` hands these options to
        # Ray Train: ``ingest_config``.)
        for ds in datasets.values():
            ds.context.execution_options.preserve_order = True
    cfg = absolute_paths(cfg)
    out = cfg.out
    # Starting weights (--init-from, --pretrained) apply to a fresh run only.
    fresh = restart or not checkpoint_candidates(out)
    init = init_weights.check(cfg) if fresh else None
    check_teacher(cfg)
    if restart:
        run_record.check_restart_keeps(out, {"--init-from": cfg.init_from, "--distill-from": cfg.distill_from})
    run_record.start(out, cfg, restart=restart, init=init)  # RunMismatch before anything of the run is touched
    storage.RunDir(out).remove(DIVERGED)
    storage.RunDir(out).remove(PHASES)  # a stale one (an earlier fit) is never read as this one's
    storage.write_json(out, "config.json", cfg.model_dump(mode="json"))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker > 0 else {})}
    return cfg, out, datasets, resources


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local paths (``out``, ``init_from``, ``distill_from``) made absolute here: the workers
    run in their own working directory (Ray Train's run folder), where a relative --out would land and a
    relative --init-from or --distill-from would not be found. URIs stay as they are."""
    update = {k: os.path.abspath(v) for k in ("out", "init_from", "distill_from")
              if (v := getattr(cfg, k)) and "://" not in v}
    return cfg.model_copy(update=update)


def console_logging():
    """Ray Train's logging of a run: its own INFO lines (the controller's state transitions and requests,
    every epoch's "Checkpoint successfully created" and "Reporting training result") stay in its log files
    and off the console, where they came between the trainings' progress lines; warnings and errors (a
    worker lost, a restart) still show."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING")


def fit(cfg: TrainConfig, *, restart: bool = False) -> dict:
    """Train ``cfg`` on Ray Train; rerunning the same config on the same ``out`` resumes from its last
    checkpoint (``--epochs``, ``--lr`` and the other optimisation settings may change; the data and the model
    may not: ``pipelines/train/run_record.py``). ``restart`` deletes the run's checkpoints and metrics first.
    Returns {"run_dir", "checkpoint", "metrics": last epoch's record, "epochs_run"}.
    Raises ValueError for bad input (data directory, architecture; ``RunMismatch`` for a run directory of other
    data or another model), ``TrainingDiverged`` at a non-finite loss and RuntimeError if training fails."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train import watch

    cfg, out, datasets, resources = prepare(cfg, restart=restart)
    # One worker has nothing to split: it iterates each dataset itself (``Dataset.iterator()``, as a lane
    # does), with no split coordinator process per epoch. Several workers split each epoch's training view
    # themselves (``_split``) and get ``val`` split by Ray Train.
    single = cfg.workers == 1
    epochs = {} if single else {k: v for k, v in datasets.items() if k.startswith("train_")}
    datasets = {k: v for k, v in datasets.items() if k not in epochs}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "epochs": epochs,
                           "rows": watch.expected_split_rows(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu="GPU" in resources,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.placement.upper(),
                                     elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=out, logging_config=console_logging(),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)),
        datasets=datasets,
        dataset_config=ingest_config(datasets, split=not single),
    )
    _warm_data_worker()
    started, started_at = time.perf_counter(), time.time()
    with _own_sigint_handler():
        result = trainer.fit()
    ended_at = time.time()
    if result.error is not None:
        raise RuntimeError(f"training {cfg.arch} failed: {result.error}") from result.error
    diverged = storage.read_json(out, DIVERGED)
    if diverged is not None:
        raise TrainingDiverged(diverged["message"])
    records = storage.read_metrics(out)
    return {"run_dir": out, "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": records[-1] if records else {}, "epochs_run": len(records),
            "seconds": time.perf_counter() - started, "phases": _phases(out, started_at, ended_at)}


def ingest_config(datasets: dict, *, split: bool):
    """Ray Train's ``DataConfig`` for a fit's ``datasets``: split across the workers or not, each iterated
    with its own execution options. Ray Train otherwise replaces them with options made from the driver's
    ``DataContext``, and a one-worker fit lost ``preserve_order`` (``prepare``): its iterator's format
    threads then handed batches over in the order they finished, so two fits of one seed trained on the
    same batches in another order in some runs (docs/training.md)."""
    import copy

    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all" if split else [],
                      execution_options={name: copy.deepcopy(ds.context.execution_options)
                                         for name, ds in datasets.items()})


def _import_augmentation() -> None:
    """Import what a training view's map tasks run (torch, torchvision, the view code)."""
    import pipelines.data.views  # noqa: F401
    import vision.transforms  # noqa: F401


def _warm_data_worker() -> None:
    """On a local cluster this process started: one task that imports the augmentation's modules (2-3 s of
    CPU in a new process), submitted as Ray Train starts, in the runtime environment Ray Train gives its
    workers. Ray reuses an idle process only for the same runtime environment, so the first map task of the
    training's data pipeline then runs in this warm process instead of starting and importing in a new one
    (the data pipeline's start about 1 s against 4-5 s on 2 cores; docs/training.md). One task: on 2
    cores a second competes with the controller's own imports. Nothing on a cluster this process joined
    (its map tasks may run on any node)."""
    import ray

    from pipelines import ray_private
    from pipelines.ray_runtime import local_cluster_env

    env = local_cluster_env()
    if env is None:
        return
    warm = ray.remote(num_cpus=0)(_import_augmentation)
    warm.options(runtime_env={"env_vars": ray_private.train_worker_env_vars(env)}).remote()  # not waited for


def _phases(out: str, started_at: float, ended_at: float) -> dict | None:
    """Where a fit's wall time went: Ray Train's start (controller, worker group) up to the training loop,
    the data pipeline's start up to the first batch, the steps and validation passes, and the rest (the
    last epoch's checkpoint and report, worker group and controller shutdown). None when the loop did not
    run (nothing to train) or it ran on a clock that is not this one's (another node)."""
    p = storage.read_json(out, PHASES)
    if p is None or not started_at <= p["loop_started_at"] <= p["loop_ended_at"] <= ended_at + 1:
        return None
    wall = ended_at - started_at
    parts = {"train_start_s": p["loop_started_at"] - started_at, "data_start_s": p["first_batch_at"] - p["loop_started_at"],
             "steps_s": p["steps_s"], "val_s": p["val_s"]}
    parts["other_s"] = wall - sum(parts.values())
    return {"wall_s": wall, **{k: round(v, 2) for k, v in parts.items()}, "data_in_memory": p.get("data_in_memory"),
            "val_in_memory": p.get("val_in_memory")}
