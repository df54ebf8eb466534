"""`visionflow predict`: a checkpoint on image files and folders, in-process and on Ray Data, writing
overlays and a COCO results JSON that pycocotools' ``loadRes`` takes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pipelines.cli import main


def _checkpoint(run_dir, arch: str, task: str, categories: list[dict], image_size: int = 96):
    """A run directory as `visionflow train` leaves it (random weights)."""
    from vision.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, len(categories))
    config = {"task": task, "arch": arch, "num_classes": len(categories), "categories": categories,
              "data": "unused", "out": str(run_dir), "image_size": image_size}
    path = run_dir / "checkpoints" / "epoch_0000" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "config": config}, path)
    return run_dir


@pytest.fixture(scope="module")
def categories(synth_dir):
    doc = json.loads((synth_dir / "annotations" / "instances_val.json").read_text())
    return [{"id": c["id"], "name": c["name"], "label": i} for i, c in enumerate(doc["categories"], start=1)]


def _load_res(synth_dir, preds_path):
    gt = COCO(str(synth_dir / "annotations" / "instances_val.json"))
    preds = json.loads(preds_path.read_text())
    assert preds, "a random detector at score 0 finds something"
    return gt, preds, gt.loadRes(str(preds_path))


def test_segmenter_on_files_in_process_writes_overlays_and_coco_results(tmp_path, synth_dir, categories, capsys):
    ckpt = _checkpoint(tmp_path / "run", "maskrcnn_resnet18_fpn", "segmentation", categories)
    files = sorted((synth_dir / "val").glob("*.jpg"))[:3]
    out = tmp_path / "out"
    assert main(["predict", *map(str, files), "--checkpoint", str(ckpt), "--out", str(out),
                 "--annotations", str(synth_dir / "annotations" / "instances_val.json"),
                 "--score-threshold", "0", "--max-detections", "5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine"] == "in-process" and summary["images"] == 3 and summary["overlays"] == 3
    gt, preds, res = _load_res(synth_dir, out / "predictions.json")
    # The dataset's own image ids and category ids, xywh boxes, RLE masks of each image's size.
    ids = {im["id"] for im in gt.loadImgs(gt.getImgIds()) if im["file_name"] in {f.name for f in files}}
    assert {p["image_id"] for p in preds} <= ids and len(ids) == 3
    assert {p["category_id"] for p in preds} <= {c["id"] for c in categories}
    for p in preds:
        im = gt.loadImgs(p["image_id"])[0]
        assert p["segmentation"]["size"] == [im["height"], im["width"]]
        assert p["bbox"][2] >= 0 and p["bbox"][3] >= 0
    assert len(res.getAnnIds()) == len(preds)
    for f in (out / "overlays").glob("*.png"):
        with Image.open(f) as img:
            assert img.size == (576, 576)  # 96 px drawn at 6x: its labels readable (pipelines/overlays.py)


def test_detector_on_a_folder_runs_on_ray_data_with_the_same_answers(ray_cluster, tmp_path, synth_dir,
                                                                      categories, capsys):
    ckpt = _checkpoint(tmp_path / "run", "ssdlite_mobilenet_v3", "detection", categories)
    ann = str(synth_dir / "annotations" / "instances_val.json")
    common = ["--checkpoint", str(ckpt), "--annotations", ann, "--score-threshold", "0.05", "--no-overlays"]
    assert main(["predict", str(synth_dir / "val"), "--out", str(tmp_path / "ray"), "--in-process-max", "0",
                 "--batch-size", "4", *common]) == 0
    on_ray = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", str(synth_dir / "val" / "*.jpg"), "--out", str(tmp_path / "local"),
                 "--in-process-max", "1000", "--batch-size", "4", *common]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = len(list((synth_dir / "val").glob("*.jpg")))
    assert on_ray["engine"] == "ray-data" and local["engine"] == "in-process"
    assert on_ray["images"] == local["images"] == n
    gt, ray_preds, _ = _load_res(synth_dir, tmp_path / "ray" / "predictions.json")
    local_preds = json.loads((tmp_path / "local" / "predictions.json").read_text())
    key = lambda p: (p["image_id"], p["category_id"], round(p["score"], 3))  # noqa: E731
    assert sorted(map(key, ray_preds)) == sorted(map(key, local_preds))


def test_classifier_writes_top_k_and_bad_files_are_skipped_with_a_reason(tmp_path, synth_dir, categories, capsys):
    ckpt = _checkpoint(tmp_path / "run", "resnet18", "classification", categories, image_size=32)
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image")
    # A name with glob characters that exists is that file; a file over the byte cap is not read.
    good = tmp_path / "img[1].jpg"
    good.write_bytes(sorted((synth_dir / "val").glob("*.jpg"))[0].read_bytes())
    (tmp_path / "img1.jpg").write_bytes(b"what a glob would have matched")
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(64 * 1024 * 1024 + 1)  # sparse: no disk used
    out = tmp_path / "out"
    assert main(["predict", str(good), str(bad), str(huge), "--checkpoint", str(ckpt), "--out", str(out),
                 "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "notes.png" in captured.err and "not a JPEG or PNG" in captured.err
    assert "huge.jpg: too large: 67108865 bytes" in captured.err, captured.err
    (pred,) = json.loads((out / "predictions.json").read_text())
    assert pred["file_name"] == str(good) and len(pred["top_k"]) == 2
    assert pred["top_k"][0]["score"] >= pred["top_k"][1]["score"]
    assert {p["category_id"] for p in pred["top_k"]} <= {c["id"] for c in categories}


def test_inputs_each_once_never_its_own_output_and_a_bad_overlay_loses_nothing(tmp_path, synth_dir, categories,
                                                                               capsys):
    """A folder with two symlink loops, globbed with ``**`` (glob.glob followed them: 41 copies of each image with
    one loop, no end with two), named again as files and by a glob; predicted twice into a folder inside it (the
    rerun predicted the first run's overlays); a file whose name leaves no room for the overlay's prefix (the
    whole run failed, nothing written); an overlay folder that cannot be written; two files that match one
    image of ``--annotations``."""
    import os

    ckpt = _checkpoint(tmp_path / "run", "ssdlite_mobilenet_v3", "detection", categories)
    src = sorted((synth_dir / "val").glob("*.jpg"))[:2]
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    long_name = photos / ("\u00e9" * 125 + ".jpg")  # 254 bytes: a legal name
    long_name.write_bytes(src[0].read_bytes())
    (photos / "sub" / "b.jpg").write_bytes(src[1].read_bytes())
    os.symlink(".", photos / "self")
    os.symlink("..", photos / "sub" / "up")
    listing = subprocess.run([sys.executable, "-c", "import json, sys; from pipelines.predict import list_inputs; "
                              "print(json.dumps(list_inputs(sys.argv[1:])))", f"{photos}/**/*.jpg", str(photos),
                              str(photos / "sub" / "b.jpg"), f"{photos}/./sub/b.jpg"],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert sorted(json.loads(listing.stdout)) == sorted([str(long_name), str(photos / "sub" / "b.jpg")])

    out = photos / "predictions"
    common = ["--checkpoint", str(ckpt), "--score-threshold", "0", "--max-detections", "3"]
    for _ in range(2):
        assert main(["predict", str(photos), "--out", str(out), *common]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["images"] == 2 and summary["overlays"] == 2 and summary["overlay_errors"] == 0, summary
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert {im["file_name"] for im in json.loads((out / "images.json").read_text())["images"]} == \
        {str(long_name), str(photos / "sub" / "b.jpg")}

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "overlays").write_text("a file where the overlay folder goes")
    assert main(["predict", str(long_name), str(photos / "sub" / "b.jpg"), "--out", str(blocked), *common]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["images"] == 2 and summary["overlays"] == 0 and summary["overlay_errors"] == 2, summary
    assert "no overlay for" in captured.err and json.loads((blocked / "predictions.json").read_text())

    ann = synth_dir / "annotations" / "instances_val.json"
    twin = tmp_path / "copy" / src[0].name
    twin.parent.mkdir()
    twin.write_bytes(src[0].read_bytes())
    assert main(["predict", str(src[0]), str(twin), "--out", str(tmp_path / "twins"), "--annotations", str(ann),
                 *common]) == 2
    assert "both match image" in capsys.readouterr().err


def test_bad_arguments_get_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing-here"), "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or folder" in err[0]
    for flag, value in (("--batch-size", "0"), ("--max-detections", "-1"), ("--top-k", "-1"), ("--actors", "0")):
        with pytest.raises(SystemExit) as e:  # argparse's usage error: exit 2 before anything is read
            main(["predict", str(tmp_path), "--checkpoint", str(tmp_path), flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag}: must be an integer >=" in err, err


def test_a_users_console_shows_no_library_warning_while_overlays_are_drawn(tmp_path, synth_dir, categories):
    """`visionflow predict` as a user runs it, in a process of its own (torch prints its warning about a
    read-only array once per process): its console has the progress and the summary, no warning."""
    ckpt = _checkpoint(tmp_path / "run", "ssdlite_mobilenet_v3", "detection", categories)
    image = sorted((synth_dir / "val").glob("*.jpg"))[0]
    proc = subprocess.run([sys.executable, "-m", "pipelines", "predict", str(image), "--checkpoint", str(ckpt),
                           "--out", str(tmp_path / "out"), "--score-threshold", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["overlays"] == 1
