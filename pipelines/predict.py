"""Running a trained checkpoint on a user's own images, without a server: ``visionflow predict``.

The path an image takes is the one Serve's graph takes (``pipelines/serve``'s pure functions: the shared
decoder, the resize, the model's pre-NMS candidates, the NMS stage's ``suppress``, the postprocess that
maps boxes back to the image and masks to COCO RLE), so a prediction here equals the endpoint's answer.

Outputs in ``out``:

- ``predictions.json``: detection/segmentation: COCO results (``image_id``, the checkpoint's original
  ``category_id``, ``bbox`` as x, y, w, h, ``score``, and ``segmentation`` RLE for masks), which
  ``COCO.loadRes`` takes; classification: ``[{"image_id", "file_name", "top_k": [{"category_id",
  "label", "score"}]}]``.
- ``images.json``: ``[{"id", "file_name", "width", "height"}]`` (ids from ``--annotations`` when given,
  so the results line up with that dataset; else 1..N), and ``errors`` for files that could not be read.
- ``overlays/<name>.png``: each image with its boxes, labels and masks drawn (detection, segmentation),
  small images drawn larger so that the labels are readable (``pipelines.overlays``).

A few files run in this process; more (above ``in_process_max``) run batched on Ray Data with an actor
pool, each actor holding one copy of the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePath, PurePosixPath

import numpy as np
import torch

from pipelines import storage

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _glob(pattern: str) -> list[str]:
    """Local paths matching a glob (``**``: any folders), sorted. Symlinked folders are not entered, as a folder
    input's walk does not: ``glob.glob`` follows them, so a link to its own folder repeated each image 41 times
    and two such links never finished."""
    parts = PurePath(pattern).parts
    k = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = Path(*parts[:k]) if k else Path(".")
    return sorted(str(m) for m in base.glob(str(PurePath(*parts[k:]))))


def _local_key(path: str) -> str:
    return os.path.realpath(path) if "://" not in path else path


def list_inputs(inputs: list[str], exclude: str | None = None) -> list[str]:
    """Image files named by ``inputs``: files, folders (searched recursively, symlinked folders not entered)
    or globs; local paths or storage URIs (folders and files only). Sorted, each file once however it is
    named, none under the ``exclude`` folder (predict's own output: a rerun would predict its overlays);
    ValueError when nothing matches."""
    import pyarrow.fs as pafs

    found: list[str] = []
    for item in inputs:
        if "://" in item:
            fs, path = storage.resolve(item)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found.append(item)
            elif info.type == pafs.FileType.Directory:
                sel = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                scheme = item.split("://", 1)[0]
                found += [f"{scheme}://{i.path}" for i in sel if i.type == pafs.FileType.File
                          and i.path.lower().endswith(IMAGE_EXTS)]
            else:
                raise ValueError(f"{item}: no such file or folder")
            continue
        # A file or folder that exists is itself, even with [, ? or * in its name; else a glob.
        literal = os.path.exists(item) or not any(c in item for c in "*?[")
        paths = [item] if literal else _glob(item)
        if not paths:
            raise ValueError(f"{item}: no file matches")
        for p in paths:
            if os.path.isdir(p):
                found += sorted(os.path.join(root, f) for root, _, files in os.walk(p) for f in files
                                if f.lower().endswith(IMAGE_EXTS))  # the same order on every machine
            elif os.path.isfile(p):
                found.append(p)
            else:
                raise ValueError(f"{p}: no such file or folder")
    skip = _local_key(exclude) + ("/" if "://" not in exclude else "") if exclude else None
    unique: dict[str, str] = {}  # the file -> the first name it was given by
    for path in found:
        key = _local_key(path)
        if not (skip and key.startswith(skip.rstrip("/") + "/")):
            unique.setdefault(key, path)
    if not unique:
        raise ValueError(f"no JPEG or PNG images in {inputs}" + (f" outside {exclude}" if found else ""))
    return list(unique.values())


class TooLarge(OSError):
    """An input file over ingest's default byte cap (``DEFAULT_MAX_IMAGE_BYTES``): skipped with its reason,
    never read into memory."""


def read_file(path: str, max_bytes: int | None = None) -> bytes:
    fs, inner = storage.resolve(path)
    if max_bytes is not None:
        size = fs.get_file_info(inner).size
        if size is not None and size > max_bytes:
            raise TooLarge(f"{size} bytes, over the limit of {max_bytes}")
    return storage.read_bytes(fs, inner)


class Predictor:
    """One checkpoint, ready to answer ``predict(list of encoded images)`` like the endpoint does."""

    def __init__(self, checkpoint: str, *, score_threshold: float = 0.3, iou_threshold: float = 0.5,
                 max_detections: int = 100, top_k: int = 5, max_pixels: int | None = None):
        from pipelines.serve.config import Limits, ModelSpec
        from pipelines.serve.models import load_served_model

        self.model, self.info = load_served_model(ModelSpec(name="model", checkpoint=str(checkpoint)))
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.max_detections, self.top_k = max_detections, top_k
        self.max_pixels = max_pixels or Limits().max_image_pixels

    @property
    def task(self) -> str:
        return self.info.task

    def _decode(self, data: bytes):
        from pipelines.serve.images import decode_image, to_tensor

        rgb = decode_image(data, self.max_pixels)
        tensor, _ = to_tensor(rgb, self.info.image_size, square=self.task == "classification")
        return rgb, tensor

    def predict(self, images: list[bytes]) -> list[dict]:
        """One result per image: ``{"width", "height", "items"}`` (the endpoint's detections or top-k
        predictions), or ``{"error"}`` for bytes that are not a usable image."""
        from pipelines.serve.errors import ApiError

        results: list[dict] = [{} for _ in images]
        decoded = []
        for i, data in enumerate(images):
            try:
                rgb, tensor = self._decode(data)
            except ApiError as e:
                results[i] = {"error": e.message}
                continue
            decoded.append((i, rgb, tensor))
            results[i] = {"width": rgb.shape[1], "height": rgb.shape[0]}
        if not decoded:
            return results
        if self.task == "classification":
            from pipelines.serve.models import run_classifier
            from pipelines.serve.postprocess import top_k_items

            probs = run_classifier(self.model, torch.stack([t for _, _, t in decoded]))
            for (i, _, _), p in zip(decoded, probs):
                results[i]["items"] = top_k_items(p, self.top_k, self.info.categories)
            return results
        from pipelines.serve.models import run_candidates
        from pipelines.serve.nms_stage import suppress
        from pipelines.serve.postprocess import detection_items
        from vision.structures import Detections

        cands = run_candidates(self.model, [t for _, _, t in decoded])
        kept = suppress([{"dets": Detections(c.boxes, c.scores, c.labels), "iou_threshold": self.iou_threshold,
                          "score_threshold": self.score_threshold, "max_detections": self.max_detections}
                         for c in cands], torch.device("cpu"))
        for (i, rgb, tensor), c, (dets, keep) in zip(decoded, cands, kept):
            if c.masks is not None:
                dets = Detections(dets.boxes, dets.scores, dets.labels, c.masks[keep])
            results[i]["items"] = detection_items(dets, tuple(tensor.shape[-2:]), (rgb.shape[1], rgb.shape[0]),
                                                  self.info.categories)
        return results

    def overlay(self, data: bytes, result: dict) -> bytes:
        """PNG of the image with its boxes, labels and masks drawn, readable (``pipelines.overlays``)."""
        from pipelines.overlays import draw

        rgb, _ = self._decode(data)
        return draw(rgb, result.get("items") or [])


def coco_results(image_id: int, result: dict) -> list[dict]:
    """COCO result entries of one image's detections (bbox x, y, w, h; segmentation RLE)."""
    out = []
    for it in result.get("items") or []:
        x1, y1, x2, y2 = it["box"]
        entry = {"image_id": image_id, "category_id": int(it["category_id"]),
                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": it["score"]}
        if "mask" in it:
            entry["segmentation"] = it["mask"]
        out.append(entry)
    return out


def image_ids(paths: list[str], annotations: str | None) -> list[int]:
    """Each file's image id: its ``file_name``'s id in the COCO ``annotations`` (matched on the path's
    tail), else 1..N. ValueError naming the files a given COCO JSON does not list."""
    if not annotations:
        return list(range(1, len(paths) + 1))
    doc = json.loads(read_file(annotations))
    by_name = {str(im["file_name"]): int(im["id"]) for im in doc.get("images", [])}
    ids, missing = [], []
    for p in paths:
        parts = PurePosixPath(p.replace(os.sep, "/")).parts
        hit = next((by_name[t] for t in ("/".join(parts[-k:]) for k in range(len(parts), 0, -1)) if t in by_name), None)
        ids.append(hit if hit is not None else -1)
        if hit is None:
            missing.append(p)
    if missing:
        raise ValueError(f"{len(missing)} images are not in {annotations} (e.g. {missing[0]}); predict them "
                         f"without --annotations, or point it at the JSON that lists them")
    first: dict[int, str] = {}
    for p, i in zip(paths, ids):
        if first.setdefault(i, p) != p:
            raise ValueError(f"{first[i]} and {p} both match image {i} of {annotations} (by the end of their paths): "
                             "predict one of them at a time")
    return ids


# Bytes of a file's stem kept in its overlay's name: file systems allow 255 bytes a name.
STEM_BYTES = 200


def _overlay_name(path: str, image_id: int) -> str:
    stem = PurePosixPath(path.replace(os.sep, "/")).stem
    stem = stem.encode("utf-8", "surrogateescape")[:STEM_BYTES].decode("utf-8", "ignore")
    return f"overlays/{image_id:06d}_{stem}.png"


class _PredictBatch:
    """Ray Data actor: a batch of ``{"path", "image_id"}`` rows -> their results (overlays written)."""

    def __init__(self, checkpoint: str, options: dict, out: str, draw: bool):
        self.predictor = Predictor(checkpoint, **options)
        self.out, self.draw = out, draw

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        ids = [int(i) for i in batch["image_id"]]
        rows = _predict_files(self.predictor, paths, ids, self.out, self.draw)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _predict_files(predictor: Predictor, paths: list[str], ids: list[int], out: str, draw: bool) -> list[dict]:
    """Rows ``{"file_name", "image_id", "width", "height", "items"[, "overlay" | "overlay_error"]}`` or
    ``{..., "error"}``."""
    from pipelines.data.image_files import DEFAULT_MAX_IMAGE_BYTES  # (here: the package imports Ray Data)

    datas: list[bytes | None] = []
    unread: dict[int, str] = {}
    for k, p in enumerate(paths):
        try:
            datas.append(read_file(p, DEFAULT_MAX_IMAGE_BYTES))
        except TooLarge as e:
            datas.append(None)
            unread[k] = f"too large: {e}"
        except OSError:
            datas.append(None)
    readable = [d for d in datas if d is not None]
    results = iter(predictor.predict(readable) if readable else [])
    outs = []
    for k, (p, image_id, data) in enumerate(zip(paths, ids, datas)):
        res = {"error": unread.get(k, "could not be read")} if data is None else next(results)
        row = {"file_name": p, "image_id": image_id, **res}
        if "error" not in res and draw and predictor.task != "classification":
            try:
                row["overlay"] = storage.write_bytes(out, _overlay_name(p, image_id), predictor.overlay(data, res))
            except OSError as e:  # a full disk, a name the file system refuses: the predictions are kept
                row["overlay_error"] = f"{type(e).__name__}: {e}"
        outs.append(row)
    return outs


def predict(checkpoint: str, inputs: list[str], out: str, *, annotations: str | None = None,
            score_threshold: float = 0.3, iou_threshold: float = 0.5, max_detections: int = 100, top_k: int = 5,
            batch_size: int = 8, in_process_max: int = 16, actors: int = 2, draw: bool = True,
            progress_out=None) -> dict:
    """Predict every image of ``inputs`` with ``checkpoint`` into ``out`` (see the module docstring).
    Returns ``{"images", "errors", "predictions", "images_json", "overlays", "engine", "task"}``."""
    from pipelines.console import Progress

    if "://" not in str(out):
        out = os.path.abspath(out)  # Ray Data's actors write the overlays from their own working directory
    paths = list_inputs(inputs, exclude=str(out))
    ids = image_ids(paths, annotations)
    options = {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
               "max_detections": max_detections, "top_k": top_k}
    rows: list[dict] = []
    engine = "in-process" if len(paths) <= in_process_max else "ray-data"
    with Progress(len(paths), "predict", unit="img", out=progress_out) as bar:
        if engine == "in-process":
            predictor = Predictor(checkpoint, **options)
            task = predictor.task
            for k in range(0, len(paths), batch_size):
                chunk = _predict_files(predictor, paths[k:k + batch_size], ids[k:k + batch_size], out, draw)
                rows += chunk
                bar.update(len(chunk))
        else:
            import ray

            from pipelines.train.checkpoint import load_payload

            task = load_payload(checkpoint)["config"]["task"]
            ds = ray.data.from_items([{"path": p, "image_id": i} for p, i in zip(paths, ids)],
                                     override_num_blocks=max(1, min(len(paths) // batch_size, 64)))
            ds = ds.map_batches(_PredictBatch, fn_constructor_kwargs={"checkpoint": str(checkpoint), "options": options,
                                                                      "out": str(out), "draw": draw},
                                batch_size=batch_size, concurrency=(1, max(1, actors)), num_cpus=1)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                chunk = [json.loads(r) for r in batch["row"]]
                rows += chunk
                bar.update(len(chunk))
    rows.sort(key=lambda r: (r["image_id"], r["file_name"]))
    errors = [{"file_name": r["file_name"], "error": r["error"]} for r in rows if "error" in r]
    good = [r for r in rows if "error" not in r]
    if task == "classification":
        preds = [{"image_id": r["image_id"], "file_name": r["file_name"], "top_k": r["items"]} for r in good]
    else:
        preds = [e for r in good for e in coco_results(r["image_id"], r)]
    images = [{"id": r["image_id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
              for r in good]
    return {"task": task, "engine": engine, "images": len(good), "errors": errors,
            "overlay_errors": [{"file_name": r["file_name"], "error": r["overlay_error"]} for r in good
                               if "overlay_error" in r],
            "predictions": storage.write_json(out, "predictions.json", preds),
            "images_json": storage.write_json(out, "images.json", {"images": images, "errors": errors}),
            "overlays": [r["overlay"] for r in good if r.get("overlay")]}
