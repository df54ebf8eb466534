"""Loading a served model (checkpoint or explicit random weights) and running its candidates.

Checkpoints load through ``pipelines.train.load_checkpoint`` (run directory, checkpoint directory or
``.pt``); a storage URI is first copied to a local directory with pyarrow's filesystems.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.serve.config import ModelSpec

# Used only when an architecture is not in the registry (yet): torchvision's builders, weights=None.
_TORCHVISION_DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": "detection",
    "fasterrcnn_mobilenet_v3_large_fpn": "detection",
    "fasterrcnn_resnet50_fpn": "detection",
    "maskrcnn_resnet50_fpn": "segmentation",
}
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


def local_checkpoint(uri: str) -> str:
    """A local path for ``uri``: itself when local, else a copy of the remote file or directory."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; expected a run directory, "
                                    f"a checkpoint directory or a .pt file")
        return path
    import pyarrow.fs as pafs

    fs, remote = pafs.FileSystem.from_uri(uri)
    dest = Path(tempfile.mkdtemp(prefix="visionflow-ckpt-"))
    info = fs.get_file_info(remote)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"checkpoint {uri} does not exist")
    if info.type == pafs.FileType.File:
        target = dest / Path(remote).name
        pafs.copy_files(remote, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return str(target)
    pafs.copy_files(remote, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(dest)


def default_categories(num_classes: int) -> list[dict]:
    return [{"id": i, "name": f"class_{i}", "label": i} for i in range(1, num_classes + 1)]


def _random_model(spec: ModelSpec) -> torch.nn.Module:
    from vision.models import create_model, list_models

    if spec.arch in list_models():
        return create_model(spec.arch, spec.num_classes)
    if spec.arch in _TORCHVISION_DETECTORS:
        import torchvision.models.detection as tvdet

        size = spec.image_size or DEFAULT_IMAGE_SIZE[spec.task]
        model = getattr(tvdet, spec.arch)(weights=None, weights_backbone=None, num_classes=spec.num_classes + 1,
                                          min_size=size, max_size=size)
        model.visionflow_name, model.visionflow_task = spec.arch, _TORCHVISION_DETECTORS[spec.arch]
        return model
    raise ValueError(f"model {spec.name!r}: unknown arch {spec.arch!r}; expected a registered model "
                     f"(visionflow models) or one of {sorted(_TORCHVISION_DETECTORS)}")


def load_served_model(spec: ModelSpec) -> tuple[torch.nn.Module, ServedModel]:
    """Build the model of ``spec`` in eval mode. Returns ``(model, ServedModel)``.

    Raises ``ValueError`` when the spec has neither a checkpoint nor ``random_weights``.
    """
    if spec.checkpoint:
        from pipelines.train import load_checkpoint

        model, cfg = load_checkpoint(local_checkpoint(spec.checkpoint))
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
        _disable_builtin_nms(model)
    return model.eval(), info


def _disable_builtin_nms(model: torch.nn.Module) -> None:
    """A torchvision detector without ``candidates``: make its forward return the pre-NMS boxes."""
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        raise TypeError(f"{type(model).__name__} has no candidates() method; the NMS stage needs pre-NMS outputs")
    heads.nms_thresh = 1.0  # IoU never exceeds 1: nothing is suppressed, NMS moves to its own stage
    heads.detections_per_img = 1000


def _fields(d) -> dict:
    """``Detections`` (or a torchvision output dict) as plain CPU tensors: the wire format between stages."""
    get = (lambda k: d.get(k)) if isinstance(d, dict) else (lambda k: getattr(d, k, None))
    out = {k: get(k).detach().cpu() for k in ("boxes", "scores", "labels")}
    masks = get("masks")
    if masks is not None:
        out["masks"] = masks.detach().cpu()
    return out


@torch.inference_mode()
def run_candidates(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """Pre-NMS detections of each image: dicts of ``boxes`` (N,4 xyxy in input pixels), ``scores``,
    ``labels`` (1..K) and, for instance segmentation, ``masks``."""
    if hasattr(model, "candidates"):
        outs = model.candidates(images)
    else:
        outs = model(images)
    return [_fields(o) for o in outs]


@torch.inference_mode()
def run_classifier(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``N x K`` of a batch of equal-size images."""
    out = model(images)
    if isinstance(out, (tuple, list)):  # GoogLeNet-style auxiliary outputs
        out = out[0]
    return out.float().softmax(dim=1)
