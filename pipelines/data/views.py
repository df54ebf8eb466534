"""Task views of an ingested split: what each trainer reads, augmented per epoch on Ray Data.

``augment`` maps shard rows (one per image) to the rows a task wants; the geometric work is
``vision.transforms`` (torchvision v2 on tv_tensors). Each row's randomness is seeded from
(seed, epoch, image_id[, instance]), so a view is reproducible for (seed, epoch), different across
epochs, and independent of how Ray splits the data into blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and torchvision load in the processes that augment, not in every one that
    import pyarrow as pa  # unpickles the plan (Ray Data's split coordinator starts once per epoch)
    import torch

TASKS = ("classification", "localization", "detection", "segmentation")
# Rows per augmentation batch: a few encoded images in, a few MiB of decoded pixels out.
AUGMENT_BATCH = 16
# Largest block an augmentation task emits. Ray Data's default (128 MiB) made each task hold all its rows
# (about 500 images of 128 px, 24 MiB) in one block, so the first batch waited for a whole task: 2 s of a
# warm 2,000-image epoch against 0.5 s at 4 MiB, for the same total time (docs/data.md).
VIEW_BLOCK_BYTES = 4 * 2**20


def _instances(row: dict):
    boxes = np.asarray(row["boxes"] or [], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(row["labels"] or [], dtype=np.int64)
    iscrowd = np.asarray(row["iscrowd"] or [], dtype=np.uint8)
    return boxes, labels, iscrowd


def _hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _detection_rows(batch: pa.Table, *, size, train, seed, epoch, masks: bool) -> dict:
    from vision import transforms as T

    out = {"image_id": [], "image": [], "boxes": [], "labels": [], "iscrowd": []}
    if masks:
        out["masks"] = []
    for row in batch.to_pylist():
        image = T.decode_image(row["image"])
        boxes, labels, iscrowd = _instances(row)
        m = list(row["segmentation"] or []) if masks else None  # RLEs: decoded one at a time in training
        img, target = T.transform_detection(image, boxes, labels, iscrowd=iscrowd, masks=m, size=size,
                                            train=train, seed=T.seed_for(seed, epoch, row["image_id"]))
        out["image_id"].append(row["image_id"])
        out["image"].append(_hwc(img))
        out["boxes"].append(target["boxes"].numpy().reshape(-1, 4))
        out["labels"].append(target["labels"].numpy())
        out["iscrowd"].append(target["iscrowd"].numpy())
        if masks:
            out["masks"].append(np.ascontiguousarray(target["masks"].numpy()))
    return out


def _classification_rows(batch: pa.Table, *, size, train, seed, epoch) -> dict:
    from vision import transforms as T

    out = {"image": [], "label": []}
    for row in batch.to_pylist():
        boxes, labels, iscrowd = _instances(row)
        keep = [i for i in range(len(labels)) if not iscrowd[i]
                and boxes[i, 2] - boxes[i, 0] >= 2 and boxes[i, 3] - boxes[i, 1] >= 2]
        if not keep:
            continue
        image = T.decode_image(row["image"])
        for i in keep:
            crop = T.classification_crop(image, boxes[i], size=size, train=train,
                                         seed=T.seed_for(seed, epoch, row["image_id"], i))
            out["image"].append(_hwc(crop))
            out["label"].append(int(labels[i]) - 1)
    return _stack(out, {"image": np.uint8, "label": np.int64}, (size, size, 3))


def _localization_rows(batch: pa.Table, *, size, train, seed, epoch) -> dict:
    from vision import transforms as T

    out = {"image": [], "label": [], "box": []}
    for row in batch.to_pylist():
        boxes, labels, iscrowd = _instances(row)
        areas = np.where(iscrowd == 0, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), -1.0)
        if len(areas) == 0 or areas.max() <= 0:
            continue  # nothing to localize
        i = int(np.argmax(areas))  # the largest object of the image
        img, box = T.transform_localization(T.decode_image(row["image"]), boxes[i], int(labels[i]), size=size,
                                            train=train, seed=T.seed_for(seed, epoch, row["image_id"]))
        out["image"].append(_hwc(img))
        out["label"].append(int(labels[i]) - 1)
        out["box"].append(box.numpy().astype(np.float32))
    return _stack(out, {"image": np.uint8, "label": np.int64, "box": np.float32},
                  (size, size, 3), box=(4,))


def _stack(cols: dict, dtypes: dict, image_shape, box=None) -> dict:
    # Fixed-size views become dense arrays (empty ones keep their shape and dtype).
    shapes = {"image": image_shape, "label": (), "box": box}
    return {k: (np.stack(v).astype(dtypes[k]) if v else np.zeros((0, *shapes[k]), dtype=dtypes[k]))
            for k, v in cols.items()}


def augment(ds, *, task: str, size: int, train: bool = True, seed: int = 0, epoch: int = 0,
            num_cpus: float = 1.0):
    """The ``task`` view of a dataset of shard rows (from ``load_split`` or ``read_coco``).

    Takes the dataset, the task (classification, localization, detection, segmentation), the training
    size in pixels, ``train`` (random flip and scale jitter when True), and ``seed``/``epoch`` for the
    draws. Returns a Ray Dataset with the rows of docs/architecture.md ("Data"):
    classification ``{image uint8 (size,size,3), label 0..K-1}`` (one row per non-crowd object),
    localization ``{image, label 0..K-1, box float32 (4,)}`` (one row per image with an object),
    detection/segmentation ``{image_id, image uint8 HxWx3, boxes (N,4), labels 1..K, iscrowd[, masks (N,H,W)]}``.
    """
    fn, kw = _rows_fn(task, size=size, train=train, seed=seed, epoch=epoch)
    # Whole blocks in (batch_size None), AUGMENT_BATCH rows out at a time: with a batch size here, Ray Data
    # bundles that many *shards* into each fused read-and-augment task (it counts the read's input rows), so
    # a split of 16 shards ran as one task on one core. The read says how many shards a task takes
    # (ingest.shards_per_read_task).
    view = ds.map_batches(_by_augment_batch(fn), batch_format="pyarrow", batch_size=None, fn_kwargs=kw,
                          num_cpus=num_cpus)
    view.context.target_max_block_size = VIEW_BLOCK_BYTES  # the plan's DataContext (copied at load_split)
    return view


def _by_augment_batch(fn):
    """``fn`` (a row function) over a whole block, ``AUGMENT_BATCH`` rows at a time, each batch's rows yielded
    as soon as they are done (Ray Data cuts its output blocks from them as they come: the first block does not
    wait for the whole input block). Named as ``fn``, so the plan and the stats say which view it is."""
    def rows(table, **kw):
        for start in range(0, table.num_rows, AUGMENT_BATCH):
            yield fn(table.slice(start, AUGMENT_BATCH), **kw)

    rows.__name__ = rows.__qualname__ = fn.__name__
    return rows


def _rows_fn(task: str, *, size: int, train: bool, seed: int, epoch: int):
    """The row function of ``task`` and its keyword arguments, after checking both."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 pixels, got {size!r}")
    kw = {"size": size, "train": bool(train), "seed": int(seed), "epoch": int(epoch)}
    if task in ("detection", "segmentation"):
        return _detection_rows, {**kw, "masks": task == "segmentation"}
    return (_classification_rows if task == "classification" else _localization_rows), kw


