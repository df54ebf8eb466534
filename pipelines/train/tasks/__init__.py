"""Task plug-ins of the trainer, one module per task, found by name (docs/architecture.md).

Each module exposes ``build_model(cfg)``, ``view(ds, cfg, *, train, epoch)``, ``collate(batch, device)``,
``train_step(model, batch, cfg) -> (loss, stats)`` and ``evaluate(model, batches, cfg) -> dict``; optionally
``FIND_UNUSED_PARAMETERS = True`` when some weights may get no gradient in a step (DDP must know).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from pipelines.train.config import TASKS

REQUIRED = ("build_model", "view", "collate", "train_step", "evaluate")


def get_task(name: str) -> ModuleType:
    """The plug-in module of task ``name``; ValueError for an unknown task or an incomplete module."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    try:
        module = importlib.import_module(f"pipelines.train.tasks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"pipelines.train.tasks.{name}":
            raise ValueError(f"task {name!r} has no trainer plug-in yet (pipelines/train/tasks/{name}.py)") from None
        raise
    missing = [f for f in REQUIRED if not hasattr(module, f)]
    if missing:
        raise ValueError(f"pipelines/train/tasks/{name}.py lacks {', '.join(missing)}")
    return module
