"""What a training puts on the console, checked inside a real Ray Train worker (where ``print`` is Ray Train's,
routed to a logger): pycocotools' progress lines, Ray Data's per-execution lines and Ray Train's own INFO
lines stay off it; the controls show pycocotools' and Ray Data's reaching it the way the code did before."""
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

        # Ray Data: one execution as Ray Data leaves it (the control), one quieted.
        ray.data.range(20).map_batches(lambda b: b).take_all()
        out["data_default"] = list(data)
        quiet_data_console()
        logged = len(data_logged)
        rows = quiet_execution(ray.data.range(20).map_batches(lambda b: b)).take_all()
        out["data_rows"], out["data_quiet"] = len(rows), data[len(out["data_default"]):]
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
    assert any("execution finished" in m for m in seen["data_default"]), seen["data_default"]
    assert seen["data_rows"] == 20 and not any("xecution" in m for m in seen["data_quiet"]), seen["data_quiet"]
    # The quieted view ran without progress bars: Ray Data logged its notice, which the console dropped.
    assert any("Progress bars disabled" in m for m in seen["data_quiet_logged"]), seen["data_quiet_logged"]
    assert not any("Progress bars" in m for m in seen["data_quiet"]), seen["data_quiet"]
    assert "a warning of Ray Train" in seen["train"] and "an info line of Ray Train" not in seen["train"], seen["train"]
