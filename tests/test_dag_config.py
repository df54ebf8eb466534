"""The run config: composed stage sections, strict keys, errors that name the bad field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.dag.config import load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _write(tmp_path, doc) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("name", ["quickstart.yaml", "coco.yaml"])
def test_packaged_configs_load_and_name_known_architectures(name):
    from vision.models import list_models

    cfg = load_config(ROOT / "pipelines" / "configs" / name)
    archs = cfg.archs()
    assert archs and set(archs) <= set(list_models())
    for arch in archs:
        settings = cfg.train_settings(arch)
        assert settings["arch"] == arch and settings["task"]


def test_quickstart_trains_every_registered_architecture_on_synth_data():
    from vision.models import list_models

    cfg = load_config(None)  # the default is the packaged quickstart
    assert cfg.data.source == "synth"
    # every architecture but torchvision's published ResNet-50 / VGG-16 detectors (fine-tuning models)
    heavy = {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
             "retinanet_resnet50_fpn", "ssd300_vgg16"}
    assert set(cfg.train.exclude) == heavy
    assert cfg.archs() == [a for a in list_models() if a not in heavy] and len(cfg.archs()) == 27


def test_settings_compose_defaults_then_task_then_arch(tmp_path):
    cfg = load_config(_write(tmp_path, {"train": {
        "archs": ["resnet18", "vgg11"], "defaults": {"epochs": 1, "batch_size": 8},
        "per_task": {"classification": {"epochs": 2}}, "per_arch": {"vgg11": {"epochs": 3}}}}))
    assert cfg.train_settings("resnet18") == {"epochs": 2, "batch_size": 8, "task": "classification", "arch": "resnet18"}
    assert cfg.train_settings("vgg11")["epochs"] == 3


def test_overrides_and_exclude(tmp_path):
    path = _write(tmp_path, {"train": {"archs": ["resnet18", "vgg11", "zfnet"], "exclude": ["vgg11"]}})
    assert load_config(path).archs() == ["resnet18", "zfnet"]
    cfg = load_config(path, {"run_dir": str(tmp_path / "r"), "train.archs": ["zfnet"]})
    assert cfg.run_dir == str(tmp_path / "r") and cfg.archs() == ["zfnet"]


@pytest.mark.parametrize("doc, needle", [
    ({"trian": {}}, "trian"),                                            # misspelt section
    ({"train": {"max_parallel": 0}}, "train.max_parallel"),
    ({"data": {"source": "coco"}}, "data.train and data.val"),
    ({"data": {"source": "imagenet"}}, "data.source"),
    ({"train": {"per_task": {"detektion": {}}}}, "detektion"),
    ({"smoke": {"images": 0}}, "smoke.images"),
    ({"smoke": {"expect_objects": ["detect"]}}, "smoke.expect_objects"),
])
def test_bad_config_names_the_field(tmp_path, doc, needle):
    with pytest.raises(ValueError, match="invalid run config|expected") as e:
        load_config(_write(tmp_path, doc))
    assert needle in str(e.value)


def test_unknown_architecture_lists_the_known_ones(tmp_path):
    cfg = load_config(_write(tmp_path, {"train": {"archs": ["resnet18", "resnet9000"]}}))
    with pytest.raises(ValueError, match=r"resnet9000.*known.*resnet18"):
        cfg.archs()


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("train, needle", [
    ({"archs": ["resnet18"], "per_arch": {"resnet18": {"epochs": 0}}}, "epochs"),
    ({"archs": ["resnet18"], "defaults": {"learning_rate": 0.1}}, "learning_rate"),
])
def test_train_settings_are_checked_against_the_trainers_schema(tmp_path, train, needle):
    cfg = load_config(_write(tmp_path, {"train": train}))
    with pytest.raises(ValueError, match=r"train settings of resnet18") as e:
        cfg.check_train_settings()
    assert needle in str(e.value)


def test_packaged_train_settings_are_valid():
    for name in ("quickstart.yaml", "coco.yaml"):
        load_config(ROOT / "pipelines" / "configs" / name).check_train_settings()


def test_smoke_fails_when_an_expected_endpoint_finds_nothing():
    """``smoke.expect_objects``: an endpoint that answered but found nothing in every image is an error
    naming it; one that found something in any image, or that is not expected, is not."""
    from pipelines.dag.stages import missing_objects

    box = {"label": "circle", "score": 0.9, "box": [1, 2, 3, 4], "mask": False}
    found = [{"endpoint": "/v1/detect", "image": "a.jpg", "detections": []},
             {"endpoint": "/v1/detect", "image": "b.jpg", "detections": [box]},
             {"endpoint": "/v1/segment", "image": "a.jpg", "detections": []},
             {"endpoint": "/v1/segment", "image": "b.jpg", "detections": []}]
    assert missing_objects(found, ["detection"], 0.3) == []
    (error,) = missing_objects(found, ["detection", "segmentation"], 0.3)
    assert error.startswith("segment: the segmentation model found no object in 2 val images at score >= 0.3")
    assert missing_objects(found, [], 0.3) == []
    assert missing_objects(found[2:], ["detection"], 0.3) == []  # no answer at all: the request's own error
    quickstart = load_config(Path(__file__).parents[1] / "pipelines/configs/quickstart.yaml")
    assert quickstart.smoke.expect_objects == ["detection"]


def test_the_runs_summary_prints_what_the_smoke_test_found_before_its_table():
    """The smoke test's findings come in the driver's summary (a worker's own lines reached the console after
    it): a line per endpoint and image with its first five objects, then its errors, then the table."""
    from pipelines.dag.runner import format_summary

    dets = [{"label": f"shape{i}", "score": 0.9 - i / 10, "box": [0, 0, 1, 1], "mask": False} for i in range(7)]
    smoke = {"status": "failed", "results": [{"endpoint": "/v1/detect", "image": "a.jpg", "detections": dets},
                                             {"endpoint": "/v1/segment", "image": "a.jpg", "detections": []}],
             "errors": ["segment: the segmentation model found no object in 1 val images at score >= 0.3"]}
    summary = {"archs": [{"arch": "resnet18", "task": "classification", "status": "done", "metric": ["top1", 0.5]}],
               "failed": ["smoke"], "smoke": smoke, "seconds": 1.0}
    lines = format_summary(summary).splitlines()
    assert lines[:3] == ["smoke /v1/detect a.jpg: 7 found shape0 0.90, shape1 0.80, shape2 0.70, shape3 0.60, "
                         "shape4 0.50",
                         "smoke /v1/segment a.jpg: 0 found",
                         "smoke FAILED: segment: the segmentation model found no object in 1 val images at score "
                         ">= 0.3"]
    assert lines[3].startswith("architecture") and lines[5].startswith("resnet18")
    assert "1 failed: smoke" in lines and "took 1.0s" in lines
    assert format_summary({**summary, "smoke": None, "failed": []}).splitlines()[0].startswith("architecture")


@pytest.mark.parametrize("doc, extra, needle", [
    # An empty section under a --set / --archs override: one line, not a TypeError traceback.
    ({"train": None}, ["--set", "train.max_parallel=1"], None),
    ({"run_dir": "runs/x"}, ["--set", "run_dir.deep=1"], "run_dir is str"),
    # What deploy would refuse only after every training: caught before anything runs.
    ({"train": {"archs": ["resnet18", "ssdlite_mobilenet_v3"]}, "deploy": {"detection_arch": "ssdlite_mobilenet_v2"}},
     [], "deploy.detection_arch: 'ssdlite_mobilenet_v2' is not trained by this run"),
    ({"train": {"archs": ["resnet18", "deeplabv3_mobilenet_v3"]}, "deploy": {"segmentation_arch": "deeplabv3_mobilenet_v3"}},
     [], "semantic segmentation model"),
    ({"train": {"archs": ["ssdlite_mobilenet_v3"]}, "deploy": {"detection_arch": "ssdlite_mobilenet_v3",
                                                              "serve": {"nmss": {"iou_threshold": 0.5}}}},
     [], "deploy.serve.nmss"),
    ({"train": {"archs": ["ssdlite_mobilenet_v3"]}, "deploy": {"serve": {"model": {"num_cpus": -1}}}},
     [], "deploy.serve.model.num_cpus"),
    # docs/pipeline.md's --archs example: the quickstart pins its served detector; the error says what to do,
    # and the example's --no-deploy runs.
    ({"deploy": {"detection_arch": "ssdlite_mobilenet_v3"}}, ["--archs", "resnet18,yolo_v1"], "or pass --no-deploy"),
    ({"deploy": {"detection_arch": "ssdlite_mobilenet_v3"}}, ["--archs", "resnet18,yolo_v1", "--no-deploy"], None),
    # Refused only at deploy, after every training: a model's max_ongoing_requests below its batch size.
    ({"train": {"archs": ["ssdlite_mobilenet_v3"]}, "deploy": {"serve": {"model": {"max_ongoing_requests": 4}}}},
     [], "deploy.serve.model.max_ongoing_requests (4) must be >= a served model's batch size (8)"),
    # Serve's Disabled runs no HTTP proxy: the deploy stage waited out its timeout for /healthz.
    ({"train": {"archs": ["ssdlite_mobilenet_v3"]}, "deploy": {"proxy_location": "Disabled"}}, [],
     "deploy.proxy_location"),
    # A typo in robustness.archs ended the run with exit 0 and "no classifier finished training".
    ({"train": {"archs": ["resnet18"]}, "robustness": {"enabled": True, "archs": ["resnet81"]}}, ["--no-deploy"],
     "robustness.archs: ['resnet81'] are not classifiers this run trains (its classifiers: resnet18)"),
    ({"train": {"archs": ["resnet18"]}, "robustness": {"enabled": True, "epsilons": []}}, ["--no-deploy"],
     "robustness.epsilons"),
    # A run directory inside the images folder: the data's fingerprint changed with every record it wrote.
    ({"run_dir": "/nonexistent/coco/images/runs/q", "data": {"source": "coco", **{
        s: {"annotations": f"/nonexistent/coco/{s}.json", "images": "/nonexistent/coco/images"} for s in ("train", "val")}},
      "train": {"archs": ["resnet18"]}}, ["--no-deploy"], "is inside the images folder /nonexistent/coco/images"),
    # It passed and was then replaced by the run's own checkpoints.
    ({"train": {"archs": ["ssdlite_mobilenet_v3"]}, "deploy": {"serve": {"models": [{"name": "x"}]}}},
     [], "deploy.serve.models: the run serves the models it trained"),
])
def test_run_refuses_bad_settings_before_anything_runs_with_one_line(tmp_path, capsys, doc, extra, needle):
    from pipelines.cli import main

    args = ["run", "--config", _write(tmp_path, doc), "--plan", "--plan-png", str(tmp_path / "plan.png"), *extra]
    rc = main(args)
    err = capsys.readouterr().err
    if needle is None:  # a valid config once the empty section is read as one
        assert rc == 0, err
        return
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "plan.png").exists()


def test_deploy_serve_model_reaches_every_served_model_as_its_resources():
    """deploy.serve.model was merged into each model's top level, which the serve schema refuses: the deploy
    stage failed after every training for a setting the config check had accepted."""
    from pipelines.dag.stages import deploy_serve_args
    from pipelines.serve.config import ServeArgs

    cfg = {"serve": {"model": {"num_cpus": 0.5, "max_ongoing_requests": 8}, "nms": {"iou_threshold": 0.4}}}
    args = ServeArgs.model_validate(deploy_serve_args(cfg, [("ssdlite_mobilenet_v3", "/r/a"), ("yolo_v1", "/r/b")]))
    assert [(m.name, m.checkpoint, m.model.num_cpus, m.model.max_ongoing_requests) for m in args.models] == [
        ("ssdlite_mobilenet_v3", "/r/a", 0.5, 8), ("yolo_v1", "/r/b", 0.5, 8)]
    assert args.nms.iou_threshold == 0.4
    plain = ServeArgs.model_validate(deploy_serve_args({}, [("yolo_v1", "/r/b")]))
    assert plain.models[0].model.num_cpus == 1.0  # the schema's default
