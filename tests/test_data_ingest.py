"""COCO ingestion: shards and manifest from the shapes set, and every validation case on a handmade set."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data import ingest, load_split, read_coco
from pipelines.data.schema import SHARD_SCHEMA

CATS = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]


def _save(img: Image.Image, path, fmt, **kw):
    img.save(path, format=fmt, **kw)
    return path.name


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A COCO split with one of every problem the validator must handle, and good images around them."""
    root = tmp_path_factory.mktemp("messy")
    imgs = root / "images"
    imgs.mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    files = {
        1: _save(rgb, imgs / "good.jpg", "JPEG"),
        2: "missing.jpg",
        3: "garbage.jpg",
        4: "truncated.jpg",
        5: _save(rgb.convert("L"), imgs / "gray.jpg", "JPEG"),
        6: _save(rgb.convert("RGBA"), imgs / "rgba.png", "PNG"),
        7: _save(rgb.convert("CMYK"), imgs / "cmyk.jpg", "JPEG"),
        8: _save(rgb, imgs / "no_anns.jpg", "JPEG"),
        9: _save(rgb, imgs / "rgb.png", "PNG"),
        10: _save(rgb.resize((30, 30)), imgs / "wrong_size.jpg", "JPEG"),
    }
    (imgs / "garbage.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    (imgs / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    images = [{"id": i, "file_name": f, "width": 50, "height": 40} for i, f in files.items()]
    images.append({"id": 11, "file_name": "no_size.jpg"})
    images.append({"id": 1, "file_name": "good.jpg", "width": 50, "height": 40})  # duplicate id
    # Past the shard columns' ranges (int64 ids, int32 sizes), or not integers: each stopped the whole ingest.
    images.append({"id": 12, "file_name": "good.jpg", "width": 2 ** 31, "height": 40})
    images.append({"id": 2 ** 63, "file_name": "good.jpg", "width": 50, "height": 40})
    images.append({"id": True, "file_name": "good.jpg", "width": 50, "height": 40})
    crowd = np.zeros((40, 50), bool)
    crowd[5:15, 20:35] = True
    flat = crowd.ravel(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])).tolist()
    poly = [[10, 10, 30, 10, 30, 30, 10, 30]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "segmentation": poly,
         "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [40, 30, 30, 30], "iscrowd": 0,  # past the edge
         "segmentation": [[40, 30, 70, 30, 70, 60, 40, 60]], "area": 900},
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [19, 4, 17, 12], "iscrowd": 1, "area": 150,
         "segmentation": {"counts": runs, "size": [40, 50]}},
        {"id": 4, "image_id": 1, "category_id": 77, "bbox": [1, 1, 5, 5], "segmentation": poly, "iscrowd": 0},
        {"id": 5, "image_id": 999, "category_id": 5, "bbox": [1, 1, 5, 5], "segmentation": poly, "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0, 8], "segmentation": poly, "iscrowd": 0},
        {"id": 7, "image_id": 1, "category_id": 5, "bbox": [60, 50, 5, 5], "segmentation": poly, "iscrowd": 0},
        {"id": 8, "image_id": 1, "category_id": 5, "bbox": [1, 1, "x", 5], "iscrowd": 0},
        {"id": 9, "image_id": 5, "category_id": 5, "bbox": [2, 2, 10, 10], "iscrowd": 0},  # no segmentation
        {"id": 10, "image_id": 2, "category_id": 5, "bbox": [2, 2, 10, 10], "segmentation": poly, "iscrowd": 0},
        {"id": 11, "image_id": 7, "category_id": 9, "bbox": [2, 2, 10, 10], "segmentation": [[1, 2]],
         "iscrowd": 0},
    ]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return ann_file, imgs


