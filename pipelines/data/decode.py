"""Task side of ingest: read and check each image, turn every mask into compressed COCO RLE.

Runs inside Ray Data tasks (``map_batches`` over per-image metadata), so image bytes go from the
filesystem to the object store and the shards without passing through the driver.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pipelines.data.fs import join, read_bytes
from pipelines.data.schema import CONVERTED, DECODED_SCHEMA, QUARANTINE

KEEP_FORMATS = {"JPEG", "PNG"}


def check_image(raw: bytes, width: int, height: int) -> tuple[bytes, str | None]:
    """Decode ``raw`` fully; return ``(RGB encoded bytes, conversion note or None)``.

    JPEG/PNG files that are already RGB keep their bytes; anything else (grayscale, CMYK, palette,
    RGBA, other formats) is converted to RGB and re-encoded as PNG (lossless). Raises ValueError with
    the reason when the file is empty, not an image, truncated, or not the size the JSON states.
    """
    if not raw:
        raise ValueError("empty file")
    try:
        im = Image.open(io.BytesIO(raw))
        fmt = im.format
        im.load()  # a full decode: only this notices a truncated file
    except UnidentifiedImageError:
        raise ValueError("not decodable: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
            raise ValueError(f"truncated: {msg}") from None
        raise ValueError(f"not decodable: {msg}") from None
    if im.size != (width, height):
        raise ValueError(f"size mismatch: the JSON says {width}x{height}, the file is {im.size[0]}x{im.size[1]}")
    if im.mode == "RGB" and fmt in KEEP_FORMATS:
        return raw, None
    note = f"{fmt} {im.mode} -> RGB"
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels over white, as a browser shows them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(bg, rgba).convert("RGB")
    else:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), note


def to_rle(seg, box: list[float], height: int, width: int) -> dict:
    """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` of one annotation's segmentation.

    Polygons (dropping parts with fewer than 3 points) and uncompressed RLE are encoded with
    pycocotools; compressed RLE passes through; an absent segmentation becomes the box.
    """
    if seg is None:
        x1, y1, x2, y2 = box
        seg = [[x1, y1, x2, y1, x2, y2, x1, y2]]
    if isinstance(seg, list):
        polys = [[float(v) for v in p] for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def decode_batch(meta: pa.Table, images_root: str, filesystem) -> pa.Table:
    """Per-image metadata (``coco_index.META_SCHEMA``) -> shard rows plus the transient columns.

    A row that cannot be used keeps its ``image_id``/``file_name`` and gets its reason in
    ``_quarantine``; one bad image never fails the batch.
    """
    cols = {name: [] for name in DECODED_SCHEMA.names}
    for row in meta.to_pylist():
        w, h = row["width"], row["height"]
        anns = json.loads(row["anns"])
        out = {"image_id": row["image_id"], "file_name": row["file_name"], "width": w, "height": h,
               "image": None, "boxes": [], "category_ids": [], "labels": [], "iscrowd": [], "area": [],
               "segmentation": [], QUARANTINE: None, CONVERTED: None}
        try:
            raw = read_bytes(filesystem, join(images_root, row["file_name"]))
            out["image"], out[CONVERTED] = check_image(raw, w, h)
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
