"""Hostile input to ingest: segmentations that would crash pycocotools, file names that leave the images
folder, files over the byte or pixel caps, 16-bit and EXIF-rotated images. Real files, real pycocotools,
the session's Ray cluster."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data import ingest
from pipelines.data.image_decode import TooManyPixels, open_image
from vision.transforms import decode_image  # what the task views decode shard bytes with

CATS = [{"id": 1, "name": "thing"}]
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 255, (40, 50, 3), dtype=np.uint8)


def _jpeg(path, arr=PIXELS, **kw):
    Image.fromarray(arr).save(path, "JPEG", **kw)
    return path.name


def _split(root, images, anns=()):
    """Write ``root/instances.json`` (Python's json: NaN and Infinity are written as such)."""
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": list(anns), "categories": CATS}))
    return ann_file


def _rows(out):
    return {r["image_id"]: r for r in pq.read_table(out).to_pylist()}


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A PNG with 16-bit samples (PIL cannot write 16-bit RGB): ``arr`` uint16 HxW (type 0) or HxWx3 (2)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    h, w = arr.shape[:2]
    big = arr.astype(">u2")
    raw = b"".join(b"\0" + big[y].tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --- 1. segmentations that would crash pycocotools' C code -------------------------------------------

def test_hostile_segmentations_are_dropped_before_pycocotools(ray_cluster, tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    images = [{"id": 1, "file_name": _jpeg(imgs / "a.jpg"), "width": 50, "height": 40},
              {"id": 2, "file_name": _jpeg(imgs / "b.jpg"), "width": 50, "height": 40}]
    good = [[10, 10, 30, 10, 30, 30, 10, 30]]
    box = [0, 0, 50, 40]
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 20:35] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    wider = mask_utils.encode(np.asfortranarray(np.zeros((40, 60), np.uint8)))["counts"].decode()
    segs = {
        10: good,
        11: [[0, 0, 4e7, 0, 4e7, 4e7]],                          # huge: clipped to the image, kept
        12: [[10, 10, 20, 10, 20, 20], [1, float("nan"), 3, 4, 5, 6]],  # a NaN among the points
        13: [[10, 10, 20, 10, 20, 20, 5]],                       # odd count
        14: [[1e6, 1e6, 2e6, 1e6, 2e6, 2e6]],                    # nothing left inside the image
        15: [[0, 0, float("inf"), 0, 5, 5]],
        16: {"size": [40, 50], "counts": [5, 10**9]},            # uncompressed RLE: sum != h*w
        17: {"size": [40, 50], "counts": [-5, 2005]},            # negative run
        18: {"size": [41, 50], "counts": [2050]},                # size is not the image's
        19: {"size": [40, 50], "counts": 12345},                 # compressed RLE: not a string
        20: {"size": [40, 50], "counts": wider},                 # valid string, runs for 40x60
        21: {"size": [40, 50], "counts": compressed},            # fine
        22: [[10, 10, 30, 10, 30, 30, 10, 30], [5, 5, 10, 5, "x", 10]],
        23: [[0, 0, 1e308, 0, 1e308, 1e308]],                    # clipping overflows to NaN
    }
    anns = [{"id": aid, "image_id": 1, "category_id": 1, "bbox": box, "segmentation": s, "iscrowd": 0}
            for aid, s in segs.items()]
    anns.append({"id": 30, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10], "segmentation": good,
                 "iscrowd": 0})
    # No segmentation: the box is the mask, and this one has no area as a polygon (it quarantined image 2).
    anns.append({"id": 31, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1e-200, 1e-200], "iscrowd": 0})
    ann_file = _split(tmp_path, images, anns)
    assert "NaN" in ann_file.read_text() and "Infinity" in ann_file.read_text()

    manifest = ingest(ann_file, imgs, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    dropped = {d["annotation_id"]: d["reason"] for d in manifest["dropped"]}
    assert set(dropped) == {12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 31}
    assert "inside the image" in dropped[23] and "no area as a mask" in dropped[31]
    assert "non-finite" in dropped[12] and "non-finite" in dropped[15]
    assert "odd number" in dropped[13]
    assert "inside the image" in dropped[14]
    assert "add up to" in dropped[16] and "add up to" in dropped[20]
    assert "non-negative" in dropped[17]
    assert "does not match the image" in dropped[18]
    assert "list or a string" in dropped[19]
    assert "list of numbers" in dropped[22]
    # The image and its other instances stay.
    assert manifest["quarantined"] == [] and set(rows) == {1, 2}
    assert manifest["num_instances"] == 4 and len(rows[1]["segmentation"]) == 3
    masks = [mask_utils.decode({"size": s["size"], "counts": s["counts"].encode()}) for s in rows[1]["segmentation"]]
    huge = masks[1]  # the 4e7 triangle clipped: the part of the image where y <= x
    assert huge[2, 45] and huge[30, 45] and not huge[35, 5] and not huge[20, 10]
    assert abs(int(huge.sum()) - (50 * 40 - 40 * 40 / 2)) < 60
    assert (masks[2] == mask).all()


def test_a_compressed_rle_that_c_would_read_otherwise_is_refused():
    """Runs of more than six characters overflow pycocotools' 32-bit shift: Python's reading of this string
    adds up to the image (0, 9000, 0, 1000 on 100 x 100) while pycocotools' covers 17,992 pixels of it."""
    from pipelines.data.validate import BadSegmentation, check_rle, rle_string_counts

    hostile = {"size": [100, 100], "counts": "0Xi80PVhoooO"}
    assert mask_utils.area({"size": [100, 100], "counts": hostile["counts"].encode()}) == 17992  # why
    with pytest.raises(BadSegmentation, match="longer than 6 characters"):
        check_rle(hostile, 100, 100)
    whole = mask_utils.encode(np.asfortranarray(np.ones((100, 100), np.uint8)))["counts"].decode()
    assert rle_string_counts(whole) == [0, 10000] and check_rle({"size": [100, 100], "counts": whole}, 100, 100)


# --- 2. file names that leave the images folder, byte and pixel caps ---------------------------------

def test_file_names_outside_the_images_root_and_unsafe_formats_are_quarantined(ray_cluster, tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    secret = tmp_path / "secret.jpg"  # a real image, outside the images folder
    _jpeg(secret)
    _jpeg(imgs / "inside.jpg")
    (imgs / "link_out.jpg").symlink_to(secret)
    (imgs / "link_in.jpg").symlink_to(imgs / "inside.jpg")
    (imgs / "sub").mkdir()
    Image.new("RGB", (50, 40)).save(imgs / "postscript.eps", "EPS")  # PIL would hand it to Ghostscript
    names = {1: "inside.jpg", 2: "../secret.jpg", 3: str(secret), 4: "link_out.jpg", 5: "link_in.jpg",
             6: "sub/../inside.jpg", 7: "sub/../../secret.jpg", 8: "postscript.eps"}
    images = [{"id": i, "file_name": n, "width": 50, "height": 40} for i, n in names.items()]
    manifest = ingest(_split(tmp_path, images), imgs, tmp_path / "out")
    reasons = {q["image_id"]: q["reason"] for q in manifest["quarantined"]}
    assert reasons.pop(8) == "not decodable: not a recognised image format"  # refused from its header
    assert set(reasons) == {2, 3, 4, 7}
    assert all(r.startswith("outside images root") for r in reasons.values()), reasons
    assert set(_rows(tmp_path / "out")) == {1, 5, 6}


def test_object_store_names_may_not_climb_out():
    import pyarrow.fs as pafs

    from pipelines.data.image_files import OutsideRoot, image_path

    remote = pafs.SubTreeFileSystem("/data", pafs.LocalFileSystem())  # not local paths: the URI rules
    assert image_path(remote, "bucket/coco", "train/a.jpg") == "bucket/coco/train/a.jpg"
    for name in ("../x.jpg", "train/../../x.jpg", "/etc/x.jpg", "s3://other/x.jpg", "..\\x.jpg"):
        with pytest.raises(OutsideRoot, match="outside images root"):
            image_path(remote, "bucket/coco", name)


def test_byte_cap_and_pixel_limit(ray_cluster, tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    small = _jpeg(imgs / "small.jpg", PIXELS[:8, :8].copy())
    big = _jpeg(imgs / "big.jpg")
    # A 10000 x 5000 PNG header with truncated pixel data: the header alone must refuse it (a decode
    # first would report it truncated).
    buf = io.BytesIO()
    Image.new("1", (10000, 5000)).save(buf, "PNG")
    (imgs / "bomb.png").write_bytes(buf.getvalue()[:200])
    images = [{"id": 1, "file_name": small, "width": 8, "height": 8},
              {"id": 2, "file_name": big, "width": 50, "height": 40},
              {"id": 3, "file_name": "bomb.png", "width": 10000, "height": 5000}]
    cap = (imgs / "big.jpg").stat().st_size - 1
    assert (imgs / "small.jpg").stat().st_size <= cap
    manifest = ingest(_split(tmp_path, images), imgs, tmp_path / "out", max_image_bytes=cap, max_pixels=1_000_000)
    reasons = {q["image_id"]: q["reason"] for q in manifest["quarantined"]}
    assert set(reasons) == {2, 3} and manifest["num_images"] == 1
    assert "max_image_bytes" in reasons[2] and str(cap) in reasons[2]
    assert reasons[3].startswith("too many pixels") and "10000x5000" in reasons[3]
    # The same cap from the command line.
    from pipelines.cli import main

    assert main(["ingest", "--annotations", str(tmp_path / "instances.json"), "--images", str(imgs),
                 "--out", str(tmp_path / "cli"), "--max-image-bytes", str(cap)]) == 0
    cli = json.loads((tmp_path / "cli" / "_manifest.json").read_text())
    assert {q["image_id"]: q["reason"] for q in cli["quarantined"]}[2] == reasons[2]


# --- 5. 16-bit samples and EXIF orientation ----------------------------------------------------------

def _exif_jpeg(path, orientation: int):
    """A 50 x 40 JPEG (red top-left corner) whose EXIF says how to turn it for display."""
    arr = np.zeros((40, 50, 3), np.uint8)
    arr[...] = (0, 0, 200)
    arr[:10, :10] = (230, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, "JPEG", exif=exif, quality=95)
    return path.name


def test_open_image_scales_16_bit_and_applies_exif(tmp_path):
    gray = np.full((4, 5), 1000, np.uint16)
    for im in (Image.fromarray(gray),                                                   # I;16
               Image.frombytes("I;16B", (5, 4), gray.astype(">u2").tobytes()),          # I;16B
               Image.fromarray(gray.astype(np.int32))):                                 # I
        buf = io.BytesIO()
        im.save(buf, "TIFF")
        rgb = open_image(buf.getvalue(), max_pixels=100)
        assert rgb.mode == "RGB" and (np.asarray(rgb) == 3).all(), im.mode
    assert (np.asarray(open_image(_png16(gray, 0), 100)) == 3).all()
    rgb16 = np.zeros((4, 5, 3), np.uint16)
    rgb16[...] = (1000, 65535, 256)
    assert (np.asarray(open_image(_png16(rgb16, 2), 100)) == (3, 255, 1)).all()
    upright = np.asarray(open_image((tmp_path / _exif_jpeg(tmp_path / "r.jpg", 6)).read_bytes(), 10_000))
    assert upright.shape == (50, 40, 3)  # orientation 6: turned 90 degrees clockwise for display
    assert upright[:8, -8:, 0].mean() > 200 and upright[:8, :8, 0].mean() < 30  # red corner now top-right
    with pytest.raises(TooManyPixels):
        open_image(_png16(gray, 0), max_pixels=19)


def test_ingest_stores_16_bit_and_rotated_images_as_8_bit_upright(ray_cluster, tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    (imgs / "gray16.png").write_bytes(_png16(np.full((40, 50), 1000, np.uint16), 0))
    rgb16 = np.zeros((40, 50, 3), np.uint16)
    rgb16[...] = (1000, 65535, 256)
    (imgs / "rgb16.png").write_bytes(_png16(rgb16, 2))
    images = [{"id": 1, "file_name": "gray16.png", "width": 50, "height": 40},
              {"id": 2, "file_name": "rgb16.png", "width": 50, "height": 40},
              # COCO gives the size the image is shown at: 40 wide, 50 high once turned.
              {"id": 3, "file_name": _exif_jpeg(imgs / "turned.jpg", 6), "width": 40, "height": 50},
              {"id": 4, "file_name": _exif_jpeg(imgs / "turned_wrong.jpg", 6), "width": 50, "height": 40}]
    anns = [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [30, 0, 10, 10], "iscrowd": 0,
             "segmentation": [[30, 0, 40, 0, 40, 10, 30, 10]]}]
    manifest = ingest(_split(tmp_path, images, anns), imgs, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert set(rows) == {1, 2, 3}
    assert "size mismatch" in manifest["quarantined"][0]["reason"] and "EXIF" in manifest["quarantined"][0]["reason"]
    views = {i: decode_image(rows[i]["image"]).permute(1, 2, 0).numpy() for i in rows}
    assert (views[1] == 3).all()  # 1000 >> 8, not clipped to 255
    assert (views[2] == (3, 255, 1)).all()
    for i in (1, 2, 3):
        with Image.open(io.BytesIO(rows[i]["image"])) as stored:
            assert stored.format == "PNG" and stored.mode == "RGB" and not stored.getexif().get(0x0112)
    turned = views[3]
    assert turned.shape == (50, 40, 3) and turned[:8, -8:, 0].mean() > 200 and turned[-8:, :8, 0].mean() < 30
    expected = np.asarray(open_image((imgs / "turned.jpg").read_bytes(), 10_000))
    assert (turned == expected).all()
    assert manifest["converted_to_rgb"] == {"PNG I;16 -> RGB, 16 -> 8 bits": 1, "PNG RGB -> RGB, 16 -> 8 bits": 1,
                                            "JPEG RGB -> RGB, EXIF orientation applied": 1}


def test_serve_decoder_is_the_shared_one(tmp_path):
    from pipelines.serve.errors import ApiError
    from pipelines.serve.images import decode_image as serve_decode

    assert (serve_decode(_png16(np.full((4, 5), 1000, np.uint16), 0), 100) == 3).all()
    assert serve_decode((tmp_path / _exif_jpeg(tmp_path / "r.jpg", 6)).read_bytes(), 10_000).shape == (50, 40, 3)
    with pytest.raises(ApiError) as e:
        serve_decode(_png16(np.zeros((40, 50), np.uint16), 0), 1999)
    assert e.value.status == 413 and "50x40" in e.value.message


def test_an_outline_pycocotools_would_walk_for_gigabytes_and_bad_text_and_areas_stop_at_the_index(tmp_path):
    """Without Ray: build_index refuses what would still hurt past the earlier checks, each with its reason,
    and keeps the rest. A star of 10,000 vertices, every other one 4,000 pixels out, in an 8192-pixel image (in
    bounds, finite, with an area: pycocotools would walk 36 M pixels of outline at 5 points each) drops its
    annotation; 5,000 vertices on a small circle (a short outline, measured) and an ordinary polygon pass. A
    file name with a lone surrogate (valid JSON, not valid text for Arrow or the file system) quarantines
    its image only; a negative or absurd area is left to be computed from the mask."""
    import math

    from pipelines.data.coco_index import build_index
    from pipelines.data.validate import OUTLINE_LIMIT, BadSegmentation, clean_segmentation

    star = [v for k in range(10_000) for v in (4096 + (4000 if k % 2 else 10) * math.cos(k * 2 * math.pi / 10_000),
                                                4096 + (4000 if k % 2 else 10) * math.sin(k * 2 * math.pi / 10_000))]
    with pytest.raises(BadSegmentation, match=rf"outline is 35,9\d\d,\d\d\d pixels long, over {OUTLINE_LIMIT} x"):
        clean_segmentation([star], 8192, 8192)
    circle = [v for k in range(5_000) for v in (100 + 50 * math.cos(k * 2 * math.pi / 5_000),
                                                  100 + 50 * math.sin(k * 2 * math.pi / 5_000))]
    assert len(clean_segmentation([circle], 480, 640)[0]) == 10_000
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    images = [{"id": 1, "file_name": "a.jpg", "width": 8192, "height": 8192},
              {"id": 2, "file_name": "\ud800.jpg", "width": 40, "height": 40},
              {"id": 3, "file_name": "c.jpg", "width": 40, "height": 40}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8192, 8000], "segmentation": [star]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": square,
             "area": -5.0},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": square,
             "area": 1e12},
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": square,
             "area": 400.0}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))  # "\ud800" escaped
    index = build_index(path)
    (bad,) = index.quarantined
    assert bad["image_id"] == 2 and "lone surrogate" in bad["reason"], bad
    assert [d["annotation_id"] for d in index.dropped] == [1], index.dropped
    assert "outline" in index.dropped[0]["reason"]
    rows = {r["image_id"]: json.loads(r["anns"]) for t in index.tables for r in t.to_pylist()}
    assert sorted(rows) == [1, 3]
    assert [a["area"] for a in rows[1]] == [None] and [a["area"] for a in rows[3]] == [None, 400.0]


