"""TrainConfig and the pieces of the loop that need no cluster: schedules, losses, optimizer groups."""
from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipelines.train.config import TrainConfig
from pipelines.train.tasks import get_task
from pipelines.train.tasks.classification import classification_loss, topk_correct
from pipelines.train.trainer import format_progress, load_optimizer_state, make_optimizer

BASE = {"arch": "resnet18", "data": "d", "out": "o"}


def test_task_defaults_to_the_architectures_registry_task():
    assert TrainConfig(**BASE).task == "classification"
    assert TrainConfig(**{**BASE, "arch": "localizer"}).task == "localization"
    assert TrainConfig(**{**BASE, "task": "localization"}).task == "localization"  # a classifier as backbone


def test_bad_fields_are_named():
    with pytest.raises(ValidationError, match="batch_sise"):
        TrainConfig(**BASE, batch_sise=3)
    with pytest.raises(ValidationError, match="optimizer"):
        TrainConfig(**BASE, optimizer="rmsprop")
    with pytest.raises(KeyError, match="unknown model 'resnet19'"):
        TrainConfig(**{**BASE, "arch": "resnet19"})
    with pytest.raises(ValidationError, match="classification needs a classifier"):
        TrainConfig(**{**BASE, "arch": "localizer", "task": "classification"})
    # Every batch of 1 was skipped (batch norm needs two samples): the run trained nothing and exited 0.
    with pytest.raises(ValidationError, match="batch_size"):
        TrainConfig(**BASE, batch_size=1)
    for field in ("lr", "cpus_per_worker"):
        with pytest.raises(ValidationError, match=field):
            TrainConfig(**BASE, **{field: float("inf")})


