"""Ray Train for classification and localization: DDP over two workers, a worker killed mid-run and
replaced, resume by rerunning, the two-tower AlexNet, checkpoints loaded back, eval and compare."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray_logs import log_sizes, logged_since

from pipelines.train import TrainConfig, evaluate_checkpoint, fit, latest_checkpoint, load_checkpoint
from pipelines.storage import read_metrics

SEEN: dict = {}  # around the fixture's fit: what the logs got, the split coordinators it made


def _split_coordinators() -> dict[str, str]:
    from pipelines.ray_private import actor_table

    return {i: a["State"] for i, a in actor_table().items() if a["ActorClassName"] == "SplitCoordinator"}

TINY = {"epochs": 2, "batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5, "augment_cpus": 0.25, "lr": 0.01}


@pytest.fixture(scope="module")
def killed_run(ray_cluster, data_dir, tmp_path_factory):
    """Two DDP workers, two epochs; rank 1 kills its own process at the start of epoch 1, once. The run saves
    its weights only (``save_optimizer: false``): the restarted worker group resumes from them."""
    out = tmp_path_factory.mktemp("killed") / "run"
    marker = out.parent / "killed.marker"
    cfg = TrainConfig(task="classification", arch="resnet18", data=str(data_dir), out=str(out), workers=2,
                      max_failures=1, chaos={"kill_at_epoch": 1, "marker": str(marker), "rank": 1},
                      save_optimizer=False, **TINY)
    before, coordinators = log_sizes(), _split_coordinators()
    result = fit(cfg)
    SEEN["logged"] = logged_since(before, settle_s=3.0)  # Ray Train's data shutdown is fire-and-forget
    SEEN["coordinators"] = {k: v for k, v in _split_coordinators().items() if k not in coordinators}
    return cfg, result, marker


def test_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(killed_run):
    cfg, result, marker = killed_run
    assert marker.exists(), "the chaos hook never killed the worker"
    records = read_metrics(cfg.out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["start_epoch"] == 0
    assert records[1]["start_epoch"] == 1  # the new worker group started from epoch 0's checkpoint
    # ... which holds the weights only: the optimizer starts afresh, and the worker says so
    logged = "".join(SEEN["logged"].values())
    assert "resuming resnet18 from epoch 1/2 (weights only: the optimizer starts afresh)" in logged
    assert result["epochs_run"] == 2 and result["metrics"]["epoch"] == 1
    for r in records:  # both workers' images counted, metrics in range
        assert r["train_images"] > 0 and r["train_images_per_s"] > 0
        assert 0.0 <= r["val_top1"] <= 1.0 and "val_top5" not in r  # 5 classes: no top-5
        assert r["train_loss"] > 0 and torch.isfinite(torch.tensor(r["train_loss"]))


def test_each_epochs_split_ends_with_its_epoch_and_no_traceback_at_shutdown(killed_run):
    """Two workers split each epoch's view themselves; rank 0 ends that split's coordinator after the epoch.
    Ray Train's dataset manager (val's split) never saw it, so its shutdown, after the killed worker group
    and at the end, has no ended coordinator to complain about."""
    made = SEEN["coordinators"]
    # val's and each epoch's, in each of the two worker groups (rank 1 was killed in epoch 1)
    assert len(made) >= 3, made
    assert [i for i in made if _split_coordinators()[i] != "DEAD"] == []
    logged = SEEN["logged"]
    assert [n for n, text in logged.items() if "Failed to gracefully terminate the Ray Data executor" in text] == []


def test_a_local_cluster_starts_no_preemption_watcher(killed_run):
    """No node of one machine is ever drained by a cloud: a run on a local cluster (this one, twice started
    worker groups included) spends no process on watching for it (pipelines.ray_runtime.LOCAL_TRAIN_ENV)."""
    from pipelines.ray_private import actor_table

    classes = {a["ActorClassName"] for a in actor_table().values()}
    assert "TrainController" in classes and "PreemptionWatcher" not in classes, classes


def test_rerunning_the_same_command_continues_from_the_last_checkpoint(killed_run):
    cfg, _, _ = killed_run
    before = read_metrics(cfg.out)
    # The first run read its small epochs whole before their steps; this one streams them: its limit lies
    # between the val part's estimate and the train part's, so only val (sized by its own manifest) is kept.
    from pipelines.train.trainer import view_mib
    from pipelines.train.watch import expected_split_rows

    assert killed_run[1]["phases"]["data_in_memory"] is True and killed_run[1]["phases"]["val_in_memory"] is True
    rows = expected_split_rows(cfg)
    val_mib, train_mib = (view_mib(cfg, rows[s], cfg.workers) for s in ("val", "train"))
    assert val_mib < train_mib
    result = fit(cfg.model_copy(update={"epochs": 3, "chaos": None, "in_memory_mib": (val_mib + train_mib) / 2}))
    after = read_metrics(cfg.out)
    assert [r["epoch"] for r in after] == [0, 1, 2]
    assert after[:2] == before  # the finished epochs were not trained again
    assert after[2]["start_epoch"] == 2 and after[2]["train_images"] == before[1]["train_images"]
    assert result["checkpoint"].endswith("epoch_0002")
    assert result["phases"]["data_in_memory"] is False and result["phases"]["val_in_memory"] is True


def test_checkpoint_payload_and_load_checkpoint(killed_run):
    cfg, _, _ = killed_run
    path = latest_checkpoint(cfg.out)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"model", "epoch", "config"}  # save_optimizer: false
    weights = sum(t.numel() * t.element_size() for t in payload["model"].values())
    # SGD's momentum is one more tensor per weight: with it the file would be about twice the weights.
    assert Path(path).stat().st_size < 1.2 * weights
    for key in ("task", "arch", "num_classes", "image_size", "categories"):
        assert key in payload["config"]
    assert [c["label"] for c in payload["config"]["categories"]] == list(range(1, payload["config"]["num_classes"] + 1))
    for target in (cfg.out, path, path.rsplit("/", 1)[0]):  # run dir, checkpoint file, checkpoint dir
        model, config = load_checkpoint(target)
        assert not model.training and config["arch"] == "resnet18" and config["epoch"] == payload["epoch"]
    torch.testing.assert_close(model.state_dict()["net.fc.weight"], payload["model"]["net.fc.weight"])
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, config["num_classes"])


@pytest.mark.slow  # a 57M-parameter checkpoint per epoch; the towers themselves are checked in test_models_zoo
def test_two_tower_alexnet_trains_on_ray_train_and_evaluates(ray_cluster, data_dir, tmp_path):
    cfg = TrainConfig(task="classification", arch="alexnet2012", data=str(data_dir), out=str(tmp_path / "run"),
                      workers=1, **{**TINY, "epochs": 1, "image_size": 64})
    fit(cfg)
    model, config = load_checkpoint(cfg.out)
    assert type(model).__name__ == "AlexNet2012" and len(model.devices) == 2
    metrics = evaluate_checkpoint(cfg.out, data_dir, tmp_path / "eval")
    assert metrics["images"] > 0 and 0.0 <= metrics["top1"] <= 1.0
    assert metrics["inference_images_per_s"] > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["top1"] == metrics["top1"]


def test_bad_data_directory_is_named(ray_cluster, tmp_path):
    cfg = TrainConfig(arch="resnet18", data=str(tmp_path / "nowhere"), out=str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fit(cfg)


def test_a_small_view_is_read_whole_and_a_large_one_streams():
    """``in_memory_mib``: a worker's part of an epoch, estimated from the rows and the training size."""
    from pipelines.train.trainer import in_memory, view_mib

    cfg = TrainConfig(task="detection", arch="fasterrcnn_resnet18_fpn", data="-", out="-", image_size=128)
    # 480 images of up to 160 x 160 x 3 (scale jitter 1.25): 35 MiB, 17.6 on each of two workers.
    assert abs(view_mib(cfg, 480, 1) - 480 * 160 * 160 * 3 / 2**20) < 1e-9
    assert abs(view_mib(cfg, 480, 2) - view_mib(cfg, 480, 1) / 2) < 1e-9
    assert in_memory(cfg, 480, 1) and not in_memory(cfg, 118_000, 1)  # COCO's train split streams
    assert not in_memory(cfg, None, 1)  # unknown size: stream
    assert not in_memory(cfg.model_copy(update={"in_memory_mib": 0}), 480, 1)
    seg = cfg.model_copy(update={"task": "segmentation", "arch": "maskrcnn_resnet18_fpn"})
    assert view_mib(seg, 480, 1) == 2 * view_mib(cfg, 480, 1)  # masks: about three objects an image
    with pytest.raises(ValueError, match="in_memory_mib"):
        TrainConfig(arch="resnet18", data="-", out="-", in_memory_mib=-1)


