"""Driver side of ingest: parse a COCO annotation file, validate it, group it per image.

Only the JSON is read here; image bytes are read and decoded later, in Ray tasks. What comes out is
small Arrow tables of per-image metadata (the annotations of each image as a JSON string), so the
driver never holds pixels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from pipelines.data.validate import BadSegmentation, clean_polygon, clean_segmentation, finite_number
from pipelines.storage import read_bytes, resolve

META_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("anns", pa.string()),  # JSON list of validated annotations of this image
])


@dataclass
class CocoIndex:
    """A parsed, validated annotation file.

    ``categories``: ``[{"id", "name", "label"}]`` with labels 1..K in order of COCO id;
    ``tables``: per-image metadata in chunks (META_SCHEMA); ``quarantined`` / ``dropped``: what was
    rejected here and why; ``num_clipped``: boxes clipped to their image.
    """

    categories: list[dict]
    tables: list[pa.Table]
    quarantined: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    num_clipped: int = 0
    num_images: int = 0


def load_json(annotations) -> dict:
    """The parsed COCO file at ``annotations`` (local path or URI), with a clear error if it is not one."""
    fs, path = resolve(annotations)
    try:
        raw = read_bytes(fs, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {annotations}") from None
    except IsADirectoryError:
        raise ValueError(f"{annotations} is a folder; expected a COCO instances JSON file "
                         "(e.g. annotations/instances_train2017.json)") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{annotations} is not valid JSON ({e}); expected a COCO instances file") from None
    del raw
    if not isinstance(data, dict):
        raise ValueError(f"{annotations}: expected a JSON object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{annotations}: missing or not a list: {', '.join(missing)}; "
                         "expected a COCO instances file with 'images', 'annotations' and 'categories'")
    return data


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a JSON string may hold a lone surrogate, which does not)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _int64(v) -> bool:
    """An integer (not true/false) within the shard's int64 id columns."""
    return type(v) is int and -2 ** 63 <= v < 2 ** 63


def category_map(categories: list[dict], source="annotations") -> list[dict]:
    """``[{"id", "name", "label"}]``: labels 1..K given in order of COCO id."""
    seen = {}
    for c in categories:
        if not isinstance(c, dict) or not _int64(c.get("id")):
            raise ValueError(f"{source}: every category needs an integer 'id' (64-bit), got {c!r}")
        if c["id"] in seen:
            raise ValueError(f"{source}: category id {c['id']} appears twice")
        seen[c["id"]] = str(c.get("name", c["id"]))
    return [{"id": cid, "name": seen[cid], "label": i + 1} for i, cid in enumerate(sorted(seen))]


