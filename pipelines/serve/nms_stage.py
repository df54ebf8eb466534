"""NMS stage: its own deployment, so it can sit on a GPU and batch across requests.

Candidates of several requests are suppressed in ONE ``vision.ops.batched_nms`` call: the group key is
(request, label), so boxes of different images or classes never suppress each other.
"""
from __future__ import annotations

import os
import time

import torch
from ray import serve

from pipelines.serve.batching import Batcher
from vision.ops import batched_nms
from vision.structures import Detections


def suppress(items: list[dict], device: torch.device) -> list[tuple[Detections, torch.Tensor]]:
    """NMS for each item ``{"dets": Detections, "iou_threshold", "score_threshold", "max_detections"}``.

    Returns per item ``(kept Detections on the CPU, best first, at most max_detections; their indices
    in the item's dets)``.
    """
    results: list[tuple[Detections, torch.Tensor] | None] = [None] * len(items)
    by_iou: dict[float, list[int]] = {}
    for i, it in enumerate(items):
        by_iou.setdefault(float(it["iou_threshold"]), []).append(i)
    for iou, idx in by_iou.items():
        # Score filter first: it is per request and shrinks the kernel's input.
        where = [(items[i]["dets"].scores >= items[i]["score_threshold"]).nonzero().flatten() for i in idx]
        cands = [items[i]["dets"][w] for i, w in zip(idx, where)]
        sizes = [len(c) for c in cands]
        owner = torch.repeat_interleave(torch.arange(len(cands)), torch.tensor(sizes, dtype=torch.long))
        if not sum(sizes):
            kept = owner
        else:
            boxes = torch.cat([c.boxes for c in cands]).to(device, torch.float32)
            scores = torch.cat([c.scores for c in cands]).to(device, torch.float32)
            labels = torch.cat([c.labels for c in cands])
            span = int(labels.max()) + 1
            # Offsetting labels by request makes the groups (request, label) for one kernel call.
            groups = (labels + owner * span).to(device)
            kept = batched_nms(boxes, scores, groups, iou).cpu()
        starts = torch.tensor([0] + sizes).cumsum(0)
        kept_owner = owner[kept]
        for k, i in enumerate(idx):
            mine = kept[kept_owner == k][: int(items[i]["max_detections"])] - starts[k]
            results[i] = (cands[k][mine], where[k][mine])
    return results


@serve.deployment
class NmsStage:
    """``__call__([item, ...])`` -> per item ``{"dets": kept Detections, "keep": their indices in the item's
    dets, "ms", "device"}``: one call per detector batch; calls that arrive together (several detector
    replicas) are suppressed together too. On the GPU when the replica has one (``num_gpus`` in the
    config), else the CPU."""

    def __init__(self, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.0):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batcher = Batcher(self._run, max_batch_size, batch_wait_timeout_s)

    async def __call__(self, items: list[dict]) -> list[dict]:
        return await self.batcher(items)

    def pid(self) -> int:
        """The replica's process id (tests kill it during a call)."""
        return os.getpid()

    def _run(self, calls: list[list[dict]]) -> list[list[dict]]:
        t0 = time.perf_counter()
        outs = suppress([item for items in calls for item in items], self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        # keep as a NumPy array: cheaper between processes than a tensor (see Detections.__reduce__).
        answers = iter({"dets": d, "keep": k.numpy(), "ms": ms, "device": self.device.type} for d, k in outs)
        return [[next(answers) for _ in items] for items in calls]
