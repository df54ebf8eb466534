"""What a training puts on the console, checked inside a real Ray Train worker (where ``print`` is Ray Train's,
routed to a logger): pycocotools' progress lines, Ray Data's per-execution lines and Ray Train's own INFO
lines stay off it; the controls show pycocotools' and Ray Data's reaching it the way the code did before.
And what a run's cluster puts on its console: Serve's logs stay in their files, Ray Data's lines about the
data stage's ingest in Ray Data's, and the deprecation warning Ray Train's state tracking gives in each
training's controller is dropped (the control, ``-m slow``, shows them reaching the console without the
run's settings)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(300)


def test_a_training_worker_keeps_library_chatter_off_the_console(ray_cluster, tmp_path):
    # Defined in the test, so that Ray pickles it by value (the workers cannot import this test module).
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.trainer import console_logging

    def _loop(config: dict) -> None:
        import contextlib
        import io
        import logging
        import os

        import ray.data
        from pycocotools.coco import COCO

        from pipelines.data import quiet_data_console, quiet_execution
        from vision.metrics.coco_eval import build_coco, summarize

        def console(name: str) -> logging.Handler:
            return next(h for h in logging.getLogger(name).handlers if h.get_name() == "console")

        def recorder(into: list, logger: str) -> logging.Filter:
            # What reaches the console handler from ``logger``; seen, not printed. (Ray Train's console
            # handler is also the root logger's, where its workers' print goes.)
            keep = logging.Filter()
            keep.filter = lambda r: (r.name.startswith(logger) and into.append(r.getMessage())) or False
            return keep

        def keeper(into: list) -> logging.Handler:
            return type("Keep", (logging.Handler,), {"emit": lambda self, r: into.append(r.getMessage())})()

        root, data, train, data_logged = [], [], [], []
        logging.getLogger().addHandler(keeper(root))
        logging.getLogger("ray.data").addHandler(keeper(data_logged))  # all Ray Data logs, console or not
        console("ray.data").addFilter(recorder(data, "ray.data"))
        console("ray.train").addFilter(recorder(train, "ray.train"))  # after Ray Train's own level filter
        out = {}

        # pycocotools through the evaluator, then the evaluator's old way (the control).
        gt = build_coco([{"id": 1, "width": 32, "height": 32}],
                        [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}],
                        [{"id": 1, "name": "a"}])
        out["ap50"] = summarize(gt, [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}],
                                "bbox")["bbox/AP50"]
        out["evaluator"] = list(root)
        with contextlib.redirect_stdout(io.StringIO()):
            COCO().createIndex()
        out["redirected"] = root[len(out["evaluator"]):]

        # Ray Data in a process of a local cluster this project started: quiet on the console from the
        # start (its logging config, RAY_DATA_LOGGING_CONFIG), everything in its log.
        ray.data.range(20).map_batches(lambda b: b).take_all()
        out["data_configured"], out["data_configured_logged"] = list(data), list(data_logged)
        # As in a process of a cluster joined by address, where Ray Data's console passes INFO: one
        # execution as Ray Data leaves it (the control), one quieted.
        os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
        console("ray.data").setLevel(logging.INFO)
        seen_before = len(data)
        ray.data.range(20).map_batches(lambda b: b).take_all()
        out["data_default"] = data[seen_before:]
        quiet_data_console()
        logged, seen_before = len(data_logged), len(data)
        rows = quiet_execution(ray.data.range(20).map_batches(lambda b: b)).take_all()
        out["data_rows"], out["data_quiet"] = len(rows), data[seen_before:]
        out["data_quiet_logged"] = data_logged[logged:]

        # Ray Train's logger at the run's level (console_logging: WARNING).
        logging.getLogger("ray.train").info("an info line of Ray Train")
        logging.getLogger("ray.train").warning("a warning of Ray Train")
        out["train"] = list(train)
        with open(config["out"], "w") as f:
            json.dump(out, f)

    out = tmp_path / "seen.json"
    TorchTrainer(_loop, train_loop_config={"out": str(out)}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="console", storage_path=str(tmp_path), logging_config=console_logging())
                 ).fit()
    seen = json.loads(out.read_text())
    assert seen["ap50"] == pytest.approx(1.0)
    assert not any("index" in m or "Average Precision" in m or "DONE" in m for m in seen["evaluator"]), seen["evaluator"]
    assert "creating index..." in seen["redirected"]  # redirect_stdout alone did not keep them off
    assert not any("xecution" in m for m in seen["data_configured"]), seen["data_configured"]
    assert any("execution finished" in m for m in seen["data_configured_logged"]), seen["data_configured_logged"]
    assert any("execution finished" in m for m in seen["data_default"]), seen["data_default"]
    assert seen["data_rows"] == 20 and not any("xecution" in m for m in seen["data_quiet"]), seen["data_quiet"]
    # The quieted view ran without progress bars: Ray Data logged its notice, which the console dropped.
    assert any("Progress bars disabled" in m for m in seen["data_quiet_logged"]), seen["data_quiet_logged"]
    assert not any("Progress bars" in m for m in seen["data_quiet"]), seen["data_quiet"]
    assert "a warning of Ray Train" in seen["train"] and "an info line of Ray Train" not in seen["train"], seen["train"]


# A local cluster as `visionflow run` starts it, Serve started as `deploy` starts it and a task doing what a
# run's data stage does (or, for the control, none of them: the same ingest as Ray Data leaves it), then
# what Ray Train's state tracking does in each training's controller and a Serve deployment called three
# times; what reached this driver's console, and the replica's own log file.
PROBE = """
import contextlib, json, logging, sys, time, warnings
import ray
from ray import serve
from pipelines.dag.runner import RUN_CLUSTER_ENV
from pipelines.ray_runtime import connect
from pipelines.serve.deploy import quiet_serve_client
RUN_DIR = sys.argv[1]
connect(num_cpus=2, dashboard=False, quiet=True, cluster_env=RUN_CLUSTER_ENV if RUN else None)