def test_bn_momentum_sets_every_batch_norm_and_moves_the_statistics_by_it():
    """``bn_momentum``: every batch norm of the model (backbone and heads) follows its batches by that
    fraction; None keeps the architecture's own (SSDlite's 0.03, torch's 0.1)."""
    from pipelines.train.trainer import build_model, set_bn_momentum

    cfg = TrainConfig(task="detection", arch="ssdlite_mobilenet_v3", data="-", out="-", num_classes=3)
    default = build_model(cfg)
    fast = build_model(cfg.model_copy(update={"bn_momentum": 0.3}))  # what a training builds
    fast.load_state_dict(default.state_dict())  # the same weights (momentum is not part of the state)
    assert set_bn_momentum(build_model(cfg), 0.5) > 50
    norms = [m for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {m.momentum for m in norms} == {0.3}
    assert {m.momentum for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.03}
    assert any("head" in n for n, m in fast.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}
    moved = []
    for model in (default, fast):
        first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        model.train()
        model.compute_losses(images, [target, target])
        moved.append(float(first.running_mean.abs().max()))
    assert moved[0] > 0 and moved[1] == pytest.approx(moved[0] * 10, rel=1e-3)  # same batch, 10x the momentum
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="bn_momentum"):
            TrainConfig(arch="resnet18", data="-", out="-", bn_momentum=bad)


def test_each_split_is_sized_from_its_own_manifest(data_dir):
    """Whether the val view is kept in memory is decided by the val split's size, not the train split's."""
    from pipelines.data import read_manifest
    from pipelines.train.watch import expected_split_rows

    cfg = TrainConfig(task="detection", arch="ssdlite_mobilenet_v3", data=str(data_dir), out="-")
    rows = expected_split_rows(cfg)
    assert rows == {s: read_manifest(data_dir / s)["num_images"] for s in ("train", "val")}
    assert rows["train"] != rows["val"]
    objects = expected_split_rows(cfg.model_copy(update={"task": "classification", "arch": "resnet18"}))
    assert objects == {s: read_manifest(data_dir / s)["num_instances"] for s in ("train", "val")}
