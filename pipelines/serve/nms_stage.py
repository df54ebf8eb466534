"""NMS stage: its own deployment, so it can sit on a GPU and batch across requests.

Candidates of several requests are suppressed in ONE ``batched_nms`` call: the group key is
(image, label), so boxes of different images or classes never suppress each other.
"""
from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

try:
    from vision.ops import batched_nms
except ImportError:  # vision.ops not there yet: the same kernel from torchvision
    from torchvision.ops import batched_nms


def suppress(items: list[dict], device: torch.device) -> list[dict]:
    """NMS for each item ``{"dets": {"boxes","scores","labels"[,"masks"]}, "iou_threshold",
    "score_threshold", "max_detections"}``. Returns per item the kept detections (CPU tensors, best first)."""
    results: list[dict | None] = [None] * len(items)
    by_iou: dict[float, list[int]] = {}
    for i, it in enumerate(items):
        by_iou.setdefault(float(it["iou_threshold"]), []).append(i)
    for iou, idx in by_iou.items():
        boxes, scores, groups, keep_src = [], [], [], []
        for k, i in enumerate(idx):
            d = items[i]["dets"]
            sel = (d["scores"] >= items[i]["score_threshold"]).nonzero().flatten()
            boxes.append(d["boxes"][sel])
            scores.append(d["scores"][sel])
            labels = d["labels"][sel].long()
            groups.append(labels)
            keep_src.append(sel)
        # Offsetting labels by image makes the groups (image, label) for one kernel call.
        span = int(max((g.max().item() + 1 for g in groups if g.numel()), default=1))
        owner = torch.cat([torch.full((len(g),), k, dtype=torch.long) for k, g in enumerate(groups)])
        all_boxes = torch.cat(boxes).to(device, dtype=torch.float32)
        all_scores = torch.cat(scores).to(device, dtype=torch.float32)
        all_groups = (torch.cat(groups) + owner * span).to(device)
        kept = batched_nms(all_boxes, all_scores, all_groups, iou).cpu() if len(owner) else owner
        kept_owner = owner[kept]
        starts = torch.tensor([0] + [len(g) for g in groups]).cumsum(0)
        for k, i in enumerate(idx):
            mine = kept[kept_owner == k][: int(items[i]["max_detections"])] - starts[k]
            src = keep_src[k][mine]
            d = items[i]["dets"]
            out = {"boxes": d["boxes"][src], "scores": d["scores"][src], "labels": d["labels"][src]}
            if "masks" in d:
                out["masks"] = d["masks"][src]
            results[i] = out
    return results


@serve.deployment
class NmsStage:
    """``__call__(item)`` -> ``{"boxes","scores","labels"[,"masks"], "ms", "device"}``: batched NMS on
    the GPU when the replica has one (``num_gpus`` in the config), else on the CPU."""

    def __init__(self, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.002):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.__call__.set_max_batch_size(max_batch_size)
        self.__call__.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def __call__(self, items: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        outs = suppress(items, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        return [{**o, "ms": ms, "device": self.device.type} for o in outs]
