"""Training runs that go wrong: a non-finite loss (one worker or all), a rerun on other data or another
model, a torn ``metrics.jsonl`` line, a torn or unregistered checkpoint. Each fault is real: a learning rate
that blows the loss up, a NaN injected on one DDP worker, files cut in half on disk."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pipelines import cli, storage
from pipelines.storage import read_metrics
from pipelines.train import TrainConfig, TrainingDiverged, evaluate_checkpoint, fit, latest_checkpoint, load_checkpoint
from pipelines.train.checkpoint import load_payload

ARCH = "squeezenet1_1"  # 0.7M parameters: small checkpoints, fast steps
TINY = {"batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5, "augment_cpus": 0.25, "lr": 0.01}


def train_argv(data, out, **flags) -> list[str]:
    values = {"task": "classification", "arch": ARCH, "data": data, "out": out, "epochs": 2, **TINY, **flags}
    argv = ["train", "--no-dashboard"]
    for key, value in values.items():
        if value is True:
            argv.append("--" + key.replace("_", "-"))
        else:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def cli_lines(capsys) -> list[str]:
    """The command's own lines (``visionflow train: ...``): on stderr, never on stdout."""
    captured = capsys.readouterr()
    assert not [l for l in captured.out.splitlines() if l.startswith("visionflow train:")], captured.out
    return [l for l in captured.err.splitlines() if l.startswith("visionflow train:")]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def checkpoint_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("epoch_*"))


@pytest.fixture(scope="module")
def trained_run(ray_cluster, data_dir, tmp_path_factory):
    """One tiny two-epoch run through the CLI, copied by each test that changes a run."""
    out = tmp_path_factory.mktemp("safety") / "run"
    assert cli.main(train_argv(data_dir, out)) == 0
    assert checkpoint_dirs(out) == ["epoch_0000", "epoch_0001"]
    return out


@pytest.fixture(scope="module")
def other_data_dir(ray_cluster, tmp_path_factory):
    """A second ingested dataset: other images (another seed) of the same shapes."""
    from pipelines.data import ingest
    from vision.data.synth import write_synth

    src, out = tmp_path_factory.mktemp("synth_other"), tmp_path_factory.mktemp("shards_other")
    write_synth(src, images=24, size=64, seed=1)
    for split in ("train", "val"):
        ingest(src / "annotations" / f"instances_{split}.json", src / split, out / split)
    return out


# -- 1. a non-finite loss ---------------------------------------------------------------------------------

def test_a_nonfinite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(trained_run, data_dir, tmp_path,
                                                                                  capsys):
    run = copy_run(trained_run, tmp_path / "run")
    before = read_metrics(run)
    capsys.readouterr()
    # Resume for a third epoch at an absurd learning rate (the lr may change between resumes): the first
    # step's update makes the next loss NaN.
    code = cli.main(train_argv(data_dir, run, epochs=3, lr=1e30))
    out, err = capsys.readouterr()
    assert code == 1
    (line,) = [l for l in err.splitlines() if l.startswith("visionflow train:")]  # on stderr
    assert "training diverged: the loss is nan at epoch 3/3, step 2" in line
    assert "last finite loss " in line and "lower --lr (now 1e+30)" in line
    assert "the latest checkpoint stays epoch 2's" in line
    assert "Traceback" not in out + err
    # Nothing of the diverged epoch was kept; every checkpoint on disk holds finite weights only.
    assert checkpoint_dirs(run) == ["epoch_0000", "epoch_0001"]
    assert latest_checkpoint(run).endswith("epoch_0001/checkpoint.pt")
    for path in (run / "checkpoints").glob("epoch_*/checkpoint.pt"):
        payload = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point()), path
    assert read_metrics(run) == before
    assert json.loads((run / "diverged.json").read_text())["epoch"] == 2


@pytest.mark.timeout(600)  # a worker left waiting in a collective would hang here instead of failing
def test_a_nan_on_one_ddp_worker_stops_every_worker_at_the_same_step(ray_cluster, data_dir, tmp_path):
    cfg = TrainConfig(task="classification", arch=ARCH, data=str(data_dir), out=str(tmp_path / "run"), workers=2,
                      epochs=1, chaos={"nan_loss_at_step": 1, "rank": 1}, **TINY)
    with pytest.raises(TrainingDiverged, match=r"the loss is not finite on worker 1 at epoch 1/1, step 2 "
                                               r"\(last finite loss [0-9.e+-]+\); no checkpoint was saved"):
        fit(cfg)
    assert latest_checkpoint(cfg.out) is None and read_metrics(cfg.out) == []


