"""`visionflow run --plan`: the DAG printed and drawn, nothing run."""
from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main


def test_plan_prints_every_stage_with_its_inputs_and_draws_it(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run_dir), "robustness": {"enabled": True},
                                   "train": {"archs": ["resnet18", "squeezenet1_1"], "max_parallel": 2}}))
    png = tmp_path / "plan.png"
    assert main(["run", "--config", str(cfg), "--plan", "--plan-png", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    deps = {ln.split("<-")[0].strip(): ln.split("<-")[1].strip() for ln in lines if "<-" in ln}
    assert deps["data"] == "-"
    assert deps["train/resnet18"] == "data" and deps["train/squeezenet1_1"] == "data"
    assert deps["eval/resnet18"].startswith("train/resnet18")
    # The robustness report is linked from the comparison's report, so the comparison waits for it.
    assert set(deps["robustness"].split(", ")) == {"eval/resnet18", "eval/squeezenet1_1", "data"}
    assert set(deps["compare"].split(", ")) == {"eval/resnet18", "eval/squeezenet1_1", "robustness"}
    # Deploy chooses from the evaluations alone: it runs beside the comparison, not after it.
    assert set(deps["deploy"].split(", ")) == {"eval/resnet18", "eval/squeezenet1_1"} and "deploy" in deps["smoke"]
    # Dependencies come before the stages that need them.
    order = list(deps)
    assert order.index("data") < order.index("train/resnet18") < order.index("eval/resnet18") < order.index("compare")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not run_dir.exists(), "--plan must not run anything"


def test_max_parallel_lanes_order_the_trainings(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                   "train": {"archs": ["squeezenet1_1", "resnet18", "zfnet"], "max_parallel": 2,
                                             "defaults": {"epochs": 1}, "per_arch": {"resnet18": {"epochs": 30}}}}))
    assert main(["run", "--config", str(cfg), "--plan", "--plan-png", str(tmp_path / "p.png")]) == 0
    deps = {ln.split("<-")[0].strip(): ln.split("<-")[1].strip() for ln in capsys.readouterr().out.splitlines()
            if "<-" in ln}
    # Two lanes: resnet18's 30 epochs alone in one; squeezenet1_1 (trained, then evaluated) then zfnet in
    # the other (dealt out in turn, resnet18 and zfnet would have shared a lane).
    assert deps["train/resnet18"] == "data" and deps["train/squeezenet1_1"] == "data"
    assert set(deps["train/zfnet"].split(", ")) == {"data", "eval/squeezenet1_1"}
    # The comparison gets the branches in the run's order, not the lanes'.
    assert deps["compare"] == "eval/squeezenet1_1, eval/resnet18, eval/zfnet"
    assert not any(name.startswith("after/") for name in deps)


def test_lanes_get_about_the_same_estimated_work():
    """Longest first onto the least-loaded lane; the run's order within a lane; the estimate is epochs x
    the measured per-epoch cost (+ evaluation), the median architecture's for one never measured."""
    from pipelines.dag import lanes

    seconds = {"a": 10.0, "b": 50.0, "c": 20.0, "d": 20.0, "e": 5.0, "f": 5.0}
    plan = lanes.assign(list(seconds), seconds, 2)
    assert plan == [["b", "e"], ["a", "c", "d", "f"]]  # 55 s and 55 s (in turn: a c e = 35, b d f = 75)
    assert lanes.assign(["x", "y"], {"x": 1.0, "y": 1.0}, 3) == [["x"], ["y"]]  # no empty lanes
    assert lanes.assign(["x", "y"], {"x": 1.0, "y": 2.0}, 1) == [["x", "y"]]
    costs = lanes._costs()
    assert {"resnet18", "ssdlite_mobilenet_v3", "vgg16"} <= set(costs)
    one = lanes.estimated_seconds("resnet18", {"epochs": 1})
    assert lanes.estimated_seconds("resnet18", {"epochs": 3}) - one == pytest.approx(2 * costs["resnet18"]["epoch_s"])
    assert lanes.estimated_seconds("vgg16", {"epochs": 1}) > lanes.estimated_seconds("squeezenet1_1", {"epochs": 1})
    assert lanes.estimated_seconds("not_measured", {"epochs": 1}) > 0


def test_plan_without_deploy_ends_at_the_comparison(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {"archs": ["zfnet"]}}))
    assert main(["run", "--config", str(cfg), "--plan", "--no-deploy", "--plan-png", str(tmp_path / "p.png")]) == 0
    stages = [ln.split("<-")[0].strip() for ln in capsys.readouterr().out.splitlines() if "<-" in ln]
    assert stages == ["data", "train/zfnet", "eval/zfnet", "compare", "finish"]


def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml"), "--plan"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--plan", "--archs", "resnet18,nonet"]) == 2
    assert "nonet" in capsys.readouterr().err
    assert main(["run", "--plan", "--set", "train.max_parallel"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