@ray.remote
def data():
    if RUN:
        from pipelines.dag.stages import data_stage
        counts = data_stage(RUN_DIR, {"synth": {"images": 12, "size": 48}})["outputs"]["counts"]
    else:
        from pipelines.data import ingest
        from vision.data.synth import write_synth
        write_synth(RUN_DIR + "/coco", images=12, size=48, val_fraction=0.2)
        counts = {"train": {"images": ingest(RUN_DIR + "/coco/annotations/instances_train.json",
                                             RUN_DIR + "/coco/train", RUN_DIR + "/shards")["num_images"]}}
    from ray.train import DataConfig
    DataConfig.default_ingest_options()  # as Ray Train's state tracking asks for them
    # A split coordinator, as a training of several workers has for each epoch: a process of Ray Data's
    # that sets up its logging afresh and executes the dataset there.
    import ray.data
    from pipelines.data import quiet_execution
    (split,) = quiet_execution(ray.data.range(8)).streaming_split(1)  # as a training's views, no progress bars
    counts["split_rows"] = sum(len(b["id"]) for b in split.iter_batches())
    warnings.warn("MARKER warning from a task")
    print("MARKER from a task", flush=True)
    return counts

counts = ray.get(data.remote())
quiet = quiet_serve_client if RUN else contextlib.nullcontext
with quiet():
    serve.start(proxy_location="Disabled")

@serve.deployment
class Echo:
    def __call__(self, _):
        # Serve's file handler, behind the MemoryHandler that buffers it (a record at a time by default)
        handlers = [getattr(h, "target", h) for h in logging.getLogger("ray.serve").handlers]
        return [h.baseFilename for h in handlers if hasattr(h, "baseFilename")]

with quiet():
    handle = serve.run(Echo.bind(), name="probe", route_prefix=None)
files = [handle.remote(None).result() for _ in range(3)][-1]
time.sleep(3)  # Ray's log monitor streams the workers' output to the driver about once a second
print(json.dumps({"files": files, "counts": counts}), flush=True)
"""

RAY_DATA_LINES = ("Starting execution of Dataset", "Execution plan of Dataset", "execution finished",
                  "Data sink ShardSink finished", "tqdm is not installed", "progress UI")


def _console(tmp_path, run: bool, **env) -> tuple[str, dict]:
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONWARNINGS"}, **env}
    res = subprocess.run([sys.executable, "-c", f"RUN = {run}\n" + PROBE, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr, json.loads(res.stdout.strip().splitlines()[-1])


def test_a_runs_cluster_keeps_ray_datas_serves_and_ray_trains_own_lines_off_the_console(tmp_path):
    console, seen = _console(tmp_path, run=True)
    counts = seen["counts"]
    assert counts["train"]["images"] + counts["val"]["images"] == 12
    # The task's own output and warnings did reach the console meanwhile.
    assert "MARKER from a task" in console and "MARKER warning from a task" in console, console[-3000:]
    assert not [line for line in RAY_DATA_LINES if line in console], console[-3000:]
    assert counts["split_rows"] == 8 and "(SplitCoordinator" not in console, console[-3000:]
    assert "exclude_resources" not in console, console[-3000:]
    # Ray's prefix of a worker's streamed output: "(ServeReplica:probe:Echo pid=...)", "(ServeController pid=...)"
    assert "(ServeReplica" not in console and "(ServeController" not in console, console[-3000:]
    assert "Started Serve" not in console and "is ready" not in console, console[-3000:]  # this process's client
    (log,) = seen["files"]
    with open(log) as f:
        assert f.read().count("__call__ OK") == 3  # each request, in the replica's file


def test_ray_still_gives_the_deprecation_warning_the_local_clusters_filter():
    """``ray_runtime.LOCAL_WARNINGS_ENV`` drops one warning of Ray's by its text: Ray still gives it, so
    the filter is needed, and still matches it (this fails when a Ray upgrade changes either)."""
    import warnings

    from ray.train import DataConfig

    from pipelines.ray_runtime import LOCAL_WARNINGS_ENV, RAY_OWN_DEPRECATION

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        DataConfig.default_ingest_options()
    assert any(str(w.message).startswith(RAY_OWN_DEPRECATION) for w in seen), [str(w.message) for w in seen]
    assert LOCAL_WARNINGS_ENV["PYTHONWARNINGS"] == f"ignore:{RAY_OWN_DEPRECATION}"


@pytest.mark.slow
def test_control_without_the_runs_settings_their_lines_reach_the_console(tmp_path):
    import importlib.util

    from pipelines import ray_private

    # A user's own settings win: Python's warnings, and a Ray Data logging config passing INFO to the console.
    console, seen = _console(tmp_path, run=False, PYTHONWARNINGS="default",
                             RAY_DATA_LOGGING_CONFIG=ray_private.quiet_data_logging_config("INFO"))
    assert seen["counts"]["train"]["images"] > 0 and seen["counts"]["split_rows"] == 8
    assert "Starting execution of Dataset" in console and "exclude_resources" in console, console[-3000:]
    assert "(SplitCoordinator" in console, console[-3000:]
    if importlib.util.find_spec("tqdm") is None:
        assert "tqdm is not installed" in console, console[-3000:]
    assert console.count("__call__ OK") == 3 and "Application 'probe' is ready" in console, console[-3000:]
