"""The reference side of benchmarks/detection_vs_reference.py: the same initial weights as visionflow's
builder, and torchvision's loop training and scoring on a tiny synth set (the visionflow side is ``fit``)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from benchmarks.detection_vs_reference import BUILDERS, _labels, reference_model, run_reference, same_initial_weights
from vision.data.synth import write_synth


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_both_sides_start_from_the_same_weights_and_the_reference_trains_and_scores(tmp_path, arch):
    args = argparse.Namespace(arch=arch, size=64, seed=0, epochs=1, batch=4, lr=1e-3, weight_decay=1e-4)
    write_synth(tmp_path / "coco", images=12, size=64, seed=0, val_fraction=0.25)
    num_classes = len(_labels(tmp_path / "coco" / "annotations" / "instances_train.json"))
    assert same_initial_weights(num_classes, args)
    # Not equal by construction: another seed gives other weights.
    a, b = (reference_model(num_classes, 64, seed, arch).state_dict() for seed in (0, 1))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    ref = run_reference(tmp_path / "coco", args, num_classes)
    (epoch,) = ref["epochs"]
    assert math.isfinite(epoch["loss"]) and epoch["loss"] > 0
    assert 0.0 <= ref["bbox/AP50"] <= 1.0 and ref["seconds"] > 0