def build_index(annotations, chunk_images: int = 256) -> CocoIndex:
    """Parse and validate the COCO file ``annotations``; return a :class:`CocoIndex`.

    Images: a missing/invalid size quarantines the image; an id listed again for the same file keeps the first
    entry; an id listed for two files quarantines both and drops its annotations (which name the id only: they
    went to the first file listed, boxes of another picture). Annotations: an unknown
    image or category, a malformed/zero-area box or a broken segmentation (``validate.py``) drops the
    annotation (with its reason); a box past the image edge is clipped to it, polygons past it are
    clipped too. Images without annotations are kept.
    """
    data = load_json(annotations)
    categories = category_map(data["categories"], annotations)
    label_of = {c["id"]: c["label"] for c in categories}
    index = CocoIndex(categories=categories, tables=[])

    images: dict[int, dict] = {}
    order: list[int] = []
    twice: dict[int, str] = {}  # image ids listed more than once -> the reason
    for im in data["images"]:
        iid = im.get("id") if isinstance(im, dict) else None
        name = im.get("file_name") if isinstance(im, dict) else None
        w, h = (im.get("width"), im.get("height")) if isinstance(im, dict) else (None, None)
        reason = None
        # Ranges of the shard's Arrow columns (int64 id, int32 sizes): a value past them stopped the whole
        # ingest in the conversion; true/false are not integers here.
        if not _int64(iid) or not isinstance(name, str) or not name:
            reason = "image entry needs an integer 'id' (64-bit) and a 'file_name'"
        elif not _utf8(name):  # a lone surrogate ("\ud800"): JSON allows it, Arrow and the file system do not
            reason = f"file_name {ascii(name)} is not valid Unicode text (a lone surrogate)"
            name = ascii(name)
        elif iid in images:
            first = images[iid]
            if (first["file_name"], first["width"], first["height"]) == (name, w, h) and iid not in twice:
                reason = f"duplicate image id {iid} (the same file listed again; the first entry is kept)"
            else:
                reason = twice.setdefault(iid, f"duplicate image id {iid} ({first['file_name']!r} and {name!r}): "
                                               "its annotations cannot be told apart, so no image of it is ingested")
        elif not (type(w) is int and type(h) is int and 0 < w < 2 ** 31 and 0 < h < 2 ** 31):
            reason = f"width/height must be positive integers below 2**31, got {w!r}x{h!r}"
        if reason:
            index.quarantined.append({"file_name": name, "image_id": iid, "reason": reason})
            continue
        images[iid] = {"file_name": name, "width": w, "height": h, "anns": []}
        order.append(iid)
    for iid, reason in twice.items():
        first = images.pop(iid)
        order.remove(iid)
        index.quarantined.append({"file_name": first["file_name"], "image_id": iid, "reason": reason})

    for ann in data["annotations"]:
        aid = ann.get("id") if isinstance(ann, dict) else None
        iid = ann.get("image_id") if isinstance(ann, dict) else None

        def drop(reason, aid=aid, iid=iid):
            index.dropped.append({"annotation_id": aid, "image_id": iid, "reason": reason})

        if not isinstance(ann, dict):
            drop(f"annotation must be an object, got {type(ann).__name__}")
            continue
        if type(iid) is not int or iid not in images:  # type first: a list is not hashable
            drop(f"image_id {iid} is listed twice" if iid in twice else f"unknown image_id {iid!r}")
            continue
        cid = ann.get("category_id")
        if type(cid) is not int or cid not in label_of:
            drop(f"unknown category_id {cid!r}")
            continue
        im = images[iid]
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(finite_number(v) for v in bbox)):
            drop(f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            drop(f"degenerate box (width {bw:g}, height {bh:g})")
            continue
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + bw, float(im["width"])), min(y + bh, float(im["height"]))
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            drop(f"box [{x:g}, {y:g}, {bw:g}, {bh:g}] lies outside the {im['width']}x{im['height']} image")
            continue
        if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
            index.num_clipped += 1
        try:  # checked and clipped here, so that nothing unchecked reaches pycocotools' C code
            seg = clean_segmentation(ann.get("segmentation"), im["height"], im["width"])
            # Without a segmentation the ingest task encodes the box as its mask, checked there the same way:
            # a box too small to have an area as a polygon (1e-200 wide) would quarantine the whole image.
            if seg is None and clean_polygon([x1, y1, x2, y1, x2, y2, x1, y2], im["height"], im["width"]) is None:
                raise BadSegmentation(f"box [{x:g}, {y:g}, {bw:g}, {bh:g}] has no area as a mask")
        except BadSegmentation as e:
            drop(str(e))
            continue
        area = ann.get("area")
        im["anns"].append({
            "category_id": cid, "label": label_of[cid], "box": [x1, y1, x2, y2],
            "iscrowd": 1 if ann.get("iscrowd") else 0,
            # COCOeval ignores a ground truth whose area lies outside [0, 1e10] in every area range: a
            # negative or absurd one is computed from the mask instead, like a missing one
            "area": float(area) if finite_number(area) and 0 <= area <= im["width"] * im["height"] else None,
            "segmentation": seg,
        })
    del data

    index.num_images = len(order)
    for start in range(0, len(order), chunk_images):
        ids = order[start:start + chunk_images]
        rows = [images.pop(i) for i in ids]  # pop: the driver keeps one copy, in Arrow
        index.tables.append(pa.table({
            "image_id": pa.array(ids, pa.int64()),
            "file_name": pa.array([r["file_name"] for r in rows], pa.string()),
            "width": pa.array([r["width"] for r in rows], pa.int32()),
            "height": pa.array([r["height"] for r in rows], pa.int32()),
            "anns": pa.array([json.dumps(r["anns"]) for r in rows], pa.string()),
        }, schema=META_SCHEMA))
    return index
