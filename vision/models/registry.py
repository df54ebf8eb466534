"""One registry for every architecture (after timm's `_registry.py`).

A builder is registered with its task; a Ray worker needs only a name and a dict to
rebuild any model: ``create_model(name, num_classes, **kw)``. Segmentation models also say which kind
they are (``ModelEntry.segmentation``): ``"instance"`` (per-object masks, scored by COCO mask AP) or
``"semantic"`` (a class per pixel, scored by mIoU). ``ModelEntry.weights`` names torchvision's published
weights for the architecture (a torchvision model name, or a function of the model's keywords returning
``(state dict, description)``), None when there are none: what ``--pretrained`` starts from
(``vision.models.weights``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

TASKS = ("classification", "localization", "detection", "segmentation")
SEGMENTATION_KINDS = ("instance", "semantic")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str
    builder: Callable[..., nn.Module]
    description: str = ""
    defaults: dict = field(default_factory=dict)
    segmentation: str | None = None  # task "segmentation" only: one of SEGMENTATION_KINDS
    weights: str | Callable[..., tuple] | None = None  # published weights: torchvision model name or function


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str | None = None, *, task: str, description: str = "", segmentation: str | None = None,
                   weights: str | Callable[..., tuple] | None = None, **defaults):
    """Decorator: ``@register_model("resnet18", task="classification")`` over a builder
    ``fn(num_classes, **kw) -> nn.Module``; segmentation models add ``segmentation="instance"`` or
    ``"semantic"``; ``weights`` names torchvision's published weights for it (``weights="resnet18"``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if (task == "segmentation") != (segmentation is not None) or segmentation not in (None, *SEGMENTATION_KINDS):
        raise ValueError(f"segmentation={segmentation!r} with task {task!r}: segmentation models take one of "
                         f"{SEGMENTATION_KINDS}, other tasks none")

    def wrap(fn):
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0:1]
        _REGISTRY[key] = ModelEntry(key, task, fn, doc if isinstance(doc, str) else "".join(doc), dict(defaults),
                                    segmentation, weights)
        return fn

    return wrap


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build a registered model. ``num_classes`` counts object classes (no background)."""
    entry = get_entry(name)
    model = entry.builder(num_classes=num_classes, **{**entry.defaults, **kw})
    model.visionflow_name = name  # so checkpoints and reports can name what they hold
    model.visionflow_task = entry.task
    return model


def list_models(task: str | None = None) -> list[str]:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def model_task(name: str) -> str:
    return get_entry(name).task
