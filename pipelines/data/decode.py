"""Task side of ingest: read and check each image, turn every mask into compressed COCO RLE.

Runs inside Ray Data tasks (``map_batches`` over per-image metadata), so image bytes go from the
filesystem to the object store and the shards without passing through the driver.
"""
from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from pipelines.data.image_decode import read_image
from pipelines.data.image_files import DEFAULT_MAX_IMAGE_BYTES, image_path, read_image_file
from pipelines.data.schema import CONVERTED, DECODED_SCHEMA, QUARANTINE
from pipelines.data.validate import clean_segmentation

DEFAULT_MAX_PIXELS = 8192 * 8192
# Test-only: a worker decoding the image with this file_name kills itself (SIGKILL), as a native decoder
# crash would. Read from the workers' environment, never from data; tests/test_data_faults.py sets it.
TEST_CRASH_ENV = "VISIONFLOW_TEST_CRASH_ON"

KEEP_FORMATS = {"JPEG", "PNG"}
# The PIL decoders ingest runs on dataset files ("JPEG" includes the MPO files many cameras write). Not
# EPS, which PIL hands to Ghostscript, nor the other rare plugins.
INGEST_FORMATS = ["JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM"]


def check_image(raw: bytes, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str | None]:
    """Decode ``raw`` fully (``image_decode.read_image``); return ``(RGB encoded bytes, conversion note
    or None)``.

    8-bit RGB JPEG/PNG files without an EXIF orientation keep their bytes; anything else (grayscale,
    CMYK, palette, RGBA, 16-bit samples, an EXIF rotation, the other ``INGEST_FORMATS``) is stored as what
    ``read_image`` shows (RGB, 8 bits, upright), re-encoded as PNG (lossless). Raises ValueError with the
    reason when the file is empty, not an image, over ``max_pixels``, truncated, or (once upright) not
    the size the JSON states.
    """
    decoded = read_image(raw, max_pixels, INGEST_FORMATS)
    rgb = decoded.image
    if rgb.size != (width, height):
        turned = " after its EXIF orientation" if decoded.oriented else ""
        raise ValueError(f"size mismatch: the JSON says {width}x{height}, the file is "
                         f"{rgb.size[0]}x{rgb.size[1]}{turned}")
    if decoded.plain_rgb and decoded.format in KEEP_FORMATS:
        return raw, None
    note = f"{decoded.format} {decoded.mode} -> RGB"
    if decoded.deep:
        note += ", 16 -> 8 bits"
    if decoded.oriented:
        note += ", EXIF orientation applied"
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), note


def to_rle(seg, box: list[float], height: int, width: int) -> dict:
    """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` of one annotation's segmentation.

    ``seg`` is checked again (``validate.clean_segmentation``, cheap) before pycocotools sees it:
    polygons (clipped to the image) and uncompressed RLE are encoded with pycocotools; compressed RLE
    passes through; an absent segmentation becomes the box.
    """
    if seg is None:
        x1, y1, x2, y2 = box
        seg = [[x1, y1, x2, y1, x2, y2, x1, y2]]
    seg = clean_segmentation(seg, height, width)
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def decode_batch(meta: pa.Table, images_root: str, filesystem, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Per-image metadata (``coco_index.META_SCHEMA``) -> shard rows plus the transient columns.

    A row that cannot be used keeps its ``image_id``/``file_name`` and gets its reason in
    ``_quarantine``; one bad image never fails the batch (one that kills the process is handled by
    ``ingest``). Files are read only inside ``images_root`` and up to ``max_image_bytes``; images over
    ``max_pixels`` are refused from their header.
    """
    cols = {name: [] for name in DECODED_SCHEMA.names}
    crash_on = os.environ.get(TEST_CRASH_ENV)
    for row in meta.to_pylist():
        w, h = row["width"], row["height"]
        anns = json.loads(row["anns"])
        out = {"image_id": row["image_id"], "file_name": row["file_name"], "width": w, "height": h,
               "image": None, "boxes": [], "category_ids": [], "labels": [], "iscrowd": [], "area": [],
               "segmentation": [], QUARANTINE: None, CONVERTED: None}
        try:
            path = image_path(filesystem, images_root, row["file_name"])
            raw = read_image_file(filesystem, path, max_image_bytes)
            if crash_on and row["file_name"] == crash_on:
                os.kill(os.getpid(), signal.SIGKILL)
            out["image"], out[CONVERTED] = check_image(raw, w, h, max_pixels)
            for a in anns:
                rle = to_rle(a["segmentation"], a["box"], h, w)
                area = a["area"]
                if area is None:
                    area = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
                out["boxes"].append(a["box"])
                out["category_ids"].append(a["category_id"])
                out["labels"].append(a["label"])
                out["iscrowd"].append(a["iscrowd"])
                out["area"].append(area)
                out["segmentation"].append(rle)
        except FileNotFoundError:
            out.update(image=None, **{QUARANTINE: "missing: no such file"})
        except IsADirectoryError:
            out.update(image=None, **{QUARANTINE: "missing: the path is a directory"})
        except ValueError as e:
            out.update(image=None, **{QUARANTINE: str(e)})
        except Exception as e:  # noqa: BLE001 -- a surprise in one image must not stop the run
            out.update(image=None, **{QUARANTINE: f"unreadable: {type(e).__name__}: {e}"})
        if out[QUARANTINE]:
            for k in ("boxes", "category_ids", "labels", "iscrowd", "area", "segmentation"):
                out[k] = []
        for k in cols:
            cols[k].append(out[k])
    return pa.table(cols, schema=DECODED_SCHEMA)


def rle_to_mask(rle: dict) -> np.ndarray:
    """uint8 HxW mask of a compressed COCO RLE dict with str or bytes counts."""
    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]),
                              "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
