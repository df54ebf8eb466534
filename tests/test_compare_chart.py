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
             "gflops": 1.0, "params": 1e6} for i in range(20)]
    rows += [{"arch": "d", "task": "detection", "status": "done", "accuracy": 0.5, "gflops": 3.0, "params": 2e6},
             {"arch": "bad", "task": "detection", "status": "failed", "error": "boom"}]
    ranked = _ranked(rows, "classification")
    assert [r["arch"] for r in ranked[:2]] == ["c19", "c18"]  # number 1 is the best
    png = chart(rows, None)
    img = Image.open(io.BytesIO(png))
    two_tasks = img.size
    one_task = Image.open(io.BytesIO(chart(rows[:20], None))).size
    assert two_tasks[1] > 1.6 * one_task[1], (two_tasks, one_task)  # a second panel below the first
