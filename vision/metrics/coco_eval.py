"""COCO evaluation (bbox and segm, the 12 standard numbers) with pycocotools, the one place COCO logic lives.

Ground truth is built from dataset rows (raw shard rows with ``category_ids``/``segmentation``/``area``,
or detection-view rows with ``labels``/``masks``), predictions from ``Detections``; both in the original
COCO category ids. Evaluator states are keyed by image id, so merging the states of several workers
counts every image once even when shards overlap.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Mapping, Sequence

import numpy as np

from vision.structures import Detections, encode_mask, label_maps

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0  # how many _quiet blocks are open, in any thread


def _dropped(*objects, **kwargs) -> None:
    pass


@contextlib.contextmanager
def _quiet():
    """pycocotools' progress lines (``creating index...``, ``DONE``, the summary table) are dropped while
    the block runs. It prints them with ``print``; ``contextlib.redirect_stdout`` missed them where
    ``print`` itself is replaced (Ray Train's workers route ``print`` to a logger whatever ``sys.stdout``
    is: they reached the console at every detector's validation). So pycocotools' own two modules get a
    ``print`` of their own (a module global shadows the builtin for that module's code only) while any
    block is open, in any thread; other code's output is left alone. A ``verbose`` evaluation that
    overlaps a quiet one in another thread prints nothing either."""
    global _quiet_depth
    from pycocotools import coco, cocoeval

    with _QUIET_LOCK:
        if _quiet_depth == 0:
            coco.print = cocoeval.print = _dropped
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for m in (coco, cocoeval):
                    m.__dict__.pop("print", None)


def _rle_of(seg, height: int, width: int) -> dict:
    """A COCO RLE dict with str counts from an RLE dict (bytes/str counts) or a bare counts string."""
    if isinstance(seg, Mapping):
        counts = seg["counts"]
        size = [int(v) for v in seg.get("size", (height, width))]
    else:
        counts, size = seg, [height, width]
    if isinstance(counts, (list, tuple, np.ndarray)):  # uncompressed RLE (crowd regions)
        from pycocotools import mask as mask_utils

        counts = mask_utils.frPyObjects({"size": size, "counts": list(counts)}, *size)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": size, "counts": counts}


def _column(row: Mapping, key: str, n: int, default):
    v = row.get(key)
    if v is None:
        return [default] * n
    return list(v)


def annotations_from_row(row: Mapping, label_to_id: Mapping[int, int] | None = None) -> tuple[dict, list[dict]]:
    """One dataset row -> (COCO image entry, COCO annotation entries without ids).

    Uses ``category_ids`` when present, else ``labels`` mapped through ``label_to_id``; ``segmentation``
    (RLE) when present, else ``masks`` (N, H, W) encoded; ``area`` when present, else mask or box area.
    """
    image_id = int(row["image_id"])
    boxes = np.asarray(row["boxes"] if row.get("boxes") is not None else np.zeros((0, 4)), dtype=np.float64)
    boxes = boxes.reshape(-1, 4)
    n = boxes.shape[0]
    if "height" in row and row.get("height") is not None:
        height, width = int(row["height"]), int(row["width"])
    elif row.get("image") is not None and hasattr(row["image"], "shape"):
        height, width = (int(s) for s in np.asarray(row["image"]).shape[:2])
    else:
        raise ValueError(f"row of image {image_id} needs height/width or a decoded image to size it")
    if row.get("category_ids") is not None:
        cats = [int(c) for c in row["category_ids"]]
    elif row.get("labels") is not None:
        if label_to_id is None:
            raise ValueError("rows carry labels, not category_ids: pass the manifest categories to map them")
        try:
            cats = [int(label_to_id[int(lab)]) for lab in row["labels"]]
        except KeyError as e:
            raise KeyError(f"image {image_id}: label {e.args[0]} is not in the category map") from None
    else:
        raise ValueError(f"row of image {image_id} has neither category_ids nor labels")
    if len(cats) != n:
        raise ValueError(f"image {image_id}: {n} boxes but {len(cats)} categories")
    crowd = [int(c) for c in _column(row, "iscrowd", n, 0)]
    segs = row.get("segmentation")
    masks = row.get("masks")
    rles = None
    if segs is not None and len(segs) == n:
        rles = [_rle_of(s, height, width) for s in segs]
    elif masks is not None and len(masks) == n:
        rles = [encode_mask(np.asarray(m)) for m in masks]
    if row.get("area") is not None:
        areas = [float(a) for a in row["area"]]
    elif rles is not None:
        from pycocotools import mask as mask_utils

        areas = [float(mask_utils.area({"size": r["size"], "counts": r["counts"].encode()})) for r in rles]
    else:
        areas = [float((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]
    anns = []
    for k in range(n):
        x1, y1, x2, y2 = boxes[k].tolist()
        ann = {"image_id": image_id, "category_id": cats[k], "bbox": [x1, y1, x2 - x1, y2 - y1],
               "area": areas[k], "iscrowd": crowd[k]}
        if rles is not None:
            ann["segmentation"] = rles[k]
        anns.append(ann)
    return {"id": image_id, "height": height, "width": width}, anns


def build_coco(images: Sequence[dict], annotations: Sequence[dict], categories: Sequence[dict]):
    """An in-memory ``pycocotools.coco.COCO`` from image, annotation and category entries."""
    from pycocotools.coco import COCO

    coco = COCO()
    anns = [{**a, "id": i + 1} for i, a in enumerate(annotations)]
    coco.dataset = {"images": list(images), "annotations": anns,
                    "categories": [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]}
    with _quiet():
        coco.createIndex()
    return coco


def summarize(coco_gt, results: list[dict], iou_type: str, verbose: bool = False) -> dict[str, float]:
    """Run COCOeval on ``results`` (COCO result dicts) -> ``{"<iou_type>/AP": ..., ...}``, 12 numbers.

    With no results at all, COCOeval's numbers for no detections (``loadRes`` refuses an empty list): 0 where
    there is ground truth, -1 ("undefined") where there is none, as with any results; it gave 0 everywhere,
    so a model that found nothing on a split without objects outranked one that found something (-1).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    with _quiet() if not verbose else contextlib.nullcontext():
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {**{k: coco_gt.dataset[k] for k in ("images", "categories")}, "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {f"{iou_type}/{k}": float(v) for k, v in zip(STAT_NAMES, ev.stats)}


class CocoEvaluator:
    """Collects ground truth and predictions image by image, then runs COCOeval.

    ``categories``: the manifest's list ``[{"id", "name", "label"}]``. ``iou_types``: ``("bbox",)`` or
    ``("bbox", "segm")``. Add rows with ``add_ground_truth``, predictions with ``add``; merge the
    ``state()`` of other workers with ``merge``; ``compute()`` gives the metrics.
    """

    def __init__(self, categories: Sequence[dict], iou_types: Sequence[str] = ("bbox",)):
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
        self.categories = [dict(c) for c in categories]
        self.label_to_id, _ = label_maps(self.categories)
        self.iou_types = tuple(iou_types)
        self.images: dict[int, dict] = {}
        self.gt: dict[int, list[dict]] = {}
        self.preds: dict[int, list[dict]] = {}

    def add_ground_truth(self, rows: Iterable[Mapping]) -> None:
        """Dataset rows (one per image) as ground truth; an image already present is replaced."""
        for row in rows:
            image, anns = annotations_from_row(row, self.label_to_id)
            self.images[image["id"]] = image
            self.gt[image["id"]] = anns

    def add(self, image_id: int, detections: Detections) -> None:
        """Predictions for one image (labels 1..K, boxes in that image's pixels)."""
        results = detections.to_coco_results(int(image_id), self.label_to_id)
        if "segm" in self.iou_types and detections.masks is None:
            raise ValueError("segm evaluation needs predicted masks; this Detections has none")
        self.preds[int(image_id)] = results

    def state(self) -> dict:
        """Picklable state for gathering across workers."""
        return {"images": self.images, "gt": self.gt, "preds": self.preds}

    def merge(self, state: Mapping) -> None:
        """Fold another evaluator's ``state()`` in; images are keyed by id, so each counts once."""
        self.images.update(state["images"])
        self.gt.update(state["gt"])
        self.preds.update(state["preds"])

    def gather(self) -> None:
        """With torch.distributed initialized, merge every rank's state into this one (all ranks)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state())
        for s in states:
            self.merge(s)

    def compute(self, verbose: bool = False) -> dict[str, float]:
        """The 12 COCO numbers per iou type, over images that have ground truth; plus ``num_images``."""
        if not self.images:
            raise ValueError("no ground truth was added: call add_ground_truth with the val rows first")
        missing = sorted(set(self.preds) - set(self.images))
        if missing:
            raise ValueError(f"predictions for images without ground truth: {missing[:10]}")
        anns = [a for i in sorted(self.gt) for a in self.gt[i]]
        coco_gt = build_coco([self.images[i] for i in sorted(self.images)], anns, self.categories)
        results = [r for i in sorted(self.preds) for r in self.preds[i]]
        metrics: dict[str, float] = {"num_images": float(len(self.images))}
        for t in self.iou_types:
            use = results if t == "bbox" else [r for r in results if "segmentation" in r]
            if t == "segm":
                use = [{k: v for k, v in r.items() if k != "bbox"} for r in use]  # area/bbox from the mask
            metrics.update(summarize(coco_gt, use, t, verbose))
        return metrics


def evaluate_detections(rows: Iterable[Mapping], predictions: Mapping[int, Detections], categories,
                        iou_types: Sequence[str] = ("bbox",)) -> dict[str, float]:
    """One call: ground-truth rows, ``{image_id: Detections}`` and the manifest categories -> metrics."""
    ev = CocoEvaluator(categories, iou_types)
    ev.add_ground_truth(rows)
    for image_id, det in predictions.items():
        ev.add(image_id, det)
    return ev.compute()
