"""The run directory loses nothing: a changed setting sets old outputs aside, two runs cannot share one
directory, a run refuses a cluster it cannot fit, and the data stage notices files changed in place."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import yaml

from pipelines.dag.config import DataStage, RunConfig
from pipelines.dag.lock import LOCK, RunDirBusy, RunLock
from pipelines.dag.placement import ClusterTooSmall, plan
from pipelines.dag.records import Stage, prune_set_aside, set_aside_outputs, stage_key
from pipelines.storage import RunDir


def _finish(run: RunDir, name: str, key: str, payload: str) -> Stage:
    stage = Stage(run, name, key)
    assert stage.finished() is None
    stage.begin(resumable=True)
    run.write_bytes(f"{name}/checkpoints/epoch_0000/checkpoint.pt", payload.encode())
    stage.done({}, {}, {"run_dir": run.path(name)}, 1.0)
    return stage


def test_a_changed_setting_sets_the_finished_output_aside_and_changing_back_takes_it_back(tmp_path):
    run = RunDir(tmp_path / "run")
    name = "archs/resnet18/train"
    one, two = stage_key("train", {"epochs": 1}), stage_key("train", {"epochs": 2})
    _finish(run, name, one, "one epoch")
    # epochs: 2 -> a new training; the 1-epoch checkpoints are kept (before: deleted).
    _finish(run, name, two, "two epochs")
    assert (tmp_path / "run" / f"{name}@{one}/checkpoints/epoch_0000/checkpoint.pt").read_text() == "one epoch"
    assert (tmp_path / "run" / name / "checkpoints/epoch_0000/checkpoint.pt").read_text() == "two epochs"
    # Back to epochs: 1 -> finished, nothing to redo; the 2-epoch output is set aside in turn.
    rec = Stage(run, name, one).finished()
    assert rec is not None and rec["key"] == one
    assert (tmp_path / "run" / name / "checkpoints/epoch_0000/checkpoint.pt").read_text() == "one epoch"
    assert (tmp_path / "run" / f"{name}@{two}/checkpoints/epoch_0000/checkpoint.pt").read_text() == "two epochs"
    assert set_aside_outputs(run) == [f"{name}@{two}"]


def test_an_interrupted_training_set_aside_is_resumed_when_its_setting_comes_back(tmp_path):
    run = RunDir(tmp_path / "run")
    name = "archs/zfnet/train"
    one, two = stage_key("train", {"lr": 0.1}), stage_key("train", {"lr": 0.2})
    Stage(run, name, one).begin(resumable=True)  # started, never finished (killed)
    run.write_bytes(f"{name}/checkpoints/epoch_0000/checkpoint.pt", b"partial")
    _finish(run, name, two, "other")
    assert Stage(run, name, one).begin(resumable=True) is True  # resumes its own checkpoints
    assert (tmp_path / "run" / name / "checkpoints/epoch_0000/checkpoint.pt").read_bytes() == b"partial"


def test_prune_deletes_only_the_set_aside_outputs(tmp_path):
    run = RunDir(tmp_path / "run")
    a, b = stage_key("eval", {"x": 1}), stage_key("eval", {"x": 2})
    _finish(run, "archs/vgg11/eval", a, "a")
    _finish(run, "archs/vgg11/eval", b, "b")
    _finish(run, "data", stage_key("data", {}), "d")
    assert prune_set_aside(run) == [f"archs/vgg11/eval@{a}"]
    assert not (tmp_path / "run" / f"archs/vgg11/eval@{a}").exists()
    assert Stage(run, "archs/vgg11/eval", b).finished() and Stage(run, "data", stage_key("data", {})).finished()


def _cfg(tmp_path, **sections) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {"archs": ["squeezenet1_1"]},
                                    "deploy": {"enabled": False}, **sections}))
    return str(path)


def test_a_second_run_on_the_same_directory_is_refused_naming_the_first(tmp_path, capsys):
    from pipelines.cli import main

    cfg = _cfg(tmp_path)
    # A live owner: another process of this host (a real one).
    owner = subprocess.Popen(["sleep", "120"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid,
                                                         "command": "visionflow run", "started": time.time()}))
        t0 = time.monotonic()
        assert main(["run", "--config", cfg]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {owner.pid}" in err[0] and "in use" in err[0], err
        assert time.monotonic() - t0 < 10
        with pytest.raises(RunDirBusy):
            RunLock(tmp_path / "run").acquire()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    # Its owner was killed: the stale lock is taken over.
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK).exists()


def test_two_runs_taking_over_one_stale_lock_leave_it_to_one(tmp_path):
    """B reads the stale lock of a killed run; A takes it over before B does: B must not remove A's live
    lock but refuse, and the lock is never seen half written."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                        "command": "visionflow run", "started": 0}))
    a, b = RunLock(run, "run A"), RunLock(run, "run B")
    read = b.run.read_json

    def read_then_a_takes_over(name):
        doc = read(name)
        if a._beat is None:
            a.acquire()  # between B's read of the stale lock and B's removal of it
        return doc

    b.run.read_json = read_then_a_takes_over
    with pytest.raises(RunDirBusy, match="run A"):
        b.acquire()
    assert json.loads((run / LOCK).read_text())["command"] == "run A"
    a.release()
    assert not (run / LOCK).exists() and [p.name for p in run.iterdir()] == []  # nothing left aside


