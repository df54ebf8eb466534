"""``Detections``: one container for per-instance results (after detectron2's ``Instances``).

Fields of equal length (boxes xyxy, scores, labels 1..K, optional masks) selected together:
``dets[dets.scores > 0.5]`` filters all of them at once. Converts to the HTTP item format and
to COCO results, mapping contiguous labels back to the original COCO category ids once, here.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from vision.ops.boxes import check_boxes


def label_maps(categories) -> tuple[dict[int, int], dict[int, str]]:
    """``(label -> category_id, label -> name)`` from the manifest's ``categories`` list
    (``[{"id", "name", "label"}]``) or from a plain ``{label: category_id}`` mapping."""
    if isinstance(categories, Mapping):
        return {int(k): int(v) for k, v in categories.items()}, {}
    to_id, to_name = {}, {}
    for c in categories:
        try:
            to_id[int(c["label"])] = int(c["id"])
        except (KeyError, TypeError):
            raise ValueError(f"each category needs 'id' and 'label' keys, got {c!r}") from None
        to_name[int(c["label"])] = str(c.get("name", c["id"]))
    return to_id, to_name


def encode_mask(mask: np.ndarray) -> dict:
    """A binary (H, W) mask as COCO RLE ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


class Detections:
    """Per-instance results of one image.

    ``boxes`` (N, 4) float xyxy in pixels, ``scores`` (N,), ``labels`` (N,) int64 in 1..K, optional
    ``masks`` (N, H, W) (bool/uint8, or float probabilities; (N, 1, H, W) is squeezed).
    """

    __slots__ = ("boxes", "scores", "labels", "masks")

    def __init__(self, boxes: Tensor, scores: Tensor, labels: Tensor, masks: Tensor | None = None):
        boxes = torch.as_tensor(boxes)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4).float() if not boxes.is_floating_point() else boxes.reshape(0, 4)
        check_boxes(boxes)
        scores = torch.as_tensor(scores, device=boxes.device)
        labels = torch.as_tensor(labels, device=boxes.device)
        n = boxes.shape[0]
        for name, t in (("scores", scores), ("labels", labels)):
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"Detections: {name} must have shape ({n},) like boxes, got {tuple(t.shape)}")
        if labels.is_floating_point():
            raise TypeError(f"Detections: labels must be integers, got {labels.dtype}")
        if masks is not None:
            masks = torch.as_tensor(masks, device=boxes.device)
            if masks.dim() == 4 and masks.shape[1] == 1:
                masks = masks[:, 0]
            if masks.dim() != 3 or masks.shape[0] != n:
                raise ValueError(f"Detections: masks must have shape ({n}, H, W), got {tuple(masks.shape)}")
        self.boxes, self.scores, self.labels, self.masks = boxes, scores, labels.long(), masks

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, device="cpu", mask_size: tuple[int, int] | None = None) -> "Detections":
        """No instances (with an empty (0, H, W) mask field when ``mask_size`` is given)."""
        masks = torch.zeros((0, *mask_size), dtype=torch.uint8, device=device) if mask_size else None
        return cls(torch.zeros((0, 4), device=device), torch.zeros(0, device=device),
                   torch.zeros(0, dtype=torch.int64, device=device), masks)

    @classmethod
    def from_dict(cls, d: Mapping[str, Tensor]) -> "Detections":
        """From torchvision's output dict ``{"boxes", "scores", "labels"[, "masks"]}``."""
        return cls(d["boxes"], d["scores"], d["labels"], d.get("masks"))

    @classmethod
    def cat(cls, items: Sequence["Detections"]) -> "Detections":
        """Concatenate several containers (all with masks of one size, or none with masks)."""
        if not items:
            raise ValueError("Detections.cat needs at least one Detections")
        has_masks = {d.masks is not None for d in items}
        if len(has_masks) > 1:
            raise ValueError("Detections.cat: either all or none of the items must have masks")
        masks = torch.cat([d.masks for d in items]) if has_masks == {True} else None
        return cls(torch.cat([d.boxes for d in items]), torch.cat([d.scores for d in items]),
                   torch.cat([d.labels for d in items]), masks)

    # -- selection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, item) -> "Detections":
        """Select by bool mask, index tensor/list, slice or int (an int keeps one instance)."""
        if isinstance(item, int):
            item = slice(item, item + 1) if item != -1 else slice(-1, None)
        elif isinstance(item, (list, tuple, np.ndarray)):
            item = torch.as_tensor(np.asarray(item), device=self.boxes.device)
        if isinstance(item, Tensor):
            if item.dtype == torch.bool and (item.dim() != 1 or item.shape[0] != len(self)):
                raise IndexError(f"Detections: a boolean index must have shape ({len(self)},), "
                                 f"got {tuple(item.shape)}")
            item = item.to(self.boxes.device)
        masks = self.masks[item] if self.masks is not None else None
        return Detections(self.boxes[item], self.scores[item], self.labels[item], masks)

    def to(self, device) -> "Detections":
        """The same instances on ``device``."""
        m = self.masks.to(device) if self.masks is not None else None
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), m)

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    # -- one-liners over vision.ops -----------------------------------------------------------
    def nms(self, iou_threshold: float) -> "Detections":
        """Per-class NMS (``vision.ops.batched_nms``), best first."""
        from vision.ops import batched_nms

        return self[batched_nms(self.boxes, self.scores, self.labels, iou_threshold)]

    def filter(self, score_threshold: float = 0.0, max_detections: int | None = None) -> "Detections":
        """Instances scoring at least ``score_threshold``, best first, at most ``max_detections``."""
        order = torch.argsort(self.scores, descending=True, stable=True)
        order = order[self.scores[order] >= score_threshold]
        if max_detections is not None:
            order = order[: max(int(max_detections), 0)]
        return self[order]

    def postprocess(self, iou_threshold: float, score_threshold: float = 0.0,
                    max_detections: int | None = None) -> "Detections":
        """Score filter, then per-class NMS, then the best ``max_detections`` (torchvision's order)."""
        kept = self.filter(score_threshold).nms(iou_threshold)  # nms returns best first
        return kept if max_detections is None else kept[: max(int(max_detections), 0)]

    def rescale(self, from_size: tuple[int, int], to_size: tuple[int, int]) -> "Detections":
        """Boxes (and masks) of an image of ``from_size`` (h, w) mapped to one of ``to_size`` (h, w)."""
        (fh, fw), (th, tw) = from_size, to_size
        scale = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=self.boxes.dtype, device=self.device)
        masks = self.masks
        if masks is not None and len(self) and tuple(masks.shape[-2:]) != (th, tw):
            m = masks.float()[:, None]
            masks = torch.nn.functional.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False)[:, 0]
            masks = masks if self.masks.is_floating_point() else (masks > 0.5).to(self.masks.dtype)
        elif masks is not None and not len(self):
            masks = masks.new_zeros((0, th, tw))
        return Detections(self.boxes * scale, self.scores, self.labels, masks)

    # -- serialisation ------------------------------------------------------------------------
    def __reduce__(self):
        # Pickled as NumPy arrays: Ray moves those as out-of-band buffers, where a tensor goes through
        # torch.save and back (about 10x the cost per tensor between Serve stages). Device: the CPU.
        arrays = [None if t is None else _numpy(t) for t in (self.boxes, self.scores, self.labels, self.masks)]
        return _detections_from_numpy, tuple(arrays)

    def to_dict(self) -> dict[str, Tensor]:
        """torchvision's output dict."""
        d = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        if self.masks is not None:
            d["masks"] = self.masks
        return d

    def _binary_masks(self) -> np.ndarray | None:
        if self.masks is None:
            return None
        m = self.masks.detach().cpu()
        if m.dtype in (torch.float16, torch.bfloat16):
            m = m.float()
        m = m.numpy()  # numpy: a tiny elementwise op, no intra-op thread pool to wake
        return m > 0.5 if m.dtype.kind == "f" else m.astype(bool)

    def _category_ids(self, categories) -> tuple[list[int], list[str]]:
        to_id, to_name = label_maps(categories)
        ids, names = [], []
        for lab in self.labels.tolist():
            if lab not in to_id:
                raise KeyError(f"label {lab} has no category in the map; known labels: {sorted(to_id)}")
            ids.append(to_id[lab])
            names.append(to_name.get(lab, str(to_id[lab])))
        return ids, names

    def to_items(self, categories) -> list[dict]:
        """HTTP items: ``{"box": [x1, y1, x2, y2], "score", "category_id", "label"[, "mask": RLE]}``.

        ``categories``: the manifest's list or a ``{label: category_id}`` map (then ``label`` is the id).
        """
        ids, names = self._category_ids(categories)
        boxes = self.boxes.detach().float().cpu().tolist()
        scores = self.scores.detach().float().cpu().tolist()
        masks = self._binary_masks()
        items = []
        for k in range(len(self)):
            item = {"box": [round(v, 2) for v in boxes[k]], "score": round(scores[k], 5),
                    "category_id": ids[k], "label": names[k]}
            if masks is not None:
                item["mask"] = encode_mask(masks[k])
            items.append(item)
        return items

    def to_coco_results(self, image_id: int, categories) -> list[dict]:
        """COCO result entries for COCOeval: ``image_id``, original ``category_id``, ``bbox`` xywh,
        ``score`` and, with masks, ``segmentation`` as RLE."""
        ids, _ = self._category_ids(categories)
        b = self.boxes.detach().float().cpu()
        xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
        scores = self.scores.detach().float().cpu().tolist()
        masks = self._binary_masks()
        out = []
        for k in range(len(self)):
            r = {"image_id": int(image_id), "category_id": ids[k], "bbox": xywh[k], "score": scores[k]}
            if masks is not None:
                r["segmentation"] = encode_mask(masks[k])
            out.append(r)
        return out

    def __repr__(self) -> str:
        extra = f", masks={tuple(self.masks.shape)}" if self.masks is not None else ""
        return f"Detections(n={len(self)}, device={self.device}{extra})"


def detections_from_outputs(outputs: Iterable[Mapping[str, Tensor]]) -> list[Detections]:
    """torchvision's list of output dicts as a list of ``Detections``."""
    return [Detections.from_dict(o) for o in outputs]


def as_tensor(array) -> Tensor:
    """A tensor of a NumPy array or tensor that arrived through pickle or Ray (a read-only array is
    copied: torch may write to what it wraps)."""
    if isinstance(array, Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # NumPy has no bfloat16


def _detections_from_numpy(boxes, scores, labels, masks) -> Detections:
    return Detections(as_tensor(boxes), as_tensor(scores), as_tensor(labels),
                      None if masks is None else as_tensor(masks))
