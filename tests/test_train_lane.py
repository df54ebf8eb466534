"""A lane: several single-worker trainings in one Ray Train run (``pipelines.train.lane``): one controller for
all of them, a training that fails ends only itself, a worker killed mid-lane is replaced and the lane goes on
where it was, and what a lane trained loads, evaluates and resumes like any run."""
from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.storage import read_metrics
from pipelines.train import TrainConfig, fit, load_checkpoint
from pipelines.train.lane import LANE_FILE, fit_lane

TINY = {"task": "classification", "epochs": 2, "batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5,
        "augment_cpus": 0.25, "optimizer": "adamw", "lr": 0.001}


def _controllers() -> set[str]:
    from pipelines.ray_private import actor_table

    return {i for i, a in actor_table().items() if a["ActorClassName"] == "TrainController"}


@pytest.fixture(scope="module")
def lane(ray_cluster, data_dir, tmp_path_factory):
    """squeezenet1_1 (trains), alexnet on 32 px crops (refused before it trains: its feature map shrinks to
    nothing), resnet18 whose
    worker kills its own process (SIGKILL) at the start of its epoch 2, once: the lane has one restart; an SSDlite
    on one training image, whose one batch is below the two images a step needs (no step at all)."""
    root = tmp_path_factory.mktemp("lane")
    marker = root / "killed.marker"
    cfgs = [TrainConfig(arch="squeezenet1_1", data=str(data_dir), out=str(root / "squeezenet1_1"), max_failures=1, **TINY),
            TrainConfig(arch="alexnet", data=str(data_dir), out=str(root / "alexnet"), **TINY),
            TrainConfig(arch="resnet18", data=str(data_dir), out=str(root / "resnet18"),
                        chaos={"kill_at_epoch": 1, "marker": str(marker), "rank": 0}, **TINY),
            TrainConfig(arch="ssdlite_mobilenet_v3", data=str(data_dir), out=str(root / "ssdlite"),
                        **{**TINY, "task": "detection", "epochs": 1, "batch_size": 2, "image_size": 64},
                        limit_train_images=1, model_kwargs={"size": 64})]
    before = _controllers()
    results = fit_lane(cfgs)
    return cfgs, results, marker, _controllers() - before


def test_one_controller_trains_the_lane_and_a_failed_training_ends_only_itself(lane):
    cfgs, (squeeze, alex, resnet, idle), _, controllers = lane
    assert len(controllers) == 1, controllers  # one Ray Train run for the four trainings
    assert isinstance(alex, ValueError) and "--image-size 32 is too small for alexnet" in str(alex), alex
    # A training that ran no step fails with what to change, before its validation, and saves no checkpoint
    # (it would hold the untouched initial weights as a trained epoch).
    assert isinstance(idle, Exception) and "epoch 1 ran no training step" in str(idle), idle
    assert not read_metrics(cfgs[3].out) and not storage.exists(cfgs[3].out, "checkpoints")
    for cfg, result in ((cfgs[0], squeeze), (cfgs[2], resnet)):
        assert isinstance(result, dict), result
        assert result["epochs_run"] == 2 and result["checkpoint"].endswith("epoch_0001")
        model, config = load_checkpoint(cfg.out)
        assert config["arch"] == cfg.arch and config["epoch"] == 1
        assert result["phases"]["steps_s"] > 0 and result["seconds"] > 0
        assert storage.exists(cfg.out, LANE_FILE)  # what the run's DAG reads to skip it next time
    # Ray Train's start is paid once: the lane's later trainings start at once.
    assert resnet["phases"]["train_start_s"] < squeeze["phases"]["train_start_s"]


def test_a_worker_killed_mid_lane_is_replaced_and_the_lane_goes_on_where_it_was(lane):
    cfgs, _, marker, _ = lane
    assert marker.exists(), "the chaos hook never killed the worker"
    squeeze, resnet = read_metrics(cfgs[0].out), read_metrics(cfgs[2].out)
    # The training that had ended before the kill was not run again; the killed one resumed from its
    # epoch-1 checkpoint, not from scratch.
    assert [r["epoch"] for r in squeeze] == [0, 1] and all(r["start_epoch"] == 0 for r in squeeze)
    assert [r["epoch"] for r in resnet] == [0, 1] and resnet[1]["start_epoch"] == 1


def test_fit_resumes_a_training_whose_lane_worker_died_for_good(ray_cluster, data_dir, tmp_path):
    """A lane with no restart left (``max_failures`` 0) whose worker is killed (SIGKILL) at the start of
    epoch 2: the lane never ends that training (no lane.json), and the training's own ``fit``, what a
    run's training stage does next, resumes it from the lane's epoch-1 checkpoint instead of from scratch
    (a lane's run directory is any run's: ``fit`` takes its record, checkpoints and metrics as they are)."""
    marker = tmp_path / "killed.marker"
    cfg = TrainConfig(arch="squeezenet1_1", data=str(data_dir), out=str(tmp_path / "run"), max_failures=0,
                      chaos={"kill_at_epoch": 1, "marker": str(marker), "rank": 0}, **TINY)
    with pytest.raises(Exception):  # Ray Train's: the worker group failed, no restart left
        fit_lane([cfg])
    assert marker.exists() and not storage.exists(cfg.out, LANE_FILE)
    assert [r["epoch"] for r in read_metrics(cfg.out)] == [0]
    result = fit(cfg)  # the marker is there: the chaos hook does not kill again
    records = read_metrics(cfg.out)
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["start_epoch"] == 1, records
    assert result["metrics"]["epoch"] == 1 and load_checkpoint(cfg.out)[1]["epoch"] == 1
