"""Model deployments with dynamic batching: a detector (pre-NMS candidates) and a classifier."""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque

import torch
from ray import serve

from pipelines.serve.config import ModelSpec
from pipelines.serve.models import load_served_model, run_candidates, run_classifier
from vision.structures import Detections


def _device() -> torch.device:
    # A replica given num_gpus sees its GPU; otherwise the CPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compact(d: Detections) -> Detections:
    # Mask probabilities in half precision: half the bytes between stages, same 0.5 threshold.
    return d if d.masks is None or not d.masks.is_floating_point() else \
        Detections(d.boxes, d.scores, d.labels, d.masks.half())


class _BatchedModel:
    """Loads the model of a ``ModelSpec`` and batches calls dynamically; a subclass gives ``_run(images)``."""

    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.device = _device()
        model, self.info = load_served_model(self.spec)
        self.model = model.to(self.device)
        # Batch settings come from the config, not from the decorator defaults.
        self.__call__.set_max_batch_size(self.spec.batching.max_batch_size)
        self.__call__.set_batch_wait_timeout_s(self.spec.batching.batch_wait_timeout_s)
        self.batch_sizes: deque[int] = deque(maxlen=1000)

    def describe(self) -> dict:
        return {**self.info.describe(), "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "max_batch_size": self.spec.batching.max_batch_size}

    def pid(self) -> int:
        """The replica's process id (tests read its memory from /proc, or kill it)."""
        return os.getpid()

    def recent_batch_sizes(self) -> list[int]:
        """Sizes of the last batches run (at most 1000): shows that dynamic batching happens."""
        return list(self.batch_sizes)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        self.batch_sizes.append(len(images))
        # In a thread: the replica keeps accepting requests (the next batch) while this one runs.
        return await asyncio.to_thread(self._run, images)

    def _run(self, images: list[torch.Tensor]) -> list[dict]:
        raise NotImplementedError


@serve.deployment
class Detector(_BatchedModel):
    """A detection or instance-segmentation model: ``__call__(uint8 3xhxw)`` -> ``{"dets": Detections,
    "ms", "batch"}``, the pre-NMS candidates in the pixels of the tensor given."""

    def _run(self, images: list[torch.Tensor]) -> list[dict]:
        t0 = time.perf_counter()
        batch = [im.to(self.device, non_blocking=True).float().div_(255) for im in images]
        outs = [_compact(o) for o in run_candidates(self.model, batch)]
        ms = (time.perf_counter() - t0) * 1e3
        return [{"dets": o, "ms": ms, "batch": len(images)} for o in outs]


@serve.deployment
class Classifier(_BatchedModel):
    """A registry classifier: ``__call__(uint8 3xSxS)`` -> ``{"probs": float K, "ms", "batch"}``."""

    def _run(self, images: list[torch.Tensor]) -> list[dict]:
        t0 = time.perf_counter()
        x = torch.stack(images).to(self.device).float().div_(255)
        probs = run_classifier(self.model, x).cpu()
        ms = (time.perf_counter() - t0) * 1e3
        return [{"probs": p, "ms": ms, "batch": len(images)} for p in probs]
