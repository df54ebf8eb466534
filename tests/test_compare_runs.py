"""`visionflow train/eval/compare/models` from the command line: a localization run, its evaluation, and the
comparison table + chart with a failed run listed as failed."""
from __future__ import annotations

import json

import pytest

from pipelines.cli import main as cli
from pipelines.reports.compare import compare


@pytest.fixture(scope="module")
def loc_run(ray_cluster, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loc") / "run"
    rc = cli(["train", "--task", "localization", "--arch", "resnet18", "--data", str(data_dir), "--out", str(out),
              "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--cpus-per-worker", "0.5",
              "--augment-cpus", "0.25", "--optimizer", "adamw"])
    assert rc == 0
    return out


def test_localization_trains_from_the_cli_and_eval_writes_metrics(loc_run, data_dir, capsys):
    record = json.loads((loc_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_loc_acc", "train_cls_loss", "train_box_loss", "val_loc_acc", "val_iou"} <= set(record)
    config = json.loads((loc_run / "config.json").read_text())
    assert config["task"] == "localization" and config["arch"] == "resnet18" and config["optimizer"] == "adamw"
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(loc_run), "--data", str(data_dir)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((loc_run / "eval" / "metrics.json").read_text())
    assert written["loc_acc"] == printed["loc_acc"] and 0.0 <= written["loc_acc"] <= written["top1"] <= 1.0
    assert written["images"] == record["val_images"]  # one worker: every val image counted once


def test_compare_lists_runs_and_failed_runs(loc_run, tmp_path, capsys):
    failed = tmp_path / "archs" / "vgg16"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({"arch": "vgg16", "task": "classification",
                                                    "error": "worker died: out of memory"}))
    rc = cli(["compare", str(loc_run), str(failed), "--out", str(tmp_path / "cmp")])
    assert rc == 1  # not every run finished
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table in capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| resnet18 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "localization" and float(cells[2]) == pytest.approx(11.77, abs=0.02)  # params (M)
    # GFLOPs given 224x224: ResNet-18's 3.6 with its last stage at stride 16 (4x its cost), the 3x3 neck,
    # and the 64 px glimpse of the class head through the same backbone
    assert float(cells[3]) == pytest.approx(6.8, abs=0.1) and cells[4] == "224x224" and cells[5] == "loc. acc."
    assert float(cells[7]) > 0 and float(cells[8]) > 0  # train / inference images/s
    assert "| vgg16 | classification | | | | failed | worker died: out of memory |" in table
    png = (tmp_path / "cmp" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    curves = (tmp_path / "cmp" / "curves.png").read_bytes()  # the finished run's curves; the failed one has none
    assert curves[:8] == b"\x89PNG\r\n\x1a\n"
    # A misspelt directory is bad input (exit 2, one line naming it, nothing written), not a failed run.
    capsys.readouterr()
    assert cli(["compare", str(loc_run), str(tmp_path / "archs" / "vgg61"), "--out", str(tmp_path / "cmp2")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"visionflow compare: no such run directory: {tmp_path / 'archs' / 'vgg61'}"
    assert captured.out == "" and not (tmp_path / "cmp2").exists()


def test_compare_into_a_run_directory_is_refused(loc_run, capsys):
    """``--out RUN`` overwrote the run's own curves.png (the training's, redrawn every epoch)."""
    before = (loc_run / "curves.png").read_bytes()
    assert cli(["compare", str(loc_run), "--out", str(loc_run)]) == 2
    assert "whose curves.png the comparison would overwrite" in capsys.readouterr().err
    assert (loc_run / "curves.png").read_bytes() == before and not (loc_run / "comparison.md").exists()


def test_compare_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        compare([], tmp_path)


def test_models_command_prints_measured_counts(capsys):
    assert cli(["models", "--task", "localization", "--image-size", "64"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # Progress on stderr (the detectors take seconds each), the table alone on stdout.
    assert "models  [" in captured.err and "1/1" in captured.err and "measured localizer" in captured.err
    assert "models  [" not in out
    row = next(line for line in out.splitlines() if line.startswith("| localizer "))
    # ResNet-18 features (11.18M) + the 3x3 neck (0.59M) + the 1x1 centre and box heads + a 1000-class linear head
    assert "| localization | 12.28 |" in row
    # at 64 px the glimpse (64 px) costs as much as the whole image: twice the backbone
    assert float(row.strip("|").split("|")[3]) == pytest.approx(2 * 6.38 * (64 / 224) ** 2, rel=0.05)


def test_an_evaluation_of_another_split_epoch_or_run_is_not_the_runs_accuracy(loc_run, tmp_path):
    import shutil

    from pipelines.reports.compare import summarize_run

    run = tmp_path / "run"
    shutil.copytree(loc_run, run, ignore=shutil.ignore_patterns("eval"))
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    own = {"arch": "resnet18", "task": "localization", "epoch": record["epoch"], "split": "val", "loc_acc": 0.987}
    (run / "eval").mkdir()
    for stale in ({"split": "train"}, {"epoch": record["epoch"] + 5}, {"arch": "vgg16"}, {"data": str(tmp_path)}):
        (run / "eval" / "metrics.json").write_text(json.dumps({**own, **stale}))
        assert summarize_run(str(run))["accuracy"] == pytest.approx(record["val_loc_acc"]), stale
    (run / "eval" / "metrics.json").write_text(json.dumps(own))
    assert summarize_run(str(run))["accuracy"] == 0.987
    data = json.loads((run / "config.json").read_text())["data"]
    (run / "eval" / "metrics.json").write_text(json.dumps({**own, "data": data + "/"}))  # the run's own data
    assert summarize_run(str(run))["accuracy"] == 0.987


def test_runs_of_one_architecture_are_told_apart_by_the_end_of_their_directories():
    """Two pipeline runs' resnet18 (runs/a/archs/resnet18, runs/b/archs/resnet18): the table's rows and the curves'
    legend both read "resnet18 (resnet18)", and the legend kept one of the two lines' names."""
    from pipelines.reports.compare import curve_runs, label_runs, markdown_table

    rows = [{"arch": "resnet18", "run_dir": f"/w/runs/{r}/archs/resnet18", "task": "classification", "status": "failed",
             "error": "x"} for r in ("a", "b")]
    rows.append({"arch": "vgg11", "run_dir": "/w/runs/a/archs/vgg11", "task": "classification", "status": "failed",
                 "error": "x"})
    labelled = label_runs(rows)
    assert [r["label"] for r in labelled] == ["resnet18 (a/archs/resnet18)", "resnet18 (b/archs/resnet18)", "vgg11"]
    assert "| resnet18 (a/archs/resnet18) |" in markdown_table(labelled) and curve_runs(labelled) == []