# -- 2. a rerun of other data or another model ------------------------------------------------------------

def test_a_rerun_with_other_data_or_model_is_refused_and_restart_trains_from_scratch(trained_run, data_dir,
                                                                                    other_data_dir, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    record = json.loads((run / "run.json").read_text())
    assert record["model"]["arch"] == ARCH and record["model"]["image_size"] == 32
    assert len(record["data"]["train_manifest_sha256"]) == 64 and record["data"]["classes"]
    untouched = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "run.json", run / "config.json")}
    capsys.readouterr()

    assert cli.main(train_argv(other_data_dir, run)) == 2
    (line,) = cli_lines(capsys)
    assert line.startswith(f"visionflow train: {run} holds a run of other data or another model (the train and val "
                           f"data (--data {data_dir} then, {other_data_dir} now))")
    assert "pass --restart" in line and "a new --out" in line

    assert cli.main(train_argv(data_dir, run, image_size=48)) == 2
    (line,) = cli_lines(capsys)
    assert "(--image-size 32 then, 48 now)" in line
    assert {p: p.read_bytes() for p in untouched} == untouched and checkpoint_dirs(run) == ["epoch_0000", "epoch_0001"]

    assert cli.main(train_argv(other_data_dir, run, epochs=1, restart=True)) == 0
    records = read_metrics(run)
    assert [(r["epoch"], r["start_epoch"]) for r in records] == [(0, 0)]  # from scratch, on the new data
    assert checkpoint_dirs(run) == ["epoch_0000"]
    assert json.loads((run / "run.json").read_text())["data"]["path"] == str(other_data_dir)
    assert json.loads((run / "config.json").read_text())["data"] == str(other_data_dir)


# -- 3. metrics.jsonl: append-only, a torn last line tolerated ---------------------------------------------