_MASK_PEAK = """
import io, json
import numpy as np, pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils
from pipelines.data.views import augment_table

h, w, n = 3000, 4000, 120
buf = io.BytesIO()
Image.new("RGB", (w, h), (90, 120, 30)).save(buf, format="PNG")
boxes = [[30.0 * k, 20.0 * k, 30.0 * k + 200, 20.0 * k + 150] for k in range(n)]
rles = [{"size": r["size"], "counts": r["counts"].decode()}
        for r in mask_utils.frPyObjects(np.array([[x, y, x2 - x, y2 - y] for x, y, x2, y2 in boxes]), h, w)]
row = {"image_id": 1, "image": buf.getvalue(), "height": h, "width": w, "boxes": boxes,
       "labels": [1] * n, "iscrowd": [0] * n, "segmentation": rles}
table = pa.Table.from_pylist([row])
small = pa.Table.from_pylist([{**row, "image": buf.getvalue(), "boxes": boxes[:1], "labels": [1], "iscrowd": [0],
                               "segmentation": rles[:1]}])
augment_table(small, task="segmentation", size=96, train=True, seed=0)  # every import and kernel once


def mib(key):  # VmRSS: resident now; VmHWM: the peak since the reset below
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith(key))


for seed in (0, 1):  # the flip falls both ways
    open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak restarts from what is resident now
    before = mib("VmRSS")
    out = augment_table(table, task="segmentation", size=96, train=True, seed=seed)
    after = mib("VmHWM")
    print(json.dumps({"kept": len(out["masks"][0]), "shape": list(np.shape(out["masks"][0])),
                      "image": list(np.shape(out["image"][0])), "grew_mib": after - before}))
"""


