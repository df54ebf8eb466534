"""Defenses through the real trainer (Ray Train) and the robustness report / visualizations from the CLI."""
from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from pipelines.cli import main as cli
from pipelines.robustness import load_crops, robustness_report
from pipelines.train import TrainConfig, fit, load_checkpoint
from pipelines.train.storage import read_metrics
from vision.adversarial import accuracy

TINY = {"arch": "resnet18", "epochs": 1, "batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5,
        "augment_cpus": 0.25, "workers": 1}


@pytest.fixture(scope="module")
def runs(ray_cluster, data_dir, tmp_path_factory):
    """A teacher trained at T=4, and a student distilled from it at T=4 with FGSM adversarial training."""
    root = tmp_path_factory.mktemp("defenses")
    teacher = TrainConfig(data=str(data_dir), out=str(root / "teacher"), temperature=4.0, **TINY)
    fit(teacher)
    student = TrainConfig(data=str(data_dir), out=str(root / "student"), temperature=4.0,
                          distill_from=str(root / "teacher"), adversarial="fgsm", adv_eps=0.03, adv_ratio=0.5, **TINY)
    fit(student)
    return teacher, student


def test_trainer_runs_distillation_and_adversarial_training(runs):
    teacher, student = runs
    for cfg in runs:
        (record,) = read_metrics(cfg.out)
        assert torch.isfinite(torch.tensor(record["train_loss"])) and record["train_images"] > 0
        assert 0 <= record["val_top1"] <= 1
    _, config = load_checkpoint(student.out)
    assert config["distill_from"] == teacher.out and config["temperature"] == 4.0
    assert config["adversarial"] == "fgsm" and config["adv_eps"] == 0.03


def test_attack_command_writes_the_robustness_report(runs, data_dir, tmp_path, capsys):
    teacher, student = runs
    out = tmp_path / "report"
    rc = cli(["attack", "--checkpoint", teacher.out, "--checkpoint", student.out, "--data", str(data_dir),
              "--out", str(out), "--eps", "0", "0.03", "0.1", "--attacks", "fgsm", "pgd", "--images", "24",
              "--examples", "3", "--fpr", "0.1"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "robustness.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == ["resnet18 teacher T=4", "resnet18 adv-fgsm eps=0.03 distilled T=4"]
    for m in report["models"]:
        assert [(r["attack"], r["eps"]) for r in m["curve"]] == [
            (a, e) for a in ("fgsm", "pgd") for e in (0.0, 0.03, 0.1)]
        clean = [r["accuracy"] for r in m["curve"] if r["eps"] == 0]
        model, config = load_checkpoint(m["checkpoint"])
        x, y, _ = load_crops(data_dir, config["image_size"], 24)
        assert clean == [pytest.approx(accuracy(model, x, y))] * 2  # eps 0 is the clean accuracy
        assert all(r["accuracy"] <= clean[0] for r in m["curve"] if r["attack"] == "pgd")
        assert set(m["detection"]["detectors"]) == {"input_gradient", "feature_squeezing"}
        assert m["detection"]["eps"] == 0.03
    table = (out / "robustness.md").read_text()
    assert "| resnet18 teacher T=4 | pgd |" in table and "eps 0.1" in table and table in printed
    for png in [report["curves"], *report["examples"]]:
        assert matplotlib.image.imread(png).shape[0] > 100
    assert len(report["examples"]) == 2


def test_report_for_the_dag_includes_layer_visualizations(runs, data_dir, tmp_path):
    teacher, _ = runs
    result = robustness_report(teacher.out, str(data_dir), tmp_path / "rob", epsilons=[0.0, 2 / 255], images=12,
                               detect=False, examples=0, progress=lambda line: None)
    (vis,) = result["visualizations"].values()
    assert vis["method"] == "guided" and set(vis["layers"]) == {"conv1", "conv2", "conv20"}
    for layer in vis["layers"].values():
        assert matplotlib.image.imread(layer["png"]).shape[1] > 200


def test_visualize_command_writes_one_grid_per_layer(runs, data_dir, tmp_path, capsys):
    teacher, _ = runs
    out = tmp_path / "vis"
    rc = cli(["visualize", "--checkpoint", teacher.out, "--data", str(data_dir), "--layer", "conv1",
              "--layer", "net.layer1.0.conv2", "--out", str(out), "--images", "16", "--maps", "2", "--top", "4"])
    assert rc == 0
    info = json.loads((out / "visualizations.json").read_text())
    assert info["method"] == "guided" and info["arch"] == "resnet18"
    assert [len(m["units"]) for m in info["layers"]["conv1"]["maps"]] == [4, 4]
    assert (out / "conv1.png").stat().st_size > 1000 and (out / "net.layer1.0.conv2.png").exists()


def test_bad_inputs_get_clear_errors(runs, data_dir, tmp_path, capsys):
    teacher, _ = runs
    assert cli(["attack", "--checkpoint", str(tmp_path / "nowhere"), "--data", str(data_dir),
                "--out", str(tmp_path / "r")]) == 2
    assert "no checkpoint under" in capsys.readouterr().out
    assert cli(["attack", "--checkpoint", teacher.out, "--data", str(data_dir), "--eps", "2",
                "--out", str(tmp_path / "r")]) == 2
    assert "epsilons must lie in [0, 1]" in capsys.readouterr().out
    assert cli(["visualize", "--checkpoint", teacher.out, "--data", str(data_dir), "--layer", "conv99",
                "--out", str(tmp_path / "v")]) == 2
    assert "conv1..conv20" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["attack", "--checkpoint", teacher.out, "--data", str(data_dir), "--attacks", "carlini"])
    with pytest.raises(ValueError, match="classification options"):
        TrainConfig(**{**TINY, "arch": "localizer"}, data="d", out="o", adversarial="pgd")