def augment_table(table: pa.Table, *, task: str, size: int, train: bool = False, seed: int = 0,
                  epoch: int = 0) -> dict:
    """``augment`` in this process, on a table of shard rows (``read_split_table``): the same rows as one
    numpy batch, for a few images where a Ray Data execution would cost more than the work."""
    fn, kw = _rows_fn(task, size=size, train=train, seed=seed, epoch=epoch)
    return fn(table, **kw)


def collate_detection(batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """A numpy batch of detection/segmentation view rows -> ``(images, targets)`` for a detector.

    ``images``: float (3, H, W) tensors in [0, 1]; ``targets``: dicts with ``boxes`` float32 (N, 4),
    ``labels`` int64 (N,), ``iscrowd`` uint8 (N,), ``image_id`` int and, for segmentation,
    ``masks`` uint8 (N, H, W). Works whether Ray gave a column as one array or as ragged objects.
    """
    import torch

    n = len(batch["image"])
    images, targets = [], []
    for i in range(n):
        # numpy's divide, not torch's: the same float32 values and layout, but one thread. torch's
        # intra-op threads wait for each other in a barrier for every image of 50k+ values while the cores
        # also run the augmentation: the consumer's CPU per image fell from 0.35-0.61 ms to 0.20-0.25 ms
        # on 2 cores (docs/data.md).
        hwc = np.asarray(batch["image"][i], dtype=np.uint8)
        images.append(torch.from_numpy(np.divide(hwc, np.float32(255.0), dtype=np.float32)).permute(2, 0, 1))
        t = {"boxes": _tensor(batch["boxes"][i], np.float32, (-1, 4)),
             "labels": _tensor(batch["labels"][i], np.int64, (-1,)),
             "iscrowd": _tensor(batch["iscrowd"][i], np.uint8, (-1,))}
        if "image_id" in batch:
            t["image_id"] = int(batch["image_id"][i])
        if "masks" in batch:
            h, w = hwc.shape[:2]
            t["masks"] = _tensor(batch["masks"][i], np.uint8, (-1, h, w))
        targets.append(t)
    return images, targets


def _tensor(values, dtype, shape) -> torch.Tensor:
    """A tensor of its own: where a column came as one fixed-shape array (every row the same size), Ray
    hands out read-only views of the block's memory, which torch would share (with a warning) and a
    write to a target would then reach (``as_tensor`` copies those)."""
    from vision.structures import as_tensor

    return as_tensor(np.asarray(values, dtype=dtype).reshape(shape))
