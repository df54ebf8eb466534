"""The model zoo: every classifier builds from its name, takes 64x64 and 224x224 inputs, shares one face,
and its parameter and FLOP counts match the published ones."""
from __future__ import annotations

import pytest
import torch

from vision.models import create_model, list_models
from vision.models.flops import measure, profile
from vision.models.localization import localization_hits, localization_loss

CLASSIFIERS = ["alexnet", "alexnet2012", "zfnet", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "googlenet",
               "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "resnext50_32x4d",
               "squeezenet1_0", "squeezenet1_1"]


def test_registry_lists_every_classifier_and_the_localizer():
    assert set(CLASSIFIERS) <= set(list_models("classification"))
    assert "localizer" in list_models("localization")


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("size", [64, 224])
def test_classifier_accepts_small_and_imagenet_inputs(name, size):
    # Shapes only: the meta device runs the whole graph without arithmetic.
    with torch.device("meta"):
        model = create_model(name, num_classes=7).eval()
        logits = model(torch.rand(2, 3, size, size))
        feats = model.forward_features(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 7)
    assert feats.shape[:2] == (2, model.num_features)
    assert model.visionflow_task == "classification"


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "densenet121", "squeezenet1_1", "googlenet", "zfnet",
                                  "alexnet2012"])
def test_uniform_face_reset_classifier(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=7).eval()
        model.reset_classifier(3)
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3)
        assert model.num_classes == 3
        head = model.get_classifier()
        assert getattr(head, "out_features", getattr(head, "out_channels", None)) == 3
        model.reset_classifier(0)  # a pure feature extractor: pooled features
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, model.num_features)


def test_response_normalisation_is_the_papers():
    """AlexNet (Krizhevsky et al. 2012, 3.3): b = a / (2 + 1e-4 * sum over 5 neighbouring maps of a^2)^0.75;
    torch divides its alpha by the size, so alpha=1e-4 there normalised five times more weakly."""
    torch.manual_seed(0)
    a = torch.randn(2, 9, 4, 4) * 30
    sq = torch.nn.functional.pad(a * a, (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i:i + 9] for i in range(5))
    expected = a / (2 + 1e-4 * window) ** 0.75
    for name in ("alexnet2012", "zfnet"):
        lrn = next(m for m in create_model(name, num_classes=3).modules() if isinstance(m, torch.nn.LocalResponseNorm))
        torch.testing.assert_close(lrn(a), expected)


def test_googlenet_returns_aux_logits_in_training_only():
    model = create_model("googlenet", num_classes=5)
    x = torch.rand(2, 3, 64, 64)
    out = model.train()(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 5)] * 3
    assert model.eval()(x).shape == (2, 5)


def test_real_forward_and_backward_on_64px_crops():
    model = create_model("resnet18", num_classes=4).train()
    x = torch.rand(4, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and model.get_classifier().weight.grad.abs().sum() > 0


def test_two_tower_alexnet_equals_its_single_device_form():
    torch.manual_seed(0)
    model = create_model("alexnet2012", num_classes=6, devices=("cpu", "cpu")).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        two_towers = model(x)
        one_device = model.fused()(x)
    assert two_towers.shape == (3, 6)
    torch.testing.assert_close(two_towers, one_device, rtol=1e-4, atol=1e-5)
    # the towers really are separate: tower 1's conv1 feeds tower 0 only through conv3
    with torch.no_grad():
        model.tower1.stem[0].weight.zero_()
    assert not torch.allclose(model(x), two_towers)


def test_two_tower_alexnet_trains_both_towers():
    model = create_model("alexnet2012", num_classes=3).train()
    loss = torch.nn.functional.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    assert model.tower0.stem[0].weight.grad.abs().sum() > 0
    assert model.tower1.stem[0].weight.grad.abs().sum() > 0


def test_two_tower_alexnet_rejects_a_single_device():
    with pytest.raises(ValueError, match="two devices"):
        create_model("alexnet2012", num_classes=3, devices=("cpu",))


def test_localizer_outputs_class_logits_and_pixel_boxes():
    model = create_model("localizer", num_classes=4, backbone="resnet18").train()
    x = torch.rand(2, 3, 64, 64)
    centre, _, dense_boxes, grid = model.dense(x)
    assert grid == (4, 4)  # ResNet's last stage at stride 16: a 4 x 4 grid on 64 px
    assert centre.shape == (2, 16) and dense_boxes.shape == (2, 16, 4)
    target = torch.tensor([[8.0, 8.0, 40.0, 40.0], [10.0, 20.0, 60.0, 50.0]])
    logits, boxes, centre_loss = model(x, target)
    # boxes read at the cells of the true centres: (24, 24) -> row 1, col 1; (35, 35) -> row 2, col 2
    assert torch.equal(boxes, dense_boxes[[0, 1], [5, 10]]) and logits.shape == (2, 4)
    loss, parts = localization_loss(logits, boxes, torch.tensor([1, 3]), target, (64, 64))
    (loss + centre_loss).backward()
    assert set(parts) == {"cls_loss", "box_loss"}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # nothing unused (DDP)
    model.eval()
    with torch.no_grad():
        logits, boxes = model(x * 2 - 0.5)
        centre, _, dense_boxes, _ = model.dense(x * 2 - 0.5)
        # at inference: the box of the best centre score, and the class of what lies inside it
        expected = dense_boxes[[0, 1], centre.argmax(1)].clamp(0, 64)
        assert torch.equal(boxes, expected)
        assert torch.allclose(logits, model.classify_regions(x * 2 - 0.5, expected))
    assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] >= boxes[:, :2]).all()


