"""Progress a person can follow, a training whose process died, the deploy choice."""
from __future__ import annotations

import os

from pipelines.dag.progress import RunBoard, _watch, format_line


def test_progress_line_names_stage_and_running_done_failed_architectures():
    states = {"data": {"status": "skipped", "time": 1}, "train/resnet18": {"status": "done", "time": 2},
              "train/vgg11": {"status": "running", "time": 3}, "train/zfnet": {"status": "waiting", "time": 3},
              "train/yolo_v1": {"status": "failed", "time": 4, "error": "OOM"},
              "eval/resnet18": {"status": "running", "time": 5}}
    line = format_line(states, total=6)
    assert "stage=eval" in line and "training: vgg11" in line and "evaluating: resnet18" in line
    assert "trained 1/6" in line and "failed: yolo_v1" in line


def test_a_training_whose_process_dies_is_reported_failed(ray_cluster):
    ray = ray_cluster
    board = RunBoard.remote()

    @ray.remote(max_retries=0, num_cpus=0)
    def dies(board):
        ray.get(board.update.remote("train/resnet18", "running"))
        os._exit(1)  # as an out-of-memory kill: the stage cannot report it

    dead = dies.remote(board)
    ray.wait([dead], timeout=120)
    _watch({"train/resnet18": dead}, board)
    state = ray.get(board.snapshot.remote())["train/resnet18"]
    assert state["status"] == "failed" and "died" in state["error"].lower()
    ray.kill(board)


def test_a_stage_line_reaches_the_printout_even_when_the_board_is_slow(ray_cluster):
    """A stage's result can reach the driver before its report reaches the board; the driver's last look
    at the board must still show the stage (a slow board makes the race certain)."""
    import asyncio
    import io

    from pipelines.dag.progress import follow
    from pipelines.dag.stages import _skipped

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class SlowBoard:
        def __init__(self):
            self._states = {}

        async def update(self, name, status, **info):
            await asyncio.sleep(1.0)
            self._states[name] = {"status": status, "time": 1.0, **info}

        async def snapshot(self):
            return dict(self._states)

    @ray.remote(num_cpus=0)
    def stage(board):
        return _skipped(board, "data", {"seconds": 3.0})

    board = SlowBoard.remote()
    out = io.StringIO()
    assert follow(stage.remote(board), board, poll_s=0.1, out=out)["skipped"] is True
    assert "data: skipped" in out.getvalue()
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


def test_deploy_of_a_run_whose_only_detector_crashed_fails_rather_than_skips(ray_cluster, tmp_path):
    """Deploy gathers the branches itself (beside the comparison): a branch whose process died still counts
    as a failed detector, so the run's deploy fails naming it instead of passing as a classifiers-only run."""
    from pipelines.dag.stages import deploy_stage

    ray = ray_cluster

    @ray.remote(max_retries=0)
    def crashed():
        raise RuntimeError("the training process died")

    classifier = {"arch": "resnet18", "task": "classification", "status": "done", "metrics": {"top1": 0.5}}
    out = deploy_stage(str(tmp_path), {}, [crashed.remote(), classifier], ["yolo_v1", "resnet18"])
    assert out["status"] == "failed" and "yolo_v1" in out["error"]
    only_classifiers = deploy_stage(str(tmp_path), {}, [classifier], ["resnet18"])
    assert only_classifiers["status"] == "skipped"
