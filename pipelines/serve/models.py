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
