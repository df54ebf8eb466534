"""The defenses inside the trainer's classification plug-in, the robustness report and the layer
visualizations from the CLI, on checkpoints in the trainer's format (docs/architecture.md)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.image
import pytest
import torch

from pipelines.cli import main as cli
from pipelines.data import read_manifest
from pipelines.reports.robustness import load_crops, robustness_report
from pipelines.train import TrainConfig, fit, load_checkpoint
from pipelines.storage import read_metrics
from pipelines.train.tasks import classification
from vision.adversarial import accuracy, distillation_loss, tempered_cross_entropy
from vision.models import create_model

TINY = {"arch": "resnet18", "epochs": 1, "batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5,
        "augment_cpus": 0.25, "workers": 1}


def save_checkpoint(data_dir, out, seed: int, **fields) -> TrainConfig:
    """A checkpoint exactly as the trainer writes it: run_dir/checkpoints/epoch_0000/checkpoint.pt."""
    cats = sorted(read_manifest(data_dir / "train")["categories"], key=lambda c: c["label"])
    cfg = TrainConfig(data=str(data_dir), out=str(out), num_classes=len(cats), categories=cats, **TINY, **fields)
    torch.manual_seed(seed)
    model = create_model(cfg.arch, num_classes=cfg.num_classes)
    path = out / "checkpoints" / "epoch_0000" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "config": cfg.model_dump()}, path)
    return cfg


@pytest.fixture(scope="module")
def checkpoints(ray_cluster, data_dir, tmp_path_factory):
    """A teacher (T=4) and a student distilled from it with PGD adversarial training."""
    root = tmp_path_factory.mktemp("defended")
    teacher = save_checkpoint(data_dir, root / "teacher", 0, temperature=4.0)
    student = save_checkpoint(data_dir, root / "student", 1, temperature=4.0, distill_from=teacher.out,
                              adversarial="pgd", adv_eps=0.03, adv_steps=2)
    return teacher, student


@pytest.fixture(scope="module")
def crops(data_dir, checkpoints):
    return load_crops(data_dir, 32, 24)


def test_classification_plugin_trains_teachers_students_and_adversarial_batches(checkpoints, crops):
    teacher_cfg, student_cfg = checkpoints
    x, y, _ = crops
    x, y = x[:8], y[:8]
    teacher, _ = load_checkpoint(teacher_cfg.out)
    student = create_model("resnet18", num_classes=student_cfg.num_classes).eval()
    # The teacher's own run: cross-entropy of softmax(logits / T).
    loss, stats = classification.train_step(student, (x, y), teacher_cfg)
    assert loss.item() == pytest.approx(tempered_cross_entropy(student(x), y, 4.0).item(), rel=1e-5)
    # The student: soft cross-entropy against the teacher's soft labels at T.
    plain_student = student_cfg.model_copy(update={"adversarial": "none"})
    loss, _ = classification.train_step(student, (x, y), plain_student)
    with torch.no_grad():
        want = distillation_loss(student(x), teacher(x), 4.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # With adversarial training half the batch is attacked first: a different, finite, trainable loss.
    loss_adv, stats = classification.train_step(student, (x, y), student_cfg)
    assert torch.isfinite(loss_adv) and loss_adv.item() != pytest.approx(loss.item())
    loss_adv.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert stats["n"] == 8


def test_attack_command_writes_the_robustness_report(checkpoints, crops, data_dir, tmp_path, capsys, monkeypatch):
    teacher, student = checkpoints
    out = tmp_path / "report"
    # Ray Data's console handler as Ray Data sets it up (an earlier test in this process may have quieted it;
    # put back after the test).
    console = next(h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console")
    monkeypatch.setattr(console, "level", logging.INFO)
    monkeypatch.setattr(console, "filters", [])
    rc = cli(["attack", "--checkpoint", teacher.out, "--checkpoint", student.out, "--data", str(data_dir),
              "--out", str(out), "--eps", "0", "0.03", "0.1", "--attacks", "fgsm", "pgd", "--images", "24",
              "--examples", "3", "--fpr", "0.1"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "robustness.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == ["resnet18 teacher T=4", "resnet18 adv-pgd eps=0.03 distilled T=4"]
    x, y, _ = crops
    for m in report["models"]:
        assert [(r["attack"], r["eps"]) for r in m["curve"]] == [
            (a, e) for a in ("fgsm", "pgd") for e in (0.0, 0.03, 0.1)]
        clean = [r["accuracy"] for r in m["curve"] if r["eps"] == 0]
        model, _ = load_checkpoint(m["checkpoint"])
        assert clean == [pytest.approx(accuracy(model, x, y))] * 2  # eps 0 is the clean accuracy
        assert set(m["detection"]["detectors"]) == {"input_gradient", "feature_squeezing"}
        assert m["detection"]["eps"] == 0.03
    table = (out / "robustness.md").read_text()
    assert "| resnet18 teacher T=4 | pgd |" in table and "eps 0.1" in table and table in printed
    for png in [report["curves"], *report["examples"]]:
        assert matplotlib.image.imread(png).shape[0] > 100
    assert len(report["examples"]) == 2
    # The command's own lines say how far it is: Ray Data's per-execution lines and its notice that the
    # progress bars are off stay off this process's console (its log file keeps them).
    start = logging.LogRecord("ray.data._internal.execution.streaming_executor", logging.INFO, __file__, 0,
                              "Starting execution of Dataset x", None, None)
    notice = logging.LogRecord("ray.data._internal.progress", logging.WARNING, __file__, 0,
                               "Progress bars disabled. To enable, set ...", None, None)
    assert start.levelno < console.level and not console.filter(notice)


def test_report_for_the_dag_includes_layer_visualizations(checkpoints, data_dir, tmp_path):
    teacher, _ = checkpoints
    result = robustness_report(teacher.out, str(data_dir), tmp_path / "rob", epsilons=[0.0, 2 / 255], images=12,
                               detect=False, examples=0, progress=lambda line: None)
    (vis,) = result["visualizations"].values()
    assert vis["method"] == "guided" and set(vis["layers"]) == {"conv1", "conv2", "conv20"}
    for layer in vis["layers"].values():
        assert matplotlib.image.imread(layer["png"]).shape[1] > 200


def test_visualize_command_writes_one_grid_per_layer(checkpoints, data_dir, tmp_path):
    teacher, _ = checkpoints
    out = tmp_path / "vis"
    rc = cli(["visualize", "--checkpoint", teacher.out, "--data", str(data_dir), "--layer", "conv1",
              "--layer", "net.layer1.0.conv2", "--out", str(out), "--images", "16", "--maps", "2", "--top", "4"])
    assert rc == 0
    info = json.loads((out / "visualizations.json").read_text())
    assert info["method"] == "guided" and info["arch"] == "resnet18"
    assert [len(m["units"]) for m in info["layers"]["conv1"]["maps"]] == [4, 4]
    assert (out / "conv1.png").stat().st_size > 1000 and (out / "net.layer1.0.conv2.png").exists()


def test_bad_inputs_get_clear_errors(checkpoints, data_dir, reordered_data_dir, tmp_path, capsys):
    teacher, _ = checkpoints
    assert cli(["attack", "--checkpoint", str(tmp_path / "nowhere"), "--data", str(data_dir),
                "--out", str(tmp_path / "r")]) == 2
    assert "no checkpoint under" in capsys.readouterr().err  # errors go to stderr
    assert cli(["attack", "--checkpoint", teacher.out, "--data", str(data_dir), "--eps", "2",
                "--out", str(tmp_path / "r")]) == 2
    assert "epsilons must lie in [0, 1]" in capsys.readouterr().err  # errors go to stderr
    assert cli(["attack", "--checkpoint", teacher.out, "--data", str(reordered_data_dir), "--eps", "0.01",
                "--out", str(tmp_path / "r")]) == 2
    assert "trained on the classes [circle, square" in capsys.readouterr().err  # not attacked on other labels
    # A bad second checkpoint is refused before the first one's report (minutes) starts, nothing written.
    assert cli(["attack", "--checkpoint", teacher.out, "--checkpoint", str(tmp_path / "nowhere"), "--data",
                str(data_dir), "--out", str(tmp_path / "r2")]) == 2
    assert "no checkpoint under" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    for command, extra in (("attack", []), ("visualize", ["--layer", "conv1"])):  # a URI became a local
        # folder named "s3:" and the command said it wrote there
        assert cli([command, "--checkpoint", teacher.out, "--data", str(data_dir), "--out", "s3://bucket/r", *extra]) == 2
        assert "written to a local folder" in capsys.readouterr().err and not Path("s3:").exists()
    assert cli(["visualize", "--checkpoint", teacher.out, "--data", str(data_dir), "--layer", "conv99",
                "--out", str(tmp_path / "v")]) == 2
    assert "conv1..conv20" in capsys.readouterr().err  # errors go to stderr
    with pytest.raises(SystemExit):
        cli(["attack", "--checkpoint", teacher.out, "--data", str(data_dir), "--attacks", "carlini"])
    with pytest.raises(ValueError, match="classification options"):
        TrainConfig(**{**TINY, "arch": "localizer"}, data="d", out="o", adversarial="pgd")


def test_a_bad_teacher_is_refused_on_the_driver_before_anything_runs(checkpoints, data_dir, tmp_path, capsys):
    """A missing teacher, a detector as teacher, a teacher of other classes: one line, no run directory."""
    teacher, _ = checkpoints
    detector = tmp_path / "detector"
    det_cfg = {**teacher.model_dump(), "arch": "yolo_v1", "task": "detection", "temperature": 1.0}
    (detector / "checkpoints" / "epoch_0000").mkdir(parents=True)
    torch.save({"model": {}, "epoch": 0, "config": det_cfg}, detector / "checkpoints" / "epoch_0000" / "checkpoint.pt")
    other = tmp_path / "other_classes"
    cats = [{**c, "name": n} for c, n in zip(teacher.categories, [c["name"] for c in teacher.categories][::-1])]
    save_checkpoint(data_dir, other, 0, temperature=4.0)
    payload = torch.load(other / "checkpoints" / "epoch_0000" / "checkpoint.pt", weights_only=True)
    torch.save({**payload, "config": {**payload["config"], "categories": cats}},
               other / "checkpoints" / "epoch_0000" / "checkpoint.pt")
    for source, message in ((tmp_path / "missing", "no checkpoint under"), (detector, "holds a detection model"),
                            (other, "trained on the classes [ellipse, hexagon")):
        out = tmp_path / f"student_{source.name}"
        argv = ["train", "--arch", "resnet18", "--data", str(data_dir), "--out", str(out), "--epochs", "1",
                "--image-size", "32", "--temperature", "4", "--distill-from", str(source), "--no-dashboard"]
        assert cli(argv) == 2, source
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("visionflow train:")]
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


@pytest.mark.slow
def test_ray_train_runs_distillation_and_adversarial_training(ray_cluster, data_dir, tmp_path):
    teacher = TrainConfig(data=str(data_dir), out=str(tmp_path / "teacher"), temperature=4.0, **TINY)
    fit(teacher)
    student = TrainConfig(data=str(data_dir), out=str(tmp_path / "student"), temperature=4.0,
                          distill_from=teacher.out, adversarial="fgsm", adv_eps=0.03, **TINY)
    fit(student)
    for cfg in (teacher, student):
        (record,) = read_metrics(cfg.out)
        assert torch.isfinite(torch.tensor(record["train_loss"])) and record["train_images"] > 0
    _, config = load_checkpoint(student.out)
    assert config["distill_from"] == teacher.out and config["adversarial"] == "fgsm"
