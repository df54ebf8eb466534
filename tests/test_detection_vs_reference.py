"""The reference side of benchmarks/detection_vs_reference.py: the same initial weights as visionflow's
builder, and torchvision's loop training and scoring on a tiny synth set (the visionflow side is ``fit``)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from benchmarks.detection_vs_reference import (BUILDERS, _labels, combine, reference_model, run_reference,
                                               same_initial_weights)
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
    ref = run_reference(tmp_path / "coco", args, num_classes, tmp_path / "reference")
    (epoch,) = ref["epochs"]
    assert math.isfinite(epoch["loss"]) and epoch["loss"] > 0
    assert 0.0 <= ref["bbox/AP50"] <= 1.0 and ref["seconds"] > 0
    # The recipe's checkpoint of the epoch, as references/detection writes it: loadable, with its weights.
    for name in ("model_0.pth", "checkpoint.pth"):
        saved = torch.load(tmp_path / "reference" / name, weights_only=False)
        assert saved["epoch"] == 0 and set(saved) == {"model", "optimizer", "args", "epoch"}
        assert saved["model"].keys() == reference_model(num_classes, 64, 0, arch).state_dict().keys()
        (tmp_path / "reference" / name).unlink()  # 0.2-0.35 GB each; pytest keeps its last runs' folders
    assert ref["phases"]["checkpoint_s"] > 0 and ref["phases"]["steps_s"] > 0


def test_the_reference_does_not_train_on_crowd_regions(tmp_path):
    """The recipe's loader drops iscrowd=1 annotations (as visionflow's targets do); the synth set has them."""
    import json

    from benchmarks.detection_vs_reference import reference_loader

    write_synth(tmp_path / "coco", images=24, size=64, seed=0, val_fraction=0.25)
    anns = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())["annotations"]
    crowd_images = {a["image_id"] for a in anns if a["iscrowd"]}
    assert crowd_images  # the fault to leave out is there
    label = _labels(tmp_path / "coco" / "annotations" / "instances_train.json")
    objects = {i: sorted(label[a["category_id"]] for a in anns if a["image_id"] == i and not a["iscrowd"])
               for i in crowd_images}
    data = reference_loader(tmp_path / "coco", "train", 64, 4, False, 0).dataset
    seen = 0
    for i in range(len(data)):
        _, target = data[i]
        if int(target["image_id"]) in objects:
            assert sorted(target["labels"].tolist()) == objects[int(target["image_id"])]
            assert len(target["boxes"]) == len(target["labels"])
            seen += 1
    assert seen == len(crowd_images)


def test_several_seeds_are_reported_as_means_of_ap50_and_the_ratio_of_total_wall_times():
    def pair(seed, ref_ap, ours_ap, ref_s, ours_s):
        return {"seed": seed, "same_initial_weights": True, "visionflow_weights_scored_as_reference": ours_ap,
                "reference": {"bbox/AP50": ref_ap, "seconds": ref_s}, "visionflow": {"bbox/AP50": ours_ap, "seconds": ours_s},
                "ap50_difference": ours_ap - ref_ap, "speed_ratio_reference_over_visionflow": ref_s / ours_s}

    result = combine([pair(0, 0.20, 0.26, 200.0, 250.0), pair(1, 0.30, 0.28, 100.0, 100.0)])
    assert result["seeds"] == [0, 1] and result["same_initial_weights"]
    assert math.isclose(result["reference"]["bbox/AP50"], 0.25) and math.isclose(result["visionflow"]["bbox/AP50"], 0.27)
    assert result["ap50_difference_by_seed"] == pytest.approx([0.06, -0.02])
    assert math.isclose(result["ap50_difference"], 0.02)
    # The ratio of the totals (300 s / 350 s), not the mean of the per-seed ratios ((0.8 + 1.0) / 2).
    assert math.isclose(result["speed_ratio_reference_over_visionflow"], 300 / 350)
    assert result["speed_ratio_by_seed"] == pytest.approx([0.8, 1.0])
    assert result["reference"]["seconds_by_seed"] == [200.0, 100.0] and result["visionflow"]["seconds"] == 350.0
