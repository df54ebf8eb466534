"""`visionflow run` for real on tiny data: resume after a killed driver, skip what finished, isolate failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tiny everything: 12 synth images of 48 px, 32 px crops, one Ray Train worker on half a CPU.
TINY_TRAIN = {"epochs": 1, "batch_size": 8, "image_size": 32, "cpus_per_worker": 0.5, "augment_cpus": 0.25}


def _config(tmp_path, **sections) -> Path:
    doc = {"run_dir": str(tmp_path / "run"), "data": {"synth": {"images": 12, "size": 48}},
           "deploy": {"enabled": False}, **sections}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _record(run_dir: Path, stage: str) -> dict | None:
    path = run_dir / stage / "_stage.json"
    return json.loads(path.read_text()) if path.exists() else None


def _epochs(run_dir: Path, arch: str) -> list[int]:
    path = run_dir / "archs" / arch / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def _alive_train_controllers() -> set[str]:
    from pipelines.ray_private import actor_table  # the State API needs the dashboard

    return {i for i, a in actor_table().items() if a["ActorClassName"] == "TrainController" and a["State"] == "ALIVE"}


def test_rerun_skips_finished_stages_and_a_failing_arch_fails_only_its_branch(ray_cluster, tmp_path, capsys):
    from pipelines.cli import main

    cfg = _config(tmp_path, train={"archs": ["squeezenet1_1"], "defaults": TINY_TRAIN})
    run_dir = tmp_path / "run"
    before = _alive_train_controllers()  # not this run's: another test's, still shutting down
    assert main(["run", "--config", str(cfg)]) == 0
    # The training's Ray Train controller ended with its run: a long run does not pile them up.
    deadline = time.monotonic() + 30
    while _alive_train_controllers() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive_train_controllers() - before
    out = capsys.readouterr().out
    assert "squeezenet1_1" in out and "everything finished" in out
    data, train = _record(run_dir, "data"), _record(run_dir, "archs/squeezenet1_1/train")
    metrics = json.loads((run_dir / "archs/squeezenet1_1/eval/metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0
    # The eval stage took the training's last validation pass (one worker, the same val split): the same
    # metrics as evaluating the checkpoint again, and the inference speed measured.
    from pipelines.train import evaluate_checkpoint
    from pipelines.train.evaluate import metrics_from_training

    assert metrics["source"].startswith("the training's validation") and metrics["inference_images_per_s"] > 0
    again = evaluate_checkpoint(metrics["checkpoint"], metrics["data"])
    assert metrics["images"] == again["images"] > 0 and metrics["epoch"] == again["epoch"]
    for key in ("top1", "loss"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-4), key
    assert "top5" not in metrics and "top5" not in again  # 5 classes: every label is in the top 5
    assert metrics_from_training(metrics["checkpoint"], tmp_path) is None  # other data: evaluated again
    assert metrics_from_training(metrics["checkpoint"], metrics["data"], split="train") is None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed"] == [] and Path(summary["report"]).is_file()
    machine = summary["machine"]
    assert summary["seconds"] > 0 and machine["cores"] >= 1 and machine["load_average_at_start"] >= 0
    # Where the training stage's time went: its phases add up to the fit, the fit and the task to the stage.
    from benchmarks.stage_profile import PARTS, profile

    (row,) = profile(run_dir)["rows"]
    assert row["arch"] == "squeezenet1_1" and row["steps_s"] > 0 and row["train_start_s"] > 0
    assert all(row[k] >= 0 for k in PARTS + ("stage_s",)), row
    assert abs(sum(row[k] for k in PARTS) + row["stage_s"] - row["train_wall_s"]) < 0.5, row

    # Add an architecture whose build fails for real (an argument its builder does not take): only its
    # branch fails, the finished data and training are not redone, and the exit code says it failed.
    assert main(["run", "--config", str(cfg), "--archs", "squeezenet1_1,resnet18",
                 "--set", "train.per_arch={resnet18: {model_kwargs: {no_such_argument: 1}}}"]) == 1
    out = capsys.readouterr().out
    assert _record(run_dir, "data")["finished"] == data["finished"]
    assert _record(run_dir, "archs/squeezenet1_1/train")["finished"] == train["finished"]
    assert "data: skipped" in out and "train/squeezenet1_1: skipped" in out
    failed = json.loads((run_dir / "archs/resnet18/failed.json").read_text())
    assert failed["stage"] == "train" and "no_such_argument" in failed["error"]
    report = (run_dir / "compare/report.md").read_text()
    assert "| resnet18 | classification | failed (train)" in report and "| squeezenet1_1 | classification | done" in report
    assert "FAILED" in out and "1 failed: resnet18" in out


def _processes_titled(*words: str) -> list[str]:
    """Command lines (Ray sets a worker's title to ``ray::<what it runs>``) naming any of ``words``."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.startswith("ray::") and any(w in text for w in words):
            out.append(text.strip())
    return out


def test_waiting_lanes_share_one_process_and_go_on_after_a_failed_branch(ray_cluster):
    """Twelve lanes wait for branches that end (one of them by raising): they hold one process between
    them, not one each, and every next stage starts once its branch has ended, however it ended."""
    from pipelines.dag import stages
    from pipelines.dag.graph import AFTER, Node, release, submit

    def branch(i):
        time.sleep(10)
        if i == 3:
            raise RuntimeError("this branch fails")
        return i

    branches = [Node(f"branch/{i}", branch, (i,), {"num_cpus": 0}) for i in range(12)]
    gates = [Node(f"{AFTER}{i}", stages.settle, ([b],), {"num_cpus": 0}) for i, b in enumerate(branches)]
    nexts = [Node(f"next/{i}", lambda i, _after: i, (i, g), {"num_cpus": 0}) for i, g in enumerate(gates)]
    out, _ = submit(Node("gather", lambda *xs: sorted(xs), tuple(nexts), {"num_cpus": 0}))
    try:
        most: list[str] = []
        for _ in range(16):  # while the branches run, the gates wait
            time.sleep(0.5)
            most = max(most, _processes_titled("settle", "_LaneGate", "after/"), key=len)
        assert len(most) <= 1, most
        assert ray.get(out, timeout=120) == list(range(12))
    finally:
        release()


@pytest.mark.slow
def test_killed_driver_resumes_without_reingesting_or_retraining(ray_cluster, tmp_path):
    """Kill the driver while the second architecture trains; the rerun keeps the data and the finished
    architecture and continues the interrupted one from its checkpoint."""
    archs = ["squeezenet1_1", "resnet18"]
    cfg = _config(tmp_path, train={"archs": archs, "max_parallel": 1, "defaults": {**TINY_TRAIN, "epochs": 2}},
                  eval={"enabled": False})
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipelines", "run", "--config", str(cfg), "--set", f"ray_address={address}"]
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            done = [a for a in archs if _record(run_dir, f"archs/{a}/train")]
            midway = [a for a in archs if a not in done and _epochs(run_dir, a)]
            if done and midway:
                break
            assert driver.poll() is None, "the driver ended before it could be killed mid-training"
            time.sleep(0.2)
        else:
            pytest.fail("training did not reach the point to kill the driver")
        driver.kill()  # SIGKILL: no cleanup, as a crash or a lost laptop
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    (finished,), (interrupted,) = done, midway
    data, before = _record(run_dir, "data"), _record(run_dir, f"archs/{finished}/train")
    assert _record(run_dir, f"archs/{interrupted}/train") is None

    from pipelines.cli import main

    assert main(["run", "--config", str(cfg)]) == 0
    assert _record(run_dir, "data")["finished"] == data["finished"], "the data was ingested again"
    assert _record(run_dir, f"archs/{finished}/train")["finished"] == before["finished"], "retrained"
    resumed = _record(run_dir, f"archs/{interrupted}/train")
    assert resumed["outputs"]["resumed"] is True
    assert _epochs(run_dir, interrupted) == [0, 1], "epoch 0 was trained twice"
