"""Model deployments with dynamic batching: a detector (with its NMS, in the NMS stage) and a classifier."""
from __future__ import annotations

import os
import time

import torch
from ray import serve

from pipelines.serve.batching import Batcher, best_batch_size
from pipelines.serve.config import ModelSpec
from pipelines.serve.errors import REPLICA_LOST, unavailable
from pipelines.serve.models import load_served_model, run_candidates, run_classifier
from vision.structures import Detections, as_tensor


def _device() -> torch.device:
    # A replica given num_gpus sees its GPU; otherwise the CPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compact(d: Detections) -> Detections:
    # Mask probabilities in half precision: half the bytes between stages, same 0.5 threshold.
    return d if d.masks is None or not d.masks.is_floating_point() else \
        Detections(d.boxes, d.scores, d.labels, d.masks.half())


class _BatchedModel:
    """Loads the model of a ``ModelSpec`` and batches calls dynamically (:class:`Batcher`); a subclass
    gives ``_run(items)`` and may give ``_finish(items, results)``."""

    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.device = _device()
        model, self.info = load_served_model(self.spec)
        self.model = model.to(self.device)
        finish = getattr(self, "_finish", None)
        batching = self.spec.batching
        self.batch_rates: dict[int, float] = {}
        cap = batching.max_batch_size
        if batching.calibrate and cap > 1:
            cap, self.batch_rates = best_batch_size(self._run, self._probe_items, cap)
            print(f"{self.info.name}: batches capped at {cap} of {batching.max_batch_size} on {self.device} (images/s "
                  f"by batch size: {', '.join(f'{b}: {r:.1f}' for b, r in self.batch_rates.items())})", flush=True)
        self.batcher = Batcher(self._run, cap, batching.batch_wait_timeout_s, finish=finish)

    def describe(self) -> dict:
        return {**self.info.describe(), "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "max_batch_size": self.spec.batching.max_batch_size, "batch_size_cap": self.batcher.max_batch_size,
                "batch_rates": {str(b): round(r, 2) for b, r in self.batch_rates.items()}}

    def _probe_items(self, n: int) -> list:
        """``n`` items like a request's, for the calibration: mid-grey square images of the served size."""
        side = self.info.image_size
        return [self._probe_item(torch.full((3, side, side), 128, dtype=torch.uint8)) for _ in range(n)]

    def _probe_item(self, image: torch.Tensor):
        return image

    def pid(self) -> int:
        """The replica's process id (tests read its memory from /proc, or kill it)."""
        return os.getpid()

    def recent_batch_sizes(self) -> list[int]:
        """Sizes of the last batches run (at most 1000): shows that dynamic batching happens."""
        return list(self.batcher.sizes)

    def _run(self, items: list) -> list[dict]:
        raise NotImplementedError


@serve.deployment
class Detector(_BatchedModel):
    """A detection or instance-segmentation model and its NMS: ``__call__(uint8 3xhxw array or tensor,
    {"iou_threshold", "score_threshold", "max_detections"})`` -> ``{"dets": kept Detections, best first, in
    the pixels of the image given, "ms": the model's, "nms_ms": the NMS stage's, "batch"}``.

    A batch's candidates go to the NMS stage (its own deployment: the GPU stage on a cluster) in one call;
    masks stay here, and only the kept ones leave with the answer. When that stage's replica dies during the
    call, each request of the batch gets a 503 ``ApiError`` naming the NMS stage (returned, not raised: the
    Ingress would otherwise name this deployment); ``nms_retry_after_s`` is its Retry-After."""

    def __init__(self, spec: dict, nms, nms_retry_after_s: float = 1.0):
        self.nms, self.nms_retry_after_s = nms, nms_retry_after_s
        super().__init__(spec)

    def _probe_item(self, image: torch.Tensor):
        return image, {}

    async def __call__(self, image, nms: dict) -> dict:
        # Batched with the requests that queue meanwhile; run in a thread, so the replica keeps accepting.
        return await self.batcher((image, nms))

    def _run(self, items: list) -> list[dict]:
        t0 = time.perf_counter()
        batch = [as_tensor(im).to(self.device, non_blocking=True).float().div_(255) for im, _ in items]
        outs = [_compact(o) for o in run_candidates(self.model, batch)]
        ms = (time.perf_counter() - t0) * 1e3
        return [{"dets": o, "ms": ms, "batch": len(items)} for o in outs]

    async def _finish(self, items: list, results: list[dict]) -> list[dict]:
        """The batch's NMS: one call to the NMS stage with boxes only; the kept masks rejoin their boxes."""
        try:
            kept = await self.nms.remote([{"dets": Detections(r["dets"].boxes, r["dets"].scores, r["dets"].labels),
                                           **params} for (_, params), r in zip(items, results)])
        except REPLICA_LOST as e:
            error = unavailable(f"{self.nms.deployment_name} is unavailable ({type(e).__name__}: its replica "
                                f"stopped while suppressing this request's boxes; Serve replaces it); retry later",
                                self.nms_retry_after_s)
            return [error] * len(items)
        out = []
        for r, k in zip(results, kept):
            dets, masks = k["dets"], r["dets"].masks
            if masks is not None:
                dets = Detections(dets.boxes, dets.scores, dets.labels, masks[as_tensor(k["keep"])])
            out.append({"dets": dets, "ms": r["ms"], "nms_ms": k["ms"], "batch": r["batch"]})
        return out


@serve.deployment
class Classifier(_BatchedModel):
    """A registry classifier: ``__call__(uint8 3xSxS array or tensor)`` -> ``{"probs": float K array, "ms",
    "batch"}``."""

    async def __call__(self, image) -> dict:
        return await self.batcher(image)

    def _run(self, images: list) -> list[dict]:
        t0 = time.perf_counter()
        x = torch.stack([as_tensor(im) for im in images]).to(self.device).float().div_(255)
        probs = run_classifier(self.model, x).cpu().numpy()
        ms = (time.perf_counter() - t0) * 1e3
        return [{"probs": p, "ms": ms, "batch": len(images)} for p in probs]