@pytest.fixture(scope="module")
def messy_ingested(ray_cluster, messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_out")
    manifest = ingest(*messy, out)
    rows = {r["image_id"]: r for r in pq.read_table(out).to_pylist()}
    return manifest, rows, out


def test_bad_images_are_quarantined_with_reasons(messy_ingested):
    manifest, rows, out = messy_ingested
    reasons = {q["image_id"]: q["reason"] for q in manifest["quarantined"]}
    assert reasons[2].startswith("missing")
    assert reasons[3].startswith("not decodable")
    assert reasons[4].startswith("truncated")
    assert "size mismatch" in reasons[10] and "50x40" in reasons[10]
    assert "width/height" in reasons[11] and "below 2**31" in reasons[12]
    assert "64-bit" in reasons[2 ** 63] and "64-bit" in reasons[True]  # (True == 1: the duplicate's key too)
    assert any("duplicate image id 1" in q["reason"] for q in manifest["quarantined"])
    assert set(rows) == {1, 5, 6, 7, 8, 9}  # the good ones all made it through
    assert manifest["num_images"] == 6
    assert json.loads((out / "_manifest.json").read_text()) == manifest


def test_bad_annotations_are_dropped_and_reported(messy_ingested):
    manifest, rows, _ = messy_ingested
    dropped = {d["annotation_id"]: d["reason"] for d in manifest["dropped"]}
    assert "unknown category_id 77" in dropped[4]
    assert "unknown image_id 999" in dropped[5]
    assert "degenerate" in dropped[6]
    assert "outside" in dropped[7]
    assert "bbox" in dropped[8]
    assert "polygon" in dropped[11]
    assert 10 not in dropped  # its image is quarantined, which the manifest already says
    assert manifest["num_instances"] == 4  # ids 1, 2, 3 on image 1 and id 9 on image 5


def test_boxes_clipped_labels_contiguous_masks_compressed(messy_ingested):
    manifest, rows, _ = messy_ingested
    assert manifest["categories"] == [{"id": 5, "name": "a", "label": 1}, {"id": 9, "name": "b", "label": 2}]
    r = rows[1]
    np.testing.assert_allclose(r["boxes"], [[10, 10, 30, 30], [40, 30, 50, 40], [19, 4, 36, 16]])
    assert manifest["num_clipped_boxes"] == 1
    assert r["category_ids"] == [5, 9, 9] and r["labels"] == [1, 2, 2] and r["iscrowd"] == [0, 0, 1]
    for seg in r["segmentation"]:
        assert isinstance(seg["counts"], str) and seg["size"] == [40, 50]
    masks = [mask_utils.decode({"size": s["size"], "counts": s["counts"].encode()}) for s in r["segmentation"]]
    assert masks[0][10:30, 10:30].all() and masks[0].sum() <= 21 * 21
    assert masks[1][30:40, 40:50].all() and masks[1].sum() == 100  # clipped to the image
    assert masks[2].sum() == 150 and masks[2][5:15, 20:35].all()  # uncompressed RLE -> compressed
    # No segmentation: the box stands in for the mask.
    assert mask_utils.decode({"size": [40, 50], "counts": rows[5]["segmentation"][0]["counts"].encode()}).sum() > 0
    assert rows[8]["boxes"] == [] and rows[8]["labels"] == []  # images without annotations are kept


def test_everything_is_rgb(messy_ingested, messy):
    manifest, rows, _ = messy_ingested
    for iid, r in rows.items():
        with Image.open(io.BytesIO(r["image"])) as im:
            assert im.mode == "RGB" and im.size == (50, 40), iid
    assert manifest["converted_to_rgb"] == {"JPEG L -> RGB": 1, "PNG RGBA -> RGB": 1, "JPEG CMYK -> RGB": 1}
    # RGB JPEG and PNG keep their bytes; converted images are re-encoded losslessly (PNG).
    assert rows[1]["image"] == (messy[1] / "good.jpg").read_bytes()
    assert rows[9]["image"] == (messy[1] / "rgb.png").read_bytes()
    gray = np.asarray(Image.open(messy[1] / "gray.jpg"))
    with Image.open(io.BytesIO(rows[5]["image"])) as im:
        assert im.format == "PNG"
        decoded = np.asarray(im)
    assert (decoded == gray[..., None]).all()


def test_synth_shards_and_manifest(data_dir, synth_dir):
    coco = json.loads((synth_dir / "annotations" / "instances_train.json").read_text())
    ds, manifest = load_split(data_dir, "train")
    assert manifest["num_images"] == len(coco["images"]) == ds.count()
    assert manifest["num_instances"] == len(coco["annotations"])
    assert manifest["quarantined"] == [] and manifest["dropped"] == []
    assert [c["id"] for c in manifest["categories"]] == sorted(c["id"] for c in coco["categories"])
    assert [c["label"] for c in manifest["categories"]] == list(range(1, len(coco["categories"]) + 1))
    table = pq.read_table(data_dir / "train")
    assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
    # The original JPEG bytes are kept, not re-encoded.
    by_name = {r["file_name"]: r["image"] for r in table.select(["file_name", "image"]).to_pylist()}
    name = coco["images"][0]["file_name"]
    assert by_name[name] == (synth_dir / "train" / name).read_bytes()
    iscrowd = [c for row in table["iscrowd"].to_pylist() for c in row]
    assert sum(iscrowd) == sum(a["iscrowd"] for a in coco["annotations"]) > 0
    val_manifest = json.loads((data_dir / "val" / "_manifest.json").read_text())
    assert val_manifest["categories"] == manifest["categories"]  # same label map in both splits


def test_read_coco_rows_and_reingest_replaces(ray_cluster, messy, tmp_path):
    rows = read_coco(*messy).take_all()
    assert sorted(r["image_id"] for r in rows) == [1, 5, 6, 7, 8, 9]
    out = tmp_path / "again"
    out.mkdir()
    (out / "part-99999-0bad0bad.parquet").write_bytes(b"stale")
    manifest = ingest(*messy, out)
    assert not (out / "part-99999-0bad0bad.parquet").exists()
    assert sorted(p.name for p in out.glob("*.parquet")) == manifest["shards"]


def test_clear_errors_for_bad_inputs(ray_cluster, tmp_path, messy):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        ingest(tmp_path / "nope.json", tmp_path, tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations, categories"):
        ingest(bad, tmp_path, tmp_path / "o")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ingest(bad, tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        ingest(messy[0], tmp_path / "no_images", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no split 'test'"):
        load_split(tmp_path, "test")


def test_ingest_command(ray_cluster, messy, tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "cli"
    assert main(["ingest", "--annotations", str(messy[0]), "--images", str(messy[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.splitlines()[0])
    assert summary["num_images"] == 6 and summary["quarantined"] == 9 and "truncated" in printed
    assert main(["ingest", "--annotations", str(tmp_path / "x.json"), "--images", str(messy[1]),
                 "--out", str(out)]) == 2