def test_a_lock_held_in_this_process_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=str(os.getpid())):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run"):  # released: free again
        pass


def test_lanes_fit_the_cluster_and_a_training_that_cannot_fit_is_refused():
    cfg = RunConfig.model_validate({"train": {"archs": ["resnet18", "ssdlite_mobilenet_v3"], "max_parallel": 2}})
    # 1 worker x 1 CPU + 1 for its data pipeline: a 2-CPU laptop trains one at a time.
    assert plan(cfg, cpus=2).lanes == 1
    assert plan(cfg, cpus=4).lanes == 2
    assert plan(cfg, cpus=64).lanes == 2  # max_parallel stays the cap
    with pytest.raises(ClusterTooSmall, match="needs 2 CPUs .* the cluster has 1"):
        plan(cfg, cpus=1)
    gpu = RunConfig.model_validate({"train": {"archs": ["resnet18"], "defaults": {"gpus_per_worker": 1}}})
    with pytest.raises(ClusterTooSmall, match="GPU"):
        plan(gpu, cpus=8, gpus=0)


def test_run_refuses_at_once_when_one_training_cannot_fit_the_cluster(ray_cluster, tmp_path, capsys):
    from pipelines.cli import main

    cfg = _cfg(tmp_path, train={"archs": ["squeezenet1_1"], "defaults": {"cpus_per_worker": 16}})
    t0 = time.monotonic()
    assert main(["run", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "train/squeezenet1_1 needs 17 CPUs" in err and "the cluster has 4" in err
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "run" / "data").exists(), "nothing ran"


def test_the_data_stage_is_keyed_on_content_not_paths(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.jpg").write_bytes(b"\xff\xd8 one")
        (tmp_path / f"{split}.json").write_text('{"images": [], "annotations": [], "categories": [{"id": 1}]}')
    cfg = DataStage.model_validate({"source": "coco", **{s: {"annotations": str(tmp_path / f"{s}.json"),
                                                              "images": str(tmp_path / s)} for s in ("train", "val")}})

    def key():
        return stage_key("data", cfg.identity())

    first = key()
    assert key() == first  # stable while nothing changes
    # The annotation JSON edited in place, same size and mtime: its hash changes the key.
    path = tmp_path / "train.json"
    st = path.stat()
    path.write_text(path.read_text().replace('"id": 1', '"id": 2'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = key()
    assert second != first
    # An image replaced in place (new bytes, new mtime).
    time.sleep(0.01)
    (tmp_path / "val" / "a.jpg").write_bytes(b"\xff\xd8 two!")
    assert key() != second