def test_localizer_class_head_reads_the_region_it_is_given():
    torch.manual_seed(0)
    model = create_model("localizer", num_classes=3, backbone="resnet18").eval()
    x = torch.rand(1, 3, 64, 64)
    left, right = torch.tensor([[0.0, 0.0, 30.0, 64.0]]), torch.tensor([[34.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        y = x.clone()
        y[..., 40:] = torch.rand(1, 3, 64, 24)  # change only what lies in the right region
        assert torch.allclose(model.classify_regions(x, left), model.classify_regions(y, left), atol=1e-5)
        assert not torch.allclose(model.classify_regions(x, right), model.classify_regions(y, right), atol=1e-3)


def test_localizer_per_cell_class_head():
    model = create_model("localizer", num_classes=4, backbone="resnet18", glimpse=None).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, _ = model(x)
        centre, dense_logits, _, _ = model.dense(x)
    assert torch.equal(logits, dense_logits[[0, 1], centre.argmax(1)])


def test_localizer_keeps_the_stride_of_other_backbones():
    model = create_model("localizer", num_classes=3, backbone="vgg11").eval()
    assert model.dense(torch.rand(1, 3, 64, 64))[3] == (2, 2)  # VGG's own stride 32
    with pytest.raises(ValueError, match="output_stride"):
        create_model("localizer", num_classes=3, output_stride=8)


def test_localization_hit_needs_the_right_class_and_iou_at_least_half():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    target = torch.tensor([[0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    hits = localization_hits(logits, boxes, torch.tensor([0, 0, 0]), target)
    assert hits.tolist() == [True, False, False]  # IoU 0.83 / IoU 0.33 / wrong class


def test_localizer_rejects_a_non_classifier_backbone():
    with pytest.raises(ValueError, match="expected a classifier"):
        create_model("localizer", num_classes=2, backbone="localizer")


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="resnet18"):
        create_model("resnet19", num_classes=2)


@pytest.mark.parametrize("name, params_m, gflops", [
    ("vgg16", 138.4, 2 * 15.47),   # published: 138.4M parameters, 15.47 G multiply-adds
    ("resnet50", 25.6, 2 * 4.09),
    ("squeezenet1_1", 1.24, 2 * 0.35),
    ("googlenet", 6.6, 2 * 1.50),  # aux classifiers are idle at inference and not counted
    ("alexnet", 61.1, 2 * 0.71),
])
def test_counts_match_the_published_figures(name, params_m, gflops):
    row = profile(name, image_size=224)
    assert row["params"] / 1e6 == pytest.approx(params_m, rel=0.01)
    assert row["gflops"] == pytest.approx(gflops, rel=0.03)


def test_a_detector_is_counted_at_the_size_it_resizes_to_and_says_so():
    """Given a 224 square, a classifier computes on 224x224; Faster R-CNN first resizes it to its own
    ``min_size`` (320 by default, 64 here): its FLOPs are at that size, and the row says which."""
    assert profile("resnet18", image_size=224)["input_hw"] == (224, 224)
    torch.manual_seed(0)
    small = measure(create_model("fasterrcnn_resnet18_fpn", num_classes=3, min_size=64, max_size=64), "detection", 224)
    row = profile("fasterrcnn_resnet18_fpn", image_size=224)
    assert small["input_hw"] == (64, 64) and row["input_hw"] == (320, 320)
    assert row["gflops"] * 1e9 > 5 * small["flops"]  # 9x: the backbone 25x, the box head the same at both