def test_schedules():
    cos = TrainConfig(**BASE, epochs=4, lr=0.1)
    assert [round(cos.lr_factor(e), 4) for e in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    step = TrainConfig(**BASE, epochs=6, schedule="step", step_size=2, gamma=0.5, warmup_epochs=1)
    assert [step.lr_factor(e) for e in range(6)] == [0.5, 1.0, 1.0, 0.5, 0.5, 0.25]
    assert TrainConfig(**BASE, optimizer="adamw").learning_rate() == 1e-3


def test_googlenet_aux_losses_weigh_three_tenths():
    cfg = TrainConfig(**BASE)
    torch.manual_seed(0)
    logits, aux1, aux2 = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    loss, main = classification_loss((logits, aux1, aux2), y, cfg)
    expected = F.cross_entropy(logits, y) + 0.3 * (F.cross_entropy(aux1, y) + F.cross_entropy(aux2, y))
    torch.testing.assert_close(loss, expected)
    assert main is logits
    torch.testing.assert_close(classification_loss(logits, y, cfg)[0], F.cross_entropy(logits, y))


def test_topk_counts_and_caps_k_at_the_class_count():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_correct(logits, torch.tensor([1, 2]), 1) == 1
    assert topk_correct(logits, torch.tensor([1, 0]), 2) == 1
    assert topk_correct(logits, torch.tensor([2, 0]), 5) == 2


def test_top5_is_reported_only_above_five_classes():
    """With 5 classes every label is among the 5 highest logits: a top-5 of 1.0 said nothing of the model."""
    from pipelines.train.tasks.classification import evaluate

    torch.manual_seed(0)
    for k in (5, 10):
        model = torch.nn.Linear(4, k)
        x, y = torch.randn(64, 4), torch.randint(0, k, (64,))
        m = evaluate(model, [(x[:32], y[:32]), (x[32:], y[32:])], TrainConfig(**BASE, num_classes=k))
        ranks = (model(x).argsort(1, descending=True) == y[:, None]).float().argmax(1)
        assert m["top1"] == pytest.approx(float((ranks == 0).float().mean())) and m["images"] == 64
        if k == 5:
            assert "top5" not in m
        else:
            assert m["top5"] == pytest.approx(float((ranks < 5).float().mean()))
            assert m["top1"] < m["top5"] < 1.0


def test_optimizer_keeps_weight_decay_off_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = make_optimizer(model, TrainConfig(**BASE, weight_decay=0.01))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_runs_torchs_fused_kernel_with_the_same_update(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    plain, initial = copy.deepcopy(model), copy.deepcopy(model)
    cfg = TrainConfig(**BASE, optimizer=name, lr=0.01, weight_decay=0.01)
    opt = make_optimizer(model, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    reference = (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)(
        [{"params": [p for p in plain.parameters() if p.ndim > 1], "weight_decay": 0.01},
         {"params": [p for p in plain.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
        lr=0.01, **({"momentum": cfg.momentum} if name == "sgd" else {}), foreach=False)
    x = torch.randn(8, 3, 8, 8)
    for net, o in ((model, opt), (plain, reference)):
        for _ in range(3):
            o.zero_grad()
            net(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(next(model.parameters()), next(initial.parameters()))  # the steps moved it


def test_a_resumed_optimizer_keeps_its_fused_kernel_over_a_saved_unfused_state():
    model = torch.nn.Linear(3, 2)
    # as checkpoints from before the fused kernels saved it: the same groups, torch's default kernel
    old = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    old.step()
    opt = make_optimizer(model, TrainConfig(**BASE, optimizer="adamw"))
    load_optimizer_state(opt, old.state_dict())
    assert all(g["fused"] is True for g in opt.param_groups)
    assert opt.state[model.weight]["exp_avg"].abs().sum() > 0  # the saved moments were taken
    opt.step()


def test_a_resume_takes_the_saved_state_but_its_own_weight_decay_and_momentum():
    model = torch.nn.Linear(3, 2)
    old = make_optimizer(model, TrainConfig(**BASE, optimizer="sgd", weight_decay=1e-4, momentum=0.9))
    model(torch.randn(4, 3)).sum().backward()
    old.step()
    opt = make_optimizer(model, TrainConfig(**BASE, optimizer="sgd", weight_decay=0.0, momentum=0.5))
    load_optimizer_state(opt, old.state_dict())
    assert [(g["weight_decay"], g["momentum"]) for g in opt.param_groups] == [(0.0, 0.5), (0.0, 0.5)]
    assert opt.state[model.weight]["momentum_buffer"].abs().sum() > 0  # the saved buffers were taken


def test_task_plugins_are_found_by_name():
    for name in ("classification", "localization"):
        module = get_task(name)
        assert all(callable(getattr(module, f)) for f in ("build_model", "view", "collate", "train_step", "evaluate"))
    with pytest.raises(ValueError, match="unknown task 'pose'"):
        get_task("pose")


def test_progress_line_has_throughput_and_metrics():
    line = format_progress({"epoch": 0, "start_epoch": 0, "train_images_per_s": 12.5, "train_loss": 0.5,
                            "val_top1": 0.75}, epochs=3)
    assert line.startswith("epoch 1/3") and "12.5 img/s" in line and "val_top1 0.7500" in line


def test_the_driver_checks_that_the_model_builds_and_passes_every_registered_one():
    """Before Ray Train starts, a model is built on the meta device: settings its builder does not take are
    one line; every registered architecture passes (the two-tower AlexNet, which copies its towers to
    devices, is left to the worker), so the check can never fail a run that would train."""
    from vision.models import list_models, model_task
    from pipelines.train.trainer import _check_builds

    for arch in list_models():
        cfg = TrainConfig(**{**BASE, "arch": arch, "num_classes": 5})
        _check_builds(cfg, get_task(model_task(arch)))
    for arch in ("resnet18", "alexnet2012"):
        bad = TrainConfig(**{**BASE, "arch": arch, "num_classes": 5, "model_kwargs": {"no_such_argument": 1}})
        with pytest.raises(ValueError, match=f"{arch} does not build with these settings.*no_such_argument"):
            _check_builds(bad, get_task("classification"))


def test_a_checkpoint_that_is_torn_or_not_visionflows_is_refused_in_one_line(tmp_path, capsys):
    from pipelines.cli import main

    good = {"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 0, "optimizer": {}}
    torch.save({**good, "args": {}}, tmp_path / "reference.pt")  # torchvision's reference scripts' layout
    torch.save({**good, "config": {"arch": "resnet18"}}, tmp_path / "full.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:200])
    for name, needle in (("reference.pt", "not a visionflow checkpoint"), ("torn.pt", "not a readable checkpoint")):
        assert main(["eval", "--checkpoint", str(tmp_path / name), "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_local_paths_are_made_absolute_for_the_workers_and_uris_kept(tmp_path, monkeypatch):
    from pipelines.train.trainer import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig(**{**BASE, "out": "runs/r"}, init_from="runs/teacher", distill_from="s3://b/t"))
    assert (cfg.out, cfg.init_from, cfg.distill_from) == (str(tmp_path / "runs/r"), str(tmp_path / "runs/teacher"),
                                                          "s3://b/t")


def test_num_classes_below_the_datas_categories_is_refused(data_dir):
    from pipelines.train.trainer import resolve_config

    k = len(resolve_config(TrainConfig(**{**BASE, "data": str(data_dir)})).categories)
    with pytest.raises(ValueError, match=f"--num-classes 2 is smaller than the {k} categories"):
        resolve_config(TrainConfig(**{**BASE, "data": str(data_dir)}, num_classes=2))
    assert resolve_config(TrainConfig(**{**BASE, "data": str(data_dir)}, num_classes=k + 3)).num_classes == k + 3


def test_a_val_split_of_other_categories_is_refused_before_training(tmp_path):
    """Each split numbers its labels 1..K by its own categories: a val annotation file listing only the classes it
    uses (or other ids) had every epoch's validation score other classes, silently. Refused with both lists."""
    import json

    from pipelines.train import TrainConfig
    from pipelines.train.trainer import resolve_config

    cats = [{"id": 1, "name": "a", "label": 1}, {"id": 3, "name": "c", "label": 2}]
    for split, listed in (("train", cats), ("val", cats[1:])):
        (tmp_path / split).mkdir()
        (tmp_path / split / "_manifest.json").write_text(json.dumps({"categories": listed, "shards": []}))
    cfg = TrainConfig(arch="resnet18", data=str(tmp_path), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"the val split's categories \(ids \[3\]\) are not the train split's "
                                         r"\(ids \[1, 3\]\)"):
        resolve_config(cfg)
    (tmp_path / "val" / "_manifest.json").write_text(json.dumps({"categories": cats, "shards": []}))
    assert resolve_config(cfg).num_classes == 2


def test_a_folder_that_is_not_a_run_is_never_cleared_or_written_into(tmp_path):
    """``--out .`` (or a project folder) with ``--restart``: clear() deleted its checkpoints/, tensorboard/,
    config.json and metrics files; without it a fresh run overwrote its config.json. Refused, nothing touched; a
    run's own folder (run.json, or a config.json from before run.json) goes on as before."""
    import json

    from pipelines.train import TrainConfig, run_record
    from pipelines.train.trainer import resolve_config

    data = tmp_path / "data"
    cats = [{"id": 1, "name": "a", "label": 1}]
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        (data / split / "_manifest.json").write_text(json.dumps({"categories": cats, "shards": []}))
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "mine.ckpt").write_bytes(b"a user's own")
    (project / "config.json").write_text(json.dumps({"learning": "rate"}))
    cfg = resolve_config(TrainConfig(arch="resnet18", data=str(data), out=str(project)))
    for restart, verb in ((True, "delete"), (False, "overwrite")):
        with pytest.raises(ValueError, match=rf"is not a visionflow run, yet it holds checkpoints, config.json, which a "
                                             rf"training would {verb}"):
            run_record.start(str(project), cfg, restart=restart)
    assert (project / "checkpoints" / "mine.ckpt").read_bytes() == b"a user's own"
    assert json.loads((project / "config.json").read_text()) == {"learning": "rate"}
    assert not (project / "run.json").exists()
    legacy = tmp_path / "legacy"  # a run from before run.json: its config.json names arch, task and data
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"arch": "resnet18", "task": "classification", "data": str(data)}))
    run_record.start(str(legacy), cfg, restart=True)
    assert (legacy / "run.json").exists()


def test_what_would_fail_inside_ray_train_is_one_line_before_it_starts(ray_cluster, data_dir, tmp_path, capsys):
    """On this command's own local cluster: GPUs it does not have (Ray Train waited for them forever, retrying
    below the console's log level), an image size an architecture cannot take (AlexNet under 63 px: a worker's
    traceback, cut to 500 characters before its cause), a --model-kwargs value the builder refuses (hidden, then
    the same traceback). Each: exit 2, one line, before Ray Train starts; nothing written."""
    from pipelines.cli import main

    base = ["train", "--no-dashboard", "--data", str(data_dir), "--epochs", "1"]
    cases = ((["--arch", "resnet18", "--gpus-per-worker", "1"], "need 1 GPUs but the cluster has 0"),
             (["--arch", "alexnet", "--image-size", "32"], "--image-size 32 is too small for alexnet"),
             (["--arch", "localizer", "--model-kwargs", '{"backbone": "resnet-34"}'],
              "localizer does not build with these settings"))
    for k, (extra, needle) in enumerate(cases):
        out = tmp_path / f"run{k}"
        assert main([*base, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        (line,) = [l for l in err.splitlines() if l.startswith("visionflow train:")]
        assert needle in line and "Traceback" not in err, err
        assert not (out / "run.json").exists()


def test_a_hand_edited_lane_cost_file_is_read_for_what_it_holds(tmp_path, monkeypatch):
    """An entry without its numbers stopped the run's planning (--plan too) with a bare KeyError."""
    import json

    from pipelines.dag import lanes

    bad = tmp_path / "lane_costs.json"
    bad.write_text(json.dumps({"archs": {"resnet18": {"epoch_s": 2.0, "eval_s": 1.0}, "vgg16": {"epoch_s": "9"},
                                         "alexnet": None, "zfnet": {"eval_s": 1.0}}}))
    monkeypatch.setattr(lanes, "COSTS_FILE", bad)
    lanes._costs.cache_clear()
    try:
        assert set(lanes._costs()) == {"resnet18"}
        assert lanes.estimated_seconds("vgg16", {"epochs": 2}) == 2 * 2.0 + 1.0  # the median of what is measured
        bad.write_text(json.dumps({"archs": ["resnet18"]}))
        lanes._costs.cache_clear()
        assert lanes._costs() == {}
    finally:
        lanes._costs.cache_clear()
