"""What every detector shares: input checks, the candidates-then-NMS eval path, and the
wrapper that gives torchvision's detectors that face.

Contract (docs/architecture.md): ``forward(list[CHW], targets)`` returns a dict of losses in training
and a list of ``{"boxes", "scores", "labels"[, "masks"]}`` in eval (labels 1..K, boxes in the pixels of
the image as given); ``candidates(list[CHW]) -> list[Detections]`` are the same outputs before NMS.
The eval output is defined as ``postprocess(candidates)``, so running NMS as its own stage gives
exactly what the model would have returned.
"""
from __future__ import annotations

import functools
import threading
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from vision.structures import Detections


def inference(candidates):
    """A detector's ``candidates`` under no_grad and in eval mode, each submodule's own mode put back after:
    called on a model in training mode (a training's evaluation, a benchmark, a serving replica call it
    directly) batch norm normalised with the batch's statistics and updated its running ones."""
    @functools.wraps(candidates)
    def wrapped(self, images):
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                return candidates(self, images)
        finally:
            for m, training in modes:
                m.training = training

    return wrapped


def check_images(images: Sequence[Tensor]) -> list[Tensor]:
    """Images as a list of float CHW tensors with 3 channels; a clear error otherwise."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a list of CHW tensors or an NCHW batch, got shape {tuple(images.shape)}")
        images = list(images)
    images = list(images)
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i} must be a float tensor of shape (3, H, W) in [0, 1], got {shape}")
        if not img.is_floating_point():
            raise TypeError(f"image {i} must be float in [0, 1], got {img.dtype}")
    return images


def check_targets(targets, n: int, masks: bool = False) -> None:
    """Training targets: one dict per image with ``boxes`` (M, 4) and ``labels`` (M,) in 1..K."""
    if targets is None or len(targets) != n:
        raise ValueError(f"training needs one target dict per image ({n}), got "
                         f"{'none' if targets is None else len(targets)}")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"target {i} needs 'boxes' and 'labels', got keys {sorted(t)}")
        if t["boxes"].dim() != 2 or t["boxes"].shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be (M, 4) xyxy, got {tuple(t['boxes'].shape)}")
        if masks and "masks" not in t:
            raise ValueError(f"target {i} needs 'masks' (M, H, W) for an instance-segmentation model")


class CandidateDetector(nn.Module):
    """Base for detectors: subclasses implement ``compute_losses`` and ``candidates``.

    ``nms_thresh`` and ``detections_per_img`` drive the eval path ``postprocess(candidates(images))``.
    """

    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def compute_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        raise NotImplementedError

    def candidates(self, images: Sequence[Tensor]) -> list[Detections]:
        raise NotImplementedError

    def postprocess(self, candidates: Sequence[Detections]) -> list[dict[str, Tensor]]:
        """Per-class NMS and the best ``detections_per_img``: candidates -> eval output dicts."""
        return [c.postprocess(self.nms_thresh, 0.0, self.detections_per_img).to_dict() for c in candidates]

    def forward(self, images, targets=None):
        images = check_images(images)
        if self.training:
            check_targets(targets, len(images), masks=getattr(self, "has_masks", False))
            return self.compute_losses(images, targets)
        return self.postprocess(self.candidates(images))


class TorchvisionDetector(CandidateDetector):
    """A torchvision detector (Faster/Mask R-CNN, RetinaNet, SSD) with ``candidates``.

    Candidates come from the detector's own postprocessing with NMS switched off (threshold 1.0:
    "suppress if IoU > 1" never fires) and at most ``candidates_per_img`` kept by score; boxes and masks
    are then mapped back to the original image sizes by torchvision's transform.

    A model with masks keeps its own NMS (at its ``nms_thresh``) before the cap: each candidate's mask is
    pasted at the image's size, so the cap is small (100), and capping before NMS kept the top 100 of
    several hundred duplicates of the best objects and dropped the rest (fewer detections than torchvision's,
    lower recall). NMS at the same threshold keeps every one of them again, so ``postprocess`` still equals
    torchvision's own output; a request can make NMS stricter, not looser.
    """

    def __init__(self, net: nn.Module, *, candidates_per_img: int = 1000):
        super().__init__()
        self.net = net
        self.candidates_per_img = int(candidates_per_img)
        self._heads = net.roi_heads if hasattr(net, "roi_heads") else net
        self.has_masks = getattr(self._heads, "has_mask", lambda: False)()
        self.nms_thresh = float(self._heads.nms_thresh)
        self.detections_per_img = int(self._heads.detections_per_img)
        self._lock = threading.Lock()  # the NMS switch below is per call

    def compute_losses(self, images, targets):
        return self.net(images, targets)

    @torch.no_grad()
    def candidates(self, images: Sequence[Tensor]) -> list[Detections]:
        """Detections before NMS, per image, best first, in the pixels of each image as given."""
        images = check_images(images)
        heads = self._heads
        with self._lock:
            saved = heads.nms_thresh, heads.detections_per_img
            heads.nms_thresh = saved[0] if self.has_masks else 1.0
            heads.detections_per_img = self.candidates_per_img
            was_training = self.net.training
            self.net.eval()
            try:
                outs = self.net(images)
            finally:
                heads.nms_thresh, heads.detections_per_img = saved
                self.net.train(was_training)
        # RetinaNet scores the background column too (labels 0..K); the contract's labels are 1..K.
        return [d[d.labels > 0] if len(d) and bool((d.labels == 0).any()) else d
                for d in (Detections.from_dict(o) for o in outs)]
