"""benchmarks.detection_diagnosis: class-aware vs class-agnostic AP tells finding from naming."""
from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.detection_diagnosis import score_split
from pipelines.data import collate_detection, read_split_table
from pipelines.data.views import _detection_rows

SIZE = 96


class Oracle(nn.Module):
    """Answers each val image with its ground truth (labels shifted by ``shift`` classes), found by pixels."""

    def __init__(self, data_dir, shift: int, num_classes: int = 5):
        super().__init__()
        table, _ = read_split_table(data_dir, "val")
        images, targets = collate_detection(_detection_rows(table, size=SIZE, train=False, seed=0, epoch=0,
                                                            masks=False))
        self.truth = {self.key(img): t for img, t in zip(images, targets)}
        self.shift, self.k = shift, num_classes

    @staticmethod
    def key(img: torch.Tensor) -> bytes:
        return img.mul(255).round().to(torch.uint8).numpy().tobytes()

    def forward(self, images):
        out = []
        for img in images:
            t = self.truth[self.key(img)]
            keep = t["iscrowd"] == 0
            labels = (t["labels"][keep] - 1 + self.shift) % self.k + 1
            out.append({"boxes": t["boxes"][keep], "scores": torch.ones(int(keep.sum())), "labels": labels})
        return out


def test_right_classes_score_one_both_ways(data_dir):
    got = score_split(Oracle(data_dir, shift=0), data_dir, "val", image_size=SIZE)
    assert got["val_bbox/AP50"] > 0.99 and got["val_agnostic_bbox/AP50"] > 0.99


def test_wrong_classes_score_zero_aware_and_one_agnostic(data_dir):
    got = score_split(Oracle(data_dir, shift=1), data_dir, "val", image_size=SIZE)
    assert got["val_bbox/AP50"] < 0.01
    assert got["val_agnostic_bbox/AP50"] > 0.99
