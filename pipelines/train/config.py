"""The trainer's one config schema: what `visionflow train` flags, the DAG's YAML and a checkpoint's
``config`` all hold. Unknown fields are an error that names them."""
from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TASKS = ("classification", "localization", "detection", "segmentation")


class Chaos(BaseModel):
    """Fault injection for tests, on the rank-``rank`` worker: with ``kill_at_epoch`` it kills its own process
    with SIGKILL at the start of that epoch, once (the ``marker`` file records that it happened); with
    ``nan_loss_at_step`` its loss becomes NaN at that step of the run (counted from 0 over the epochs)."""

    model_config = ConfigDict(extra="forbid")
    kill_at_epoch: Optional[int] = Field(None, ge=0)
    marker: Optional[str] = None
    rank: int = Field(0, ge=0)
    nan_loss_at_step: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _marker_with_kill(self):
        if self.kill_at_epoch is not None and not self.marker:
            raise ValueError("chaos.kill_at_epoch needs chaos.marker (the file that records the kill)")
        return self


class TrainConfig(BaseModel):
    """One training run. ``data`` is a data directory (``DIR/train``, ``DIR/val`` from `visionflow ingest`),
    ``out`` the run directory (local path or ``s3://...``): checkpoints, ``metrics.jsonl``, ``config.json``."""

    # No inf or NaN in any float setting: --lr inf trained to NaN, --cpus-per-worker inf overflowed in Ray.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # what
    task: Optional[Literal["classification", "localization", "detection", "segmentation"]] = Field(
        None, description="what to train; None: the architecture's task in the registry")
    arch: str = Field(description="registered model name (visionflow models)")
    model_kwargs: dict = Field(default_factory=dict, description='extra builder arguments as JSON, e.g. {"backbone": "resnet34"}')
    num_classes: Optional[int] = Field(None, ge=1, description="None: the categories of the data's manifest")
    # starting weights (a fresh run only; a resume continues from its own checkpoint)
    init_from: Optional[str] = Field(None, description="start from these weights: a visionflow checkpoint (run dir, "
                                     "checkpoint dir, .pt) or a torchvision state dict file; tensors load by name "
                                     "and shape, the rest (e.g. a head of another class count) stays initialised")
    pretrained: bool = Field(False, description="start from torchvision's published weights for the architecture "
                             "(downloaded: needs the internet; offline, use --init-from)")
    categories: list[dict] = Field(default_factory=list)  # filled from the manifest
    # where
    data: str = Field(description="data directory with train/ and val/ from visionflow ingest")
    limit_train_images: Optional[int] = Field(None, ge=1, description="train on the train split's first N images "
                                        "only (the same ones every epoch and run); None: all of them")
    shuffle_buffer: int = Field(256, ge=0, description="each epoch reads the train split's shards in a new order "
                                "and each worker draws its batches at random from a buffer of this many rows "
                                "(Ray Data's local shuffle; the order seeded by seed and epoch, the buffer "
                                "also by rank); 0: the split's order every epoch")
    out: str = Field(description="run directory (local or s3://): checkpoints, metrics.jsonl, config.json")
    # resources
    workers: Union[int, Tuple[int, int]] = Field(1, description="Ray Train workers: N, or MIN-MAX for an elastic "
                                              "group that runs with what the cluster has (e.g. 1-2)")
    placement: Literal["pack", "spread"] = Field("pack", description="pack the workers onto few nodes, or spread "
                                                  "them over nodes (best effort)")
    elastic_resize_interval_s: float = Field(60.0, gt=0, description="elastic workers: seconds between checks "
                                                    "for room to grow the group")
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    augment_cpus: float = Field(0.5, gt=0, description="Ray Data CPUs per augmentation task")
    in_memory_mib: float = Field(256.0, ge=0, description="a worker whose part of an epoch's view is estimated "
                                 "at most this many MiB reads it whole before the epoch's steps (the "
                                 "augmentation then does not share the CPU with them; from the run's second "
                                 "epoch) and keeps its val part for every epoch; 0: always stream")
    # optimisation
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=2, description="per worker, at least 2 (batch norm in training mode needs two "
                            "samples); the global batch is workers x batch size")
    image_size: int = Field(64, ge=8)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Optional[float] = Field(None, gt=0, description="base learning rate; None: 0.05 for SGD, 1e-3 for AdamW")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(30, ge=1, description="epochs between decays of the step schedule")
    gamma: float = Field(0.1, gt=0, le=1)
    bn_momentum: Optional[float] = Field(None, gt=0, le=1, description="momentum of every batch norm's running "
                                         "statistics (None: the architecture's own, 0.1 in torch, 0.03 in "
                                         "SSDlite); larger values let a short run's statistics follow its "
                                         "weights (docs/training.md)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    aux_weight: float = Field(0.3, ge=0, description="weight of GoogLeNet's auxiliary classifier losses")
    amp: bool = Field(True, description="mixed precision (only where a GPU runs the step)")
    seed: int = 0
    # adversarial defenses (classification; pipelines/train/defenses.py)
    adversarial: Literal["none", "fgsm", "pgd"] = Field("none", description="adversarial training attack")
    adv_eps: float = Field(8 / 255, ge=0, le=1, description="adversarial training epsilon (L-infinity, pixels in [0, 1])")
    adv_ratio: float = Field(0.5, ge=0, le=1, description="share of each batch replaced by adversarial images")
    adv_steps: int = Field(7, ge=1, description="PGD steps of adversarial training")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the training loss (distillation)")
    distill_from: Optional[str] = Field(None, description="teacher checkpoint: train on its soft labels at --temperature")
    # robustness and bookkeeping
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1: unlimited")
    checkpoints_to_keep: int = Field(2, ge=1)
    save_optimizer: bool = Field(True, description="checkpoints keep the optimizer's state (AdamW: twice the "
                                 "weights' bytes), so that a resumed run continues it exactly; "
                                 "--no-save-optimizer: the weights only, and a run resumed from them starts "
                                 "its optimizer afresh")
    chaos: Optional[Chaos] = None

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """``2``, ``"2"``, ``"1-2"``, ``[1, 2]`` -> 2 or (1, 2); MIN-MAX is an elastic group."""
        if isinstance(v, str):
            lo, sep, hi = v.strip().partition("-")
            try:
                v = (int(lo), int(hi)) if sep else int(lo)
            except ValueError:
                raise ValueError(f"workers must be N or MIN-MAX (e.g. 2 or 1-2), got {v!r}") from None
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"workers must be N or MIN-MAX (e.g. 2 or 1-2), got {v!r}")
            lo, hi = (int(x) for x in v)
            if not 1 <= lo <= hi:
                raise ValueError(f"workers MIN-MAX needs 1 <= MIN <= MAX, got {lo}-{hi}")
            return (lo, hi) if lo != hi else lo
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"workers must be at least 1, got {v}")
        return v

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        """The most workers the run holds at once (what a lane needs room for)."""
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @model_validator(mode="after")
    def _resolve(self):
        from vision.models import get_entry

        entry = get_entry(self.arch)  # KeyError naming the known models
        if self.task is None:
            self.task = entry.task
        if self.task in ("detection", "segmentation") and entry.task != self.task:
            raise ValueError(f"arch {self.arch!r} is a {entry.task} model; task {self.task!r} needs one of "
                             f"its own (visionflow models)")
        if self.task in ("classification",) and entry.task != "classification":
            raise ValueError(f"arch {self.arch!r} is a {entry.task} model; classification needs a classifier")
        if self.init_from and self.pretrained:
            raise ValueError("init_from and pretrained both choose the starting weights; pass one of them")
        if self.task != "classification" and (self.adversarial != "none" or self.distill_from or self.temperature != 1):
            raise ValueError("adversarial training and distillation (adversarial, distill_from, temperature) "
                             f"are classification options; task is {self.task!r}")
        if self.task == "localization" and entry.task not in ("localization", "classification"):
            raise ValueError(f"arch {self.arch!r} is a {entry.task} model; localization takes a localizer "
                             "or a classifier as backbone")
        return self

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.optimizer == "sgd" else 1e-3)

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate during ``epoch`` (0-based): linear warmup, then the schedule."""
        import math

        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        e, span = epoch - self.warmup_epochs, max(1, self.epochs - self.warmup_epochs)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * e / span))
        if self.schedule == "step":
            return self.gamma ** (e // self.step_size)
        return 1.0
