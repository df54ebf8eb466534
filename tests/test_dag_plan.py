"""`visionflow run --plan`: the DAG printed and drawn, nothing run."""
from __future__ import annotations

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
    assert "compare" in deps["deploy"] and "deploy" in deps["smoke"]
    # Dependencies come before the stages that need them.
    order = list(deps)
    assert order.index("data") < order.index("train/resnet18") < order.index("eval/resnet18") < order.index("compare")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not run_dir.exists(), "--plan must not run anything"


def test_max_parallel_lanes_order_the_trainings(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                   "train": {"archs": ["resnet18", "squeezenet1_1", "zfnet"], "max_parallel": 2}}))
    assert main(["run", "--config", str(cfg), "--plan", "--plan-png", str(tmp_path / "p.png")]) == 0
    deps = {ln.split("<-")[0].strip(): ln.split("<-")[1].strip() for ln in capsys.readouterr().out.splitlines()
            if "<-" in ln}
    # Two lanes: resnet18 (trained, then evaluated) then zfnet in one, squeezenet1_1 in the other.
    assert deps["train/resnet18"] == "data" and deps["train/squeezenet1_1"] == "data"
    assert set(deps["train/zfnet"].split(", ")) == {"data", "eval/resnet18"}
    assert not any(name.startswith("after/") for name in deps)


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
