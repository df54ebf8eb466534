"""Starting from other weights: ``--init-from`` a torchvision state dict (saved here from torchvision's own
builder: nothing is downloaded) or a visionflow checkpoint, tensors loaded by name and shape, a head of
another class count skipped and reported; ``--pretrained`` without the internet is one line that points to
``--init-from``. (That a resume ignores them: ``test_train_watch.py``, whose run resumes.)"""
from __future__ import annotations

import argparse
import json
import urllib.error

import pytest
import torch

from pipelines import cli
from pipelines.storage import read_metrics
from pipelines.train import TrainConfig, fit, latest_checkpoint, trainer
from pipelines.train import init_weights
from pipelines.train.tasks import get_task
from pipelines.train.trainer import ingest_config

ARCH = "fasterrcnn_mobilenet_v3_fpn"  # torchvision's fasterrcnn_mobilenet_v3_large(_320)_fpn, wrapped
K = 5  # the synth shapes: circle, square, triangle, hexagon, ellipse
HEAD = {"net.roi_heads.box_predictor.cls_score.weight", "net.roi_heads.box_predictor.cls_score.bias",
        "net.roi_heads.box_predictor.bbox_pred.weight", "net.roi_heads.box_predictor.bbox_pred.bias"}


@pytest.fixture(scope="module")
def coco_state(tmp_path_factory):
    """A COCO-shaped (91 classes) state dict from torchvision's builder, saved as torchvision publishes
    them (a plain state_dict) and as its reference scripts do (under "model")."""
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                        num_classes=91)
    state = net.state_dict()
    folder = tmp_path_factory.mktemp("weights")
    plain, wrapped = folder / "fasterrcnn_mobilenet_v3_large_fpn-coco.pth", folder / "reference_checkpoint.pth"
    torch.save(state, plain)
    # as torchvision's references/detection/train.py writes it: its command line too, an argparse.Namespace
    torch.save({"model": state, "epoch": 25, "args": argparse.Namespace(lr=0.02, dataset="coco", epochs=26)}, wrapped)
    return state, plain, wrapped


def _cfg(path, **kw) -> TrainConfig:
    return TrainConfig(arch=ARCH, data="unused", out="unused", num_classes=K, init_from=str(path), **kw)


@pytest.mark.parametrize("form", ["plain", "under a model key"])
def test_a_torchvision_state_dict_loads_by_name_and_shape_and_the_other_head_is_skipped(coco_state, form):
    state, plain, wrapped = coco_state
    cfg = _cfg(plain if form == "plain" else wrapped)
    torch.manual_seed(0)
    model = get_task(cfg.task).build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_weights.apply(model, cfg)  # what every worker runs before training

    loaded = model.state_dict()
    assert len(report.loaded) == report.tensors - 4 and report.mapping == ("", "net.")
    for name in report.loaded:  # every loaded tensor is the file's, under the wrapper's prefix
        assert torch.equal(loaded[name], state[name[len("net."):]]), name
    assert {n for n, _, _ in report.shape_mismatch} == HEAD  # 91 + 1 classes in the file, K + 1 here
    for name in HEAD:  # re-initialised: left as the builder made it
        assert torch.equal(loaded[name], fresh[name])
    assert not report.missing and not report.unused

    line = report.line()
    assert line.startswith(f"init from {cfg.init_from}: loaded {report.tensors - 4} of the model's {report.tensors} tensors")
    assert "skipped 4 whose shape differs" in line and "net.roi_heads.box_predictor.cls_score.weight [6, 1024] vs [91, 1024]" in line
    assert "\n" not in line


def test_a_visionflow_checkpoint_and_ddp_prefixed_keys_load_whole(coco_state, tmp_path):
    cfg = _cfg(coco_state[1])
    source = get_task(cfg.task).build_model(cfg)
    ckpt = tmp_path / "checkpoint.pt"  # the trainer's payload
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 3, "config": {}}, ckpt)
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, ddp)
    for path in (ckpt, ddp):
        model = get_task(cfg.task).build_model(cfg)
        report = init_weights.apply(model, _cfg(path))
        assert len(report.loaded) == report.tensors and not report.skipped and not report.unused
        assert torch.equal(model.state_dict()["net.roi_heads.box_predictor.cls_score.weight"],
                           source.state_dict()["net.roi_heads.box_predictor.cls_score.weight"])


