"""Loading a served model (checkpoint or explicit random weights) and running its candidates.

Checkpoints load through ``pipelines.train.load_checkpoint`` (run directory, checkpoint directory or
``.pt``, on a local path or a storage URI such as ``s3://``). The pydantic models at the end describe the
HTTP answers for the OpenAPI schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

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


# -- The HTTP answers' schemas -------------------------------------------------------------------------
# What /openapi.json (and /docs) show. The Ingress still builds each JSON itself; these describe it and
# never change it (the POST routes return a JSONResponse, which FastAPI passes through untouched).

class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageSize(_Schema):
    width: int = Field(..., description="of the image as sent")
    height: int


class RleMask(_Schema):
    size: list[int] = Field(..., min_length=2, max_length=2, description="[height, width] of the image as sent")
    counts: str = Field(..., description="COCO's compressed RLE string (column-major runs, starting with zeros)")


class DetectionItem(_Schema):
    box: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels of the image "
                                                                           "as sent, clipped to it")
    score: float = Field(..., ge=0, le=1)
    category_id: int = Field(..., description="the original (COCO) category id")
    label: str = Field(..., description="the category's name")
    mask: Optional[RleMask] = Field(None, description="/v1/segment only")


class DetectAnswer(_Schema):
    """``POST /v1/detect`` and ``/v1/segment``: detections, best score first."""

    model: str
    task: Literal["detection", "segmentation"]
    image: ImageSize
    detections: list[DetectionItem]


class Prediction(_Schema):
    score: float = Field(..., ge=0, le=1)
    category_id: int
    label: str


class ClassifyAnswer(_Schema):
    """``POST /v1/classify``: the top-k classes, best first."""

    model: str
    task: Literal["classification"]
    image: ImageSize
    predictions: list[Prediction]


class CategoryInfo(_Schema):
    id: int
    name: str
    label: int = Field(..., description="the model's class index (1..num_classes)")


class ModelInfo(_Schema):
    name: str
    task: Literal["detection", "segmentation", "classification"]
    arch: str
    num_classes: int
    image_size: int
    source: str = Field(..., description="checkpoint path or URI, or 'random-weights'")
    categories: list[CategoryInfo]
    # What the model's replica reports about itself (detector.py).
    device: str = Field(..., description="where the replica runs the model: cpu, cuda:0, ...")
    torch_threads: int
    max_batch_size: int = Field(..., description="of its dynamic batching, as configured")
    batch_size_cap: int = Field(..., description="the batch size it runs at most: max_batch_size, or less where "
                                "the replica's calibration at start found smaller batches faster per image (as "
                                "reported by one replica: each replica calibrates on its own)")
    batch_rates: dict[str, float] = Field(..., description="images/s by batch size measured by that calibration "
                                          "(empty without it)")


class ModelsAnswer(_Schema):
    models: list[ModelInfo]


class HealthAnswer(_Schema):
    status: Literal["ok"]
    models: list[str]


class ErrorDetail(_Schema):
    code: str = Field(..., description="e.g. not_an_image, too_large, unsupported_media_type, invalid_parameter")
    message: str = Field(..., description="what was wrong, in words")


class ErrorAnswer(_Schema):
    """Every refusal of the API (see docs/contracts.md#http)."""

    error: ErrorDetail