def test_metrics_are_appended_never_rewritten_and_a_torn_last_line_is_skipped(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    first = b'{"epoch":0,  "train_loss":1.5}\n'  # spacing json.dumps would not write: a rewrite shows
    path.write_bytes(first + b'{"epoch": 1, "train_lo')  # a writer killed mid-line
    inode = os.stat(path).st_ino
    with pytest.warns(RuntimeWarning, match="line 2 is not a JSON record"):
        assert read_metrics(tmp_path) == [{"epoch": 0, "train_loss": 1.5}]

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with pytest.warns(RuntimeWarning, match="last line was cut short"):
        storage.append_metrics(tmp_path, {"epoch": 1, "train_loss": 1.2})
    assert synced, "the appended line was not fsynced"
    data = path.read_bytes()
    assert data.startswith(first) and os.stat(path).st_ino == inode
    assert data[len(first):] == b'{"epoch": 1, "train_loss": 1.2}\n'  # the torn bytes are gone

    # A resumed run re-appends an epoch: the newest record of an epoch wins, and it supersedes the later
    # epochs a run that died before checkpointing had written.
    storage.append_metrics(tmp_path, {"epoch": 1, "train_loss": 1.1})
    assert [r["train_loss"] for r in read_metrics(tmp_path)] == [1.5, 1.1]
    storage.append_metrics(tmp_path, {"epoch": 0, "train_loss": 0.9})
    assert read_metrics(tmp_path) == [{"epoch": 0, "train_loss": 0.9}]
    assert path.read_bytes().startswith(first) and len(path.read_bytes().splitlines()) == 4


def test_a_run_whose_metrics_end_in_a_torn_line_resumes(trained_run, data_dir, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # epoch 1's record torn mid-JSON
    with pytest.warns(RuntimeWarning, match="not a JSON record"):
        assert [r["epoch"] for r in read_metrics(run)] == [0]

    cfg = TrainConfig(task="classification", arch=ARCH, data=str(data_dir), out=str(run), epochs=3, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = fit(cfg)
    records = read_metrics(run)  # no warning left: the torn bytes were cut before appending
    assert [(r["epoch"], r["start_epoch"]) for r in records] == [(0, 0), (2, 2)]
    assert result["metrics"]["epoch"] == 2
    assert metrics.read_bytes().startswith(lines[0])


# -- 4. the loader takes registered, readable checkpoints only --------------------------------------------

def test_a_model_load_maps_the_checkpoint_and_lets_it_go(trained_run, tmp_path):
    """``load_checkpoint`` maps the file (a model load never reads the optimizer's two thirds of it) and holds
    no mapping once the weights are copied into the model: a deleted checkpoint's space comes back."""
    import gc

    run = copy_run(trained_run, tmp_path / "run")
    file = str(run / "checkpoints" / "epoch_0001" / "checkpoint.pt")
    payload = load_payload(run, mmap=True)
    assert file in Path("/proc/self/maps").read_text()  # mapped, not read into memory
    assert torch.equal(payload["model"][next(iter(payload["model"]))],
                       load_payload(run)["model"][next(iter(payload["model"]))])  # the same tensors as a read
    del payload
    gc.collect()
    model, config = load_checkpoint(run)
    gc.collect()
    assert config["epoch"] == 1 and file not in Path("/proc/self/maps").read_text()
    os.remove(file)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_the_loader_skips_a_torn_newest_checkpoint_and_an_unregistered_folder(trained_run, data_dir, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    first = torch.load(ckpts / "epoch_0000" / "checkpoint.pt", weights_only=True)
    newest = ckpts / "epoch_0001" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    # A folder Ray Train never registered (a worker killed while uploading): here even a whole, readable file.
    (ckpts / "epoch_9999").mkdir()
    torch.save({**first, "epoch": 9999}, ckpts / "epoch_9999" / "checkpoint.pt")

    assert latest_checkpoint(run) == str(newest)  # the newest registered, not the unregistered folder
    with pytest.warns(RuntimeWarning, match=r"epoch_0001/checkpoint\.pt is unreadable"):
        model, config = load_checkpoint(run)
    assert config["epoch"] == 0
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, first["model"][name])
    with pytest.warns(RuntimeWarning, match="unreadable"):  # eval (as serve and attack) loads through it
        assert evaluate_checkpoint(run, data_dir)["epoch"] == 0

    # A registry in another Ray version's format (here: a field missing), which Result.from_path refuses,
    # is read from its file.
    snapshot = ckpts / "checkpoint_manager_snapshot.json"
    registry = json.loads(snapshot.read_text())
    del registry["current_report_index"]
    snapshot.write_text(json.dumps({**registry, "ray_version": "0.0.0"}))
    assert latest_checkpoint(run) == str(newest)

    oldest = ckpts / "epoch_0000" / "checkpoint.pt"
    oldest.write_bytes(oldest.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no readable checkpoint under"):
        load_payload(run)
    with pytest.raises(Exception):  # a torn file named directly is an error, not a fallback
        load_payload(newest)


def test_eval_refuses_data_of_other_categories_and_a_batch_size_below_one(trained_run, reordered_data_dir,
                                                                         tmp_path, capsys):
    """The same images with the category names in another order scored a real model silently wrong."""
    with pytest.raises(ValueError, match=r"trained on the classes \[circle, square.*has \[square, triangle"):
        evaluate_checkpoint(trained_run, reordered_data_dir)
    argv = ["eval", "--checkpoint", str(trained_run), "--data", str(reordered_data_dir), "--out", str(tmp_path),
            "--no-dashboard"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visionflow eval: ") and "same categories" in err[0], err
    assert not (tmp_path / "metrics.json").exists()
    assert cli.main(argv + ["--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "visionflow eval: --batch-size must be >= 1, got 0"


@pytest.mark.parametrize("where", ["weight", "bn_stat", "half"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_finite_check_finds_one_bad_number_anywhere_in_the_state(where, value):
    """The check before each checkpoint: one NaN or inf in a weight, a batch-norm statistic (a buffer) or a
    half-precision tensor is found; an empty tensor and integer buffers pass."""
    from pipelines.train.trainer import _finite_state

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 0))
    if where == "half":
        net = net.half()
    assert _finite_state(net)  # num_batches_tracked (int64) and the empty Linear are fine
    with torch.no_grad():
        if where == "bn_stat":
            net[1].running_var[2] = value
        else:
            net[0].weight[1, 2, 0, 1] = value
    assert not _finite_state(net)
