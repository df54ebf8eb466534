"""Progress a person can follow, the training slots that bound parallel trainings, the deploy choice."""
from __future__ import annotations

import os

from pipelines.dag.progress import RunBoard, _reap, format_line


def test_progress_line_names_stage_and_running_done_failed_architectures():
    states = {"data": {"status": "skipped", "time": 1}, "train/resnet18": {"status": "done", "time": 2},
              "train/vgg11": {"status": "running", "time": 3}, "train/zfnet": {"status": "waiting", "time": 3},
              "train/yolo_v1": {"status": "failed", "time": 4, "error": "OOM"},
              "eval/resnet18": {"status": "running", "time": 5}}
    line = format_line(states)
    assert "stage=eval" in line and "training: vgg11" in line and "evaluating: resnet18" in line
    assert "trained 1/4" in line and "failed: yolo_v1" in line


def test_a_training_that_dies_holding_its_slot_gives_it_back(ray_cluster):
    ray = ray_cluster
    board = RunBoard.remote(1)

    @ray.remote(max_retries=0, num_cpus=0)
    def hold_and_die(board):
        ray.get(board.acquire_slot.remote("resnet18"))
        os._exit(1)  # as an out-of-memory kill: no finally, no release

    dead = hold_and_die.remote(board)
    ray.wait([dead], timeout=120)
    # A retry of the same architecture keeps the slot it held; another one must wait for it.
    ray.get(board.acquire_slot.remote("resnet18"), timeout=30)
    waiting = board.acquire_slot.remote("vgg11")
    assert not ray.wait([waiting], timeout=1)[0]
    _reap({"train/resnet18": dead}, board)
    ray.get(waiting, timeout=30)  # the dead holder's slot was released
    assert ray.get(board.snapshot.remote())["train/resnet18"]["status"] == "failed"
    ray.kill(board)


def test_deploy_picks_the_best_instance_model_of_each_task():
    from pipelines.dag.stages import best_arch

    def branch(arch, task, status="done", **metrics):
        return {"arch": arch, "task": task, "status": status, "metrics": metrics}

    branches = [branch("yolo_v1", "detection", **{"bbox/AP50": 0.4}),
                branch("fasterrcnn_resnet18_fpn", "detection", **{"bbox/AP50": 0.7}),
                branch("ssdlite_mobilenet_v3", "detection", status="failed"),
                branch("maskrcnn_resnet18_fpn", "segmentation", **{"segm/AP50": 0.5, "bbox/AP50": 0.6}),
                branch("fcn_resnet50", "segmentation", miou=0.9)]  # semantic: no instances to serve
    assert best_arch(branches, "detection")["arch"] == "fasterrcnn_resnet18_fpn"
    assert best_arch(branches, "segmentation")["arch"] == "maskrcnn_resnet18_fpn"
    assert best_arch(branches[4:], "segmentation") is None
