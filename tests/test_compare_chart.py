"""The overall comparison chart is readable at a glance: a panel per task, numbered points whose labels
never overlap, and a table beside each panel sorted by the task's metric."""
from __future__ import annotations

import io
import random

from PIL import Image

from pipelines.reports.compare import _ranked, chart, place_labels


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or a[0] >= b[2] or a[3] <= b[1] or a[1] >= b[3])


def test_labels_of_crowded_points_never_overlap():
    random.seed(1)
    w, h = 14.0, 11.0
    # 27 points, many on top of each other (models at chance with similar compute).
    pts = [(100 + random.choice([0, 1, 2, 40]), 200 + random.choice([0, 0.5, 1, 30])) for _ in range(27)]
    offsets = place_labels(pts, (w, h))
    boxes = []
    for (x, y), (ox, oy) in zip(pts, offsets):
        x0 = x + ox - (w if ox < 0 else 0 if ox > 0 else w / 2)
        y0 = y + oy - (h if oy < 0 else 0 if oy > 0 else h / 2)
        boxes.append((x0, y0, x0 + w, y0 + h))
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_one_panel_per_task_and_numbers_follow_the_metric():
    rows = [{"arch": f"c{i}", "task": "classification", "status": "done", "accuracy": 0.3 + i / 100,
             "metric": "top-1", "gflops": 1.0, "params": 1e6} for i in range(20)]
    rows += [{"arch": "d", "task": "detection", "status": "done", "accuracy": 0.5, "metric": "box AP",
              "gflops": 3.0, "params": 2e6},
             {"arch": "bad", "task": "detection", "status": "failed", "error": "boom"}]
    ranked = _ranked(rows, "classification", "top-1")
    assert [r["arch"] for r in ranked[:2]] == ["c19", "c18"]  # number 1 is the best
    png = chart(rows, None)
    img = Image.open(io.BytesIO(png))
    two_tasks = img.size
    one_task = Image.open(io.BytesIO(chart(rows[:20], None))).size
    assert two_tasks[1] > 1.6 * one_task[1], (two_tasks, one_task)  # a second panel below the first


def test_semantic_and_instance_segmenters_are_scored_by_their_own_metric(tmp_path):
    """DeepLabV3 and FCN have no mask AP: their rows carry mIoU (from eval/metrics.json or the last val
    record) and get a panel of their own, apart from Mask R-CNN's mask AP."""
    import json

    from pipelines.reports.compare import _panels, main_metric, markdown_table, summarize_run

    assert main_metric("segmentation", {"miou": 0.4, "pixel_acc": 0.9}, None) == ("miou", "mIoU")
    assert main_metric("segmentation", None, {"val_segm/AP": 0.1, "val_bbox/AP": 0.2}) == ("segm/AP", "mask AP")
    assert main_metric("segmentation", None, None) == ("segm/AP", "mask AP")
    assert main_metric("detection", {"bbox/AP": 0.3}, None) == ("bbox/AP", "box AP")

    rows = []
    for arch, metrics in (("deeplabv3_mobilenet_v3", {"miou": 0.42}),
                          ("maskrcnn_resnet18_fpn", {"segm/AP": 0.21})):
        run = tmp_path / arch
        (run / "eval").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"arch": arch, "task": "segmentation"}))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_images_per_s": 5.0}) + "\n")
        (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
        rows.append({**summarize_run(str(run)), "gflops": 1.0, "params": 1e6})
    assert [(r["metric"], r["accuracy"]) for r in rows] == [("mIoU", 0.42), ("mask AP", 0.21)]
    table = markdown_table(rows)
    assert "| deeplabv3_mobilenet_v3 | segmentation |" in table and "| mIoU | 0.420 |" in table and "| mask AP | 0.210 |" in table
    assert _panels(rows, ["segmentation"]) == [("segmentation", "mask AP"), ("segmentation", "mIoU")]
    two = Image.open(io.BytesIO(chart(rows, None))).size
    one = Image.open(io.BytesIO(chart(rows[:1], None))).size
    assert two[1] > 1.6 * one[1], (two, one)  # two panels, not one axis mixing mIoU and mask AP


def test_a_nan_or_missing_score_is_no_point_and_the_chart_is_still_drawn():
    """NaN passed the filter: it scrambled the ranking and made the y limits NaN (the chart raised, and
    comparison.png and comparison.json were never written); COCO's -1 (no ground truth) is no score either."""
    rows = [{"arch": a, "task": "detection", "status": "done", "accuracy": v, "metric": "box AP", "gflops": 2.0,
             "params": 1e6} for a, v in (("good", 0.4), ("nan", float("nan")), ("none", -1.0), ("ok", 0.2))]
    assert [r["arch"] for r in _ranked(rows, "detection", "box AP")] == ["good", "ok"]
    assert Image.open(io.BytesIO(chart(rows, None))).size[0] > 0


def test_an_inference_rate_from_the_trainings_validation_is_marked_as_such(tmp_path):
    """`visionflow eval` measures inference alone; a run without an evaluation has only its training's
    validation pass (batched, beside Ray Train's data pipeline): the table marks that figure "(val)"."""
    import json

    from pipelines.reports.compare import markdown_table, summarize_run

    rows = []
    for arch, evaluated in (("resnet18", {"top1": 0.5, "inference_images_per_s": 40.0}), ("vgg11", None)):
        run = tmp_path / arch
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"arch": arch, "task": "classification"}))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_images_per_s": 5.0, "val_top1": 0.4,
                                                       "val_images_per_s": 25.0}) + "\n")
        if evaluated:
            (run / "eval").mkdir()
            (run / "eval" / "metrics.json").write_text(json.dumps(evaluated))
        rows.append(summarize_run(str(run)))
    assert [(r["inference_images_per_s"], r["inference_source"]) for r in rows] == [(40.0, "eval"), (25.0, "validation")]
    table = markdown_table(rows)
    assert "| 5.0 | 40.0 |" in table and "| 5.0 | 25.0 (val) |" in table