def test_a_training_view_of_many_masks_on_a_big_image_decodes_them_one_at_a_time(tmp_path):
    """120 objects on a 4000 x 3000 image (ingest takes it: under its pixel limit, every polygon sane): the
    segmentation view decoded every mask at full size at once, 1.4 GB for this row (twice that with the
    flip), per augmentation task. It decodes, flips and resizes one mask at a time: the row's peak is the
    decoded image and a mask, whichever way the flip falls (two seeds)."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(_MASK_PEAK)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=os.getcwd(), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    for got in map(json.loads, run.stdout.splitlines()):
        assert got["kept"] == 120 and got["shape"] == [120, *got["image"][:2]], got
        assert got["grew_mib"] < 200, got  # all at once: over 1,400 MiB
    assert len(run.stdout.splitlines()) == 2, run.stdout


def test_an_image_id_given_to_two_files_keeps_neither_and_drops_their_annotations(tmp_path):
    """Without Ray. Two COCO files merged naively (each numbering its images from 1): the annotations name only the
    id, and all of them went to the first file, boxes of another picture. Both files are quarantined and their
    annotations dropped; the same file listed twice keeps its first entry and its annotations."""
    from pipelines.data.coco_index import build_index

    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 40},
              {"id": 1, "file_name": "b.jpg", "width": 40, "height": 40},
              {"id": 2, "file_name": "c.jpg", "width": 40, "height": 40},
              {"id": 2, "file_name": "c.jpg", "width": 40, "height": 40}]
    anns = [{"id": k, "image_id": iid, "category_id": 1, "bbox": [5, 5, 10, 10]} for k, iid in ((1, 1), (2, 1), (3, 2))]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    index = build_index(path)
    quarantined = sorted((q["image_id"], q["file_name"], q["reason"]) for q in index.quarantined)
    assert [q[:2] for q in quarantined] == [(1, "a.jpg"), (1, "b.jpg"), (2, "c.jpg")], quarantined
    assert "'a.jpg' and 'b.jpg'" in quarantined[0][2] and "the same file listed again" in quarantined[2][2]
    assert {d["annotation_id"]: d["reason"] for d in index.dropped} == {1: "image_id 1 is listed twice",
                                                                         2: "image_id 1 is listed twice"}
    rows = [r for t in index.tables for r in t.to_pylist()]
    assert [(r["image_id"], r["file_name"], len(json.loads(r["anns"]))) for r in rows] == [(2, "c.jpg", 1)]


def test_an_out_folder_holding_other_parquet_keeps_it_and_the_shards_are_staged_inside_it(tmp_path):
    """Without Ray, the commit protocol itself. ``--out`` on a folder of a Spark job's output: every
    ``part-*.parquet`` without a manifest was deleted, the user's data. Only ingest's own shard names are removed
    (a killed ingest's unlisted ones). The new shards are staged inside ``out`` (a sibling folder lies on the
    parent's filesystem: the rename into a mount point failed after the whole ingest)."""
    import pyarrow.fs as pafs

    from pipelines.data import split_commit

    out = tmp_path / "out"
    out.mkdir()
    theirs = ["part-00000-6d1f4f8e-1c1e-4b6b-9c7e-0d5e6f7a8b9c-c000.snappy.parquet", "part-7.parquet", "data.parquet"]
    for name in theirs:
        (out / name).write_bytes(b"someone else's")
    (out / "part-00003-0123abcd.parquet").write_bytes(b"a killed ingest's unlisted shard")
    fs = pafs.LocalFileSystem()
    stage = split_commit.begin(fs, str(out))
    assert os.path.dirname(stage) == str(out) and os.path.basename(stage).startswith(".tmp-")
    assert not (out / "part-00003-0123abcd.parquet").exists()
    (tmp_path / "stage_file").write_bytes(b"new")
    os.replace(tmp_path / "stage_file", os.path.join(stage, "part-00000-89abcdef.parquet"))
    split_commit.commit(fs, str(out), stage, {"shards": ["part-00000-89abcdef.parquet"]})
    assert sorted(p.name for p in out.iterdir()) == sorted([*theirs, "_manifest.json", "part-00000-89abcdef.parquet"])
    assert all((out / name).read_bytes() == b"someone else's" for name in theirs)


def test_annotations_given_as_a_folder_say_so(tmp_path):
    from pipelines.data.coco_index import load_json

    with pytest.raises(ValueError, match="is a folder; expected a COCO instances JSON file"):
        load_json(tmp_path)