def test_bad_sources_are_refused_with_one_line(coco_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        init_weights.check(_cfg(tmp_path / "nowhere.pth"))
    text = tmp_path / "notes.pth"
    text.write_text("not a tensor file")
    with pytest.raises(ValueError, match="is not a state dict torch.load reads"):
        init_weights.check(_cfg(text))
    other = tmp_path / "resnet18.pth"  # a classifier's weights: nothing matches a MobileNet detector
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(ValueError, match="none of its .* tensors .* matches a tensor of fasterrcnn_mobilenet_v3_fpn"):
        init_weights.check(_cfg(other))
    with pytest.raises(ValueError, match="pass one of them"):
        _cfg(other, pretrained=True)
    summary = init_weights.check(_cfg(coco_state[1]))  # what run.json records
    assert summary["loaded"] == summary["tensors"] - 4 and {s["name"] for s in summary["skipped_shape"]} == HEAD


def test_fine_tuning_from_a_torchvision_state_dict_on_the_first_ten_synth_images(ray_cluster, data_dir, coco_state,
                                                                                 tmp_path, monkeypatch, capsys):
    state, plain, _ = coco_state
    out = tmp_path / "run"
    cfg = TrainConfig(task="detection", arch=ARCH, data=str(data_dir), out=str(out), init_from=str(plain), epochs=1,
                      batch_size=4, image_size=64, model_kwargs={"min_size": 64, "max_size": 64}, lr=1e-3,
                      cpus_per_worker=0.5, augment_cpus=0.25, limit_train_images=10)
    given = []  # what this fit hands Ray Train as its DataConfig (and the datasets it was made for)

    def recorded(datasets, **kw):
        given.append((datasets, ingest_config(datasets, **kw)))
        return given[-1][1]
    monkeypatch.setattr(trainer, "ingest_config", recorded)
    fit(cfg)
    # --limit-train-images: every image of the cap, none past it (the split has 48).
    (metrics,) = read_metrics(cfg.out)
    assert metrics["train_images"] == 10
    # A one-worker fit's worker reads every dataset in order (the reproducibility of a seed's fit).
    ((datasets, config),) = given
    iterators = config.configure(datasets, world_size=1, worker_handles=None, worker_node_ids=None)[0]
    assert set(iterators) == {"train_0", "val"}
    assert all(it.get_context().execution_options.preserve_order for it in iterators.values())
    record = json.loads((out / "run.json").read_text())
    assert record["init"]["source"] == str(plain) and record["init"]["loaded"] == record["init"]["tensors"] - 4
    assert {s["name"] for s in record["init"]["skipped_shape"]} == HEAD
    assert "init_from" not in record["model"]  # a record, not a model setting: a resume does not check it

    # The worker started from the file: after one epoch of small steps its weights are near the file's,
    # far from the builder's own initialisation.
    trained = torch.load(latest_checkpoint(str(out)), weights_only=True)["model"]
    torch.manual_seed(cfg.seed)
    scratch = get_task(cfg.task).build_model(cfg.model_copy(update={"num_classes": K})).state_dict()
    for name in ("net.backbone.body.0.0.weight", "net.rpn.head.conv.0.0.weight", "net.roi_heads.box_head.fc6.weight"):
        moved = (trained[name] - state[name[len("net."):]]).norm()
        apart = (scratch[name] - state[name[len("net."):]]).norm()
        assert moved < 0.2 * apart, (name, float(moved), float(apart))

    # --restart --init-from the run itself: --restart deleted those weights before the workers read them, and
    # the training failed with the run's checkpoints gone. Refused before anything is touched.
    kept = latest_checkpoint(str(out))
    argv = ["train", "--no-dashboard", "--task", "detection", "--arch", ARCH, "--data", str(data_dir), "--out", str(out),
            "--restart", "--epochs", "1", "--batch-size", "4", "--image-size", "64"]
    for source in (out, kept):
        capsys.readouterr()
        assert cli.main([*argv, "--init-from", str(source)]) == 2
        (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("visionflow train:")]
        assert "this run's own weights, which --restart deletes" in line, line
        assert latest_checkpoint(str(out)) == kept and torch.load(kept, weights_only=True)["model"]
    # (A resume ignoring --init-from is checked on test_train_watch.py's run, which resumes anyway.)


def test_pretrained_without_internet_fails_with_one_line_pointing_to_init_from(ray_cluster, data_dir, tmp_path,
                                                                              monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "urlopen", offline)  # no internet, wherever the test runs
    out = tmp_path / "run"
    argv = ["train", "--no-dashboard", "--task", "classification", "--arch", "resnet18", "--data", str(data_dir),
            "--out", str(out), "--epochs", "1", "--pretrained"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.startswith("visionflow train:")]
    assert len(lines) == 1, lines
    assert "torchvision's published weights" in lines[0] and "internet" in lines[0] and "--init-from" in lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (out / "run.json").exists()  # refused before anything of the run was touched


def test_googlenet_takes_its_published_weights_as_torchvision_builds_them(data_dir, monkeypatch, tmp_path):
    """--pretrained GoogLeNet: the builder crashed (torchvision refuses init_weights=True with weights), and the
    trainer built it without ``transform_input``, which the published weights expect. The download is
    replaced by a state dict of torchvision's own builder (nothing is downloaded here)."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    from pipelines.train.trainer import resolve_config
    from vision.models import create_model

    state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: state)
    model = create_model("googlenet", num_classes=K, pretrained=True)
    assert model.net.transform_input and model.net.aux1 is not None and model.num_classes == K
    torch.testing.assert_close(model.net.conv1.conv.weight, state["conv1.conv.weight"])

    cfg = resolve_config(TrainConfig(arch="googlenet", data=str(data_dir), out=str(tmp_path), pretrained=True))
    assert cfg.model_kwargs == {"transform_input": True}  # recorded: every checkpoint rebuilds with it
    assert get_task(cfg.task).build_model(cfg).net.transform_input
    plain = resolve_config(TrainConfig(arch="googlenet", data=str(data_dir), out=str(tmp_path)))
    assert plain.model_kwargs == {} and not get_task(plain.task).build_model(plain).net.transform_input
