"""Watching a training run: the rank-0 progress bar in the worker's output, TensorBoard events under
RUN/tensorboard, metrics.csv beside metrics.jsonl, RUN/curves.png, and `visionflow compare`'s curves.png.
One tiny two-epoch run (started with --init-from a torchvision state dict) serves every check; resuming it
(metrics.csv and TensorBoard after a resume, --init-from not read again) is the slow test."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from ray_logs import log_sizes, logged_since

from pipelines import storage
from pipelines.train import TrainConfig, fit

ARCH = "squeezenet1_0"  # small, and no other test trains it: its progress lines are this file's
TINY = {"task": "classification", "arch": ARCH, "batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5,
        "augment_cpus": 0.25, "lr": 0.01, "optimizer": "adamw"}
PNG = b"\x89PNG\r\n\x1a\n"
LOGGED: dict[str, str] = {}  # log file name -> what it got during the fixture's fit


@pytest.fixture(scope="module")
def watched_run(ray_cluster, data_dir, tmp_path_factory):
    """Two epochs started from torchvision's ImageNet-shaped SqueezeNet 1.0 (a state dict saved from its
    builder: 1000 classes)."""
    import torch
    import torchvision

    folder = tmp_path_factory.mktemp("watch")
    out, weights = folder / "run", folder / "squeezenet1_0-imagenet-shaped.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.squeezenet1_0(weights=None).state_dict(), weights)
    started, before = time.time(), log_sizes()
    # --out relative to the command's working directory, as a user types it: every file below must land
    # there, not under the worker's own working directory
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cfg = TrainConfig(data=str(data_dir), out="run", epochs=2, init_from=str(weights), **TINY)
        fit(cfg)
    finally:
        os.chdir(cwd)
    LOGGED.update(logged_since(before))
    return out, started, cfg


def test_the_run_records_where_its_weights_started(watched_run):
    out, _, _ = watched_run
    init = json.loads((out / "run.json").read_text())["init"]
    # the classifier's 1000-class layer was skipped: the data has 5 classes
    assert {s["name"] for s in init["skipped_shape"]} == {"net.classifier.1.weight", "net.classifier.1.bias"}
    assert init["loaded"] == init["tensors"] - 2 and not init["pretrained"]


def test_a_single_worker_run_iterates_its_data_without_a_split_coordinator(watched_run):
    """One worker has nothing to split: no coordinator process per epoch, so none to end (and none for Ray
    Train's shutdown to find ended and log a traceback about)."""
    logs = LOGGED  # what the cluster's processes logged during the fit
    assert any(":actor_name:RayTrainWorker" in text for text in logs.values())  # the logs of this run are here
    assert [name for name, text in logs.items() if ":actor_name:SplitCoordinator" in text] == []


def test_a_cluster_without_a_dashboard_keeps_the_placement_group_cleaners_warning_out_of_the_output(watched_run):
    """The test cluster has no dashboard, so no State API: Ray Train's placement-group cleaner cannot see
    the controller and would warn once a second for the whole fit."""
    assert any(":actor_name:PlacementGroupCleaner" in text for text in LOGGED.values())
    assert [name for name, text in LOGGED.items() if "Failed to query Ray Train Controller actor state" in text] == []


@pytest.mark.slow  # a second Ray Train run (~45 s on 2 loaded cores)
def test_a_resume_rewrites_the_csv_appends_to_tensorboard_and_does_not_read_init_from(watched_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, cfg = watched_run
    run = Path(shutil.copytree(out, tmp_path / "run"))
    init = json.loads((run / "run.json").read_text())["init"]
    # --epochs 3 on the copy, and an --init-from that does not exist: the resume trains epoch 3 from the
    # run's own checkpoint and never reads it
    fit(cfg.model_copy(update={"out": str(run), "epochs": 3, "init_from": str(tmp_path / "gone.pth")}))
    records = storage.read_metrics(run)
    assert [r["start_epoch"] for r in records] == [0, 0, 2]
    assert json.loads((run / "run.json").read_text())["init"] == init
    rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
    assert [{k: _cell(v) for k, v in row.items()} for row in rows] == records
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one writer per command
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [p.step for p in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [p.value for p in acc.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in records], rel=1e-5)


def _cell(text: str):
    """A CSV cell back to the record's value (numbers, JSON lists, text)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def test_metrics_csv_holds_the_same_records_as_metrics_jsonl(watched_run):
    out, _, _ = watched_run
    records = storage.read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        assert set(row) == set(record)
        assert {k: _cell(v) for k, v in row.items()} == record
    assert not list(out.glob(".metrics.csv.*")), "a temporary file of the atomic write was left behind"


def test_metrics_csv_follows_read_metrics_for_a_re_appended_epoch(tmp_path):
    from pipelines.train.watch import write_metrics_csv

    for record in ({"epoch": 0, "train_loss": 2.0}, {"epoch": 1, "train_loss": 1.5},
                   {"epoch": 1, "train_loss": 1.25, "val_top1": 0.5}):  # epoch 1 trained again after a crash
        storage.append_metrics(str(tmp_path), record)
    write_metrics_csv(str(tmp_path))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert [(r["epoch"], r["train_loss"], r["val_top1"]) for r in rows] == [("0", "2.0", ""), ("1", "1.25", "0.5")]


def test_tensorboard_events_hold_every_epoch_metric_once_per_epoch(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = watched_run
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer per run of the command
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/top1", "train/images_per_s", "val/loss", "val/top1", "lr"} <= tags
    assert "val/top5" not in tags  # 5 classes: every label is in the top 5
    records = storage.read_metrics(out)
    for tag, key in (("train/loss", "train_loss"), ("val/top1", "val_top1"), ("lr", "lr")):
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [1, 2], tag  # steps are epochs finished, each once
        assert [p.value for p in points] == pytest.approx([r[key] for r in records], rel=1e-5)


def test_curves_png_is_drawn_for_the_run(watched_run):
    from PIL import Image

    out, _, _ = watched_run
    data = (out / "curves.png").read_bytes()
    assert data.startswith(PNG)
    with Image.open(io.BytesIO(data)) as img:
        assert img.width > 600 and img.height > 250


def test_the_progress_bar_prints_images_per_second_and_eta_on_rank_0(watched_run):
    """The worker's stdout (which Ray streams to the driver of `visionflow train`) holds the epoch's bar."""
    lines = [l for text in LOGGED.values() for l in text.splitlines() if f"{ARCH} epoch " in l]
    bars = [l for l in lines if "img/s" in l and " eta " in l and "step " in l and "loss " in l]
    assert any(f"{ARCH} epoch 1/2" in l for l in bars), lines[:10]
    assert any(f"{ARCH} epoch 2/2" in l for l in bars), lines[:10]


def test_the_progress_bar_in_a_pipe_writes_its_last_state():
    from pipelines.train.watch import EpochBar

    out = io.StringIO()  # not a terminal: a line at most every every_s seconds, and the last one
    bar = EpochBar("resnet18 epoch 1/3", 100, batch_size=8, world=2, out=out, every_s=3600)
    for _ in range(5):
        bar.update(8, 0.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the last state at close
    assert "80/100" in lines[-1] and "img/s" in lines[-1] and " eta " in lines[-1]
    assert "step 5/7" in lines[-1] and "loss 0.5" in lines[-1]


def test_compare_draws_the_runs_curves_side_by_side(watched_run, tmp_path):
    from pipelines.reports.compare import compare, curve_runs, summarize_run
    from pipelines.reports.curves import comparison_figure

    out, _, _ = watched_run
    other = Path(shutil.copytree(out, tmp_path / "copy"))
    result = compare([str(out), str(other)], str(tmp_path / "cmp"))
    assert Path(result["curves"]).read_bytes().startswith(PNG)

    runs = curve_runs([summarize_run(str(out)), summarize_run(str(other))])
    assert [r["label"] for r in runs] == [f"{ARCH} (run)", f"{ARCH} (copy)"]  # same arch: told apart by folder
    fig = comparison_figure(runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        if ax.lines:
            assert len(ax.lines) == 2  # one line per run
            assert not box.overlaps(ax.get_tightbbox(renderer)), "the legend covers a plot"


def test_files_that_cannot_be_written_are_said_once_and_training_goes_on(tmp_path, capfd):
    from pipelines.train.watch import Watch

    blocked = tmp_path / "run"
    blocked.write_text("a file where the run directory should be")  # every write under it fails
    watch = Watch(str(blocked), "classification", "t", start_epoch=0)
    for epoch in range(2):
        watch.after_epoch({"epoch": epoch, "train_loss": 1.0})  # never raises
    watch.close()
    lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("visionflow train: could not write")]
    assert len(lines) == len(set(lines)) and 2 <= len(lines) <= 3, lines  # each file once: csv, curves[, events]
    assert all(l.endswith("training goes on") for l in lines)
