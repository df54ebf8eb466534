"""Loading a served model (checkpoint or explicit random weights) and running its candidates.

Checkpoints load through ``pipelines.train.load_checkpoint`` (run directory, checkpoint directory or
``.pt``, on a local path or a storage URI such as ``s3://``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipelines.serve.config import ModelSpec
from vision.structures import Detections

DEFAULT_IMAGE_SIZE = {"detection": 320, "segmentation": 320, "classification": 64}


@dataclass
class ServedModel:
    """A model ready for inference and what serving needs to know about it."""

    name: str
    task: str
    arch: str
    num_classes: int
    image_size: int
    categories: list[dict] = field(default_factory=list)
    source: str = ""

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "arch": self.arch, "num_classes": self.num_classes,
                "image_size": self.image_size, "source": self.source,
                "categories": [{"id": c["id"], "name": c["name"], "label": c["label"]} for c in self.categories]}


def default_categories(num_classes: int) -> list[dict]:
    return [{"id": i, "name": f"class_{i}", "label": i} for i in range(1, num_classes + 1)]


def _random_model(spec: ModelSpec) -> torch.nn.Module:
    from vision.models import create_model, list_models, model_task

    if spec.arch not in list_models():
        raise ValueError(f"model {spec.name!r}: unknown arch {spec.arch!r}; expected one of "
                         f"{list_models(spec.task)} (visionflow models)")
    if model_task(spec.arch) != spec.task:
        raise ValueError(f"model {spec.name!r}: arch {spec.arch!r} is a {model_task(spec.arch)} model, "
                         f"not {spec.task}")
    return create_model(spec.arch, spec.num_classes)


def load_served_model(spec: ModelSpec) -> tuple[torch.nn.Module, ServedModel]:
    """Build the model of ``spec`` in eval mode. Returns ``(model, ServedModel)``.

    Raises ``ValueError`` when the spec has neither a checkpoint nor ``random_weights``.
    """
    if spec.checkpoint:
        from pipelines.train import load_checkpoint

        model, cfg = load_checkpoint(spec.checkpoint)  # local path or storage URI
        task = cfg.get("task") or spec.task
        if task == "localization":
            raise ValueError(f"model {spec.name!r}: localization checkpoints are not served "
                             f"(expected detection, segmentation or classification)")
        if spec.task and task != spec.task:
            raise ValueError(f"model {spec.name!r}: config says task {spec.task!r} but the checkpoint holds {task!r}")
        num_classes = int(cfg.get("num_classes") or spec.num_classes)
        info = ServedModel(spec.name, task, cfg.get("arch", "?"), num_classes,
                           int(spec.image_size or cfg.get("image_size") or DEFAULT_IMAGE_SIZE[task]),
                           list(cfg.get("categories") or default_categories(num_classes)), spec.checkpoint)
    elif spec.random_weights:
        model = _random_model(spec)
        info = ServedModel(spec.name, spec.task, spec.arch, spec.num_classes,
                           int(spec.image_size or DEFAULT_IMAGE_SIZE[spec.task]),
                           default_categories(spec.num_classes), "random-weights")
    else:
        raise ValueError(f"model {spec.name!r} has no checkpoint: pass `visionflow serve --checkpoint RUN_DIR` "
                         f"(a run directory, checkpoint directory or .pt file) or set `checkpoint:` in the config; "
                         f"`--random-weights` serves untrained weights (tests only)")
    if info.task != "classification" and not hasattr(model, "candidates"):
        raise TypeError(f"model {spec.name!r} ({info.arch}) has no candidates() method; "
                        f"the NMS stage needs the detector's outputs before NMS")
    return model.eval(), info


@torch.inference_mode()
def run_candidates(model: torch.nn.Module, images: list[torch.Tensor]) -> list[Detections]:
    """Pre-NMS :class:`Detections` of each image on the CPU: boxes (N,4 xyxy in input pixels), scores,
    labels (1..K) and, for instance segmentation, whole-image mask probabilities."""
    return [o.to("cpu") for o in model.candidates(images)]


@torch.inference_mode()
def run_classifier(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``N x K`` of a batch of equal-size images."""
    out = model(images)
    if isinstance(out, (tuple, list)):  # GoogLeNet-style auxiliary outputs
        out = out[0]
    return out.float().softmax(dim=1)
