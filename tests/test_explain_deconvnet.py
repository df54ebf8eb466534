"""ZFNet's deconvnet: projections are exact unpool/rectify/transposed-filter passes, stay inside the
unit's receptive field, and end up as one PNG grid per layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adversarial_shapes import render_shapes
from vision.explain import (
    default_method,
    layer_activations,
    project,
    receptive_field_boxes,
    resolve_layer,
    top_activations,
    visualize_model,
)
from vision.models import create_model


def analytic_box(layers, row, col, size):
    """Receptive field (x1, y1, x2, y2), end exclusive, of output unit (row, col) after ``layers``
    (convolutions and poolings in forward order) on a size x size image. Each step back is clipped to
    the real extent of that layer's input: padding is not an input, and a pooling window that never
    fits drops the last row of its input."""
    def params(m):
        return [v[0] if isinstance(v, tuple) else v for v in (m.kernel_size, m.stride, m.padding)]

    sizes = [size]
    for m in layers:
        k, s, p = params(m)
        sizes.append((sizes[-1] + 2 * p - k) // s + 1)
    lo_y, hi_y, lo_x, hi_x = row, row, col, col
    for m, n_in in zip(reversed(layers), reversed(sizes[:-1])):
        k, s, p = params(m)
        lo_y, hi_y = max(lo_y * s - p, 0), min(hi_y * s - p + k - 1, n_in - 1)
        lo_x, hi_x = max(lo_x * s - p, 0), min(hi_x * s - p + k - 1, n_in - 1)
    return lo_x, lo_y, hi_x + 1, hi_y + 1


def spatial_layers(seq, upto):
    out = []
    for m in seq:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            out.append(m)
        if m is upto:
            return out
    raise AssertionError("layer not in the sequence")


@pytest.fixture(scope="module")
def images():
    torch.set_num_threads(1)
    return render_shapes(12, size=64, seed=2)[0]


@pytest.mark.parametrize("layer", ["conv1", "conv2", "net.features.6", "conv3"])
def test_zfnet_projection_of_one_activation_lands_inside_its_receptive_field(images, layer):
    torch.manual_seed(0)
    model = create_model("zfnet", num_classes=3).eval()
    name, module = resolve_layer(model, layer)
    tops = top_activations(model, images, layer, maps=2, top=3)
    for c, idx, pos in zip(tops.channels, tops.image_indices, tops.positions):
        units = [(c, r, q) for r, q in pos]
        proj = project(model, images[idx], layer, units, method="deconvnet")
        boxes = receptive_field_boxes(model, images[idx], layer, units)
        for p, (r, q), box in zip(proj, pos, boxes):
            x1, y1, x2, y2 = analytic_box(spatial_layers(model.net.features, module), r, q, 64)
            assert box == (x1, y1, x2, y2)
            support = p.abs().sum(0) > 0
            assert support.any(), "a top activation must project to something"
            outside = support.clone()
            outside[y1:y2, x1:x2] = False
            assert not outside.any(), f"{layer} unit ({c},{r},{q}) projects outside {box}"


class _PoolNet(nn.Module):
    def __init__(self, indices: bool):
        super().__init__()
        torch.manual_seed(0)
        # One channel and 1x1 filters: nothing but the pool spreads the field, whose 2x2 a switch shrank to 1x1
        self.conv1, self.conv2 = nn.Conv2d(3, 1, 1), nn.Conv2d(1, 1, 1)
        self.pool = nn.MaxPool2d(2, return_indices=indices)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        return self.conv2(x[0] if isinstance(x, tuple) else x)


def test_receptive_fields_are_the_same_through_a_pool_that_returns_its_switches(images):
    """torch names a pool that returns indices max_pool2d_with_indices: the linear rule skipped it and the
    field shrank to the switches' pixels."""
    units = [(0, 5, 7), (0, 0, 0), (0, 31, 31)]
    net = _PoolNet(False).eval()
    plain = receptive_field_boxes(net, images[:3], "conv2", units)
    assert plain == [analytic_box([net.conv1, net.pool, net.conv2], r, q, 64) for _, r, q in units]
    assert receptive_field_boxes(_PoolNet(True).eval(), images[:3], "conv2", units) == plain


def test_two_tower_alexnet_projection_stays_in_receptive_field(images):
    torch.manual_seed(0)
    model = create_model("alexnet2012", num_classes=3).eval()
    assert default_method(model) == "deconvnet"
    tops = top_activations(model, images, "conv2", maps=1, top=2)
    c, pos = tops.channels[0], tops.positions[0]
    units = [(c, r, q) for r, q in pos]
    x = images[tops.image_indices[0]]
    proj = project(model, x, "conv2", units)
    stem = model.tower0.stem
    for p, (r, q) in zip(proj, pos):
        x1, y1, x2, y2 = analytic_box(spatial_layers(stem, stem[4]), r, q, 64)
        support = p.abs().sum(0) > 0
        assert support.any() and not support[:y1].any() and not support[y2:].any()
        assert not support[:, :x1].any() and not support[:, x2:].any()


def test_deconvnet_is_unpooling_with_switches_rectification_and_transposed_filters():
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
    model = nn.Sequential(conv1, nn.ReLU(inplace=True), nn.MaxPool2d(2), conv2, nn.ReLU()).eval()
    x = torch.rand(2, 3, 8, 8)
    act = layer_activations(model, x, "3")
    units = [(1, 1, 2), (4, 3, 0)]
    got = project(model, x, "3", units, method="deconvnet")
    # By hand, top to bottom: keep only the chosen activation, rectify, transposed filters of conv2,
    # unpool with the forward switches, rectify, transposed filters of conv1.
    with torch.no_grad():
        _, switches = F.max_pool2d(F.relu(conv1(x)), 2, return_indices=True)
        seed = torch.zeros_like(act)
        for k, (c, i, j) in enumerate(units):
            seed[k, c, i, j] = act[k, c, i, j]
        down = F.conv_transpose2d(F.relu(seed), conv2.weight, padding=1)
        down = F.max_unpool2d(down, switches, 2, output_size=(8, 8))
        want = F.conv_transpose2d(F.relu(down), conv1.weight, padding=1)
    assert want.abs().sum() > 0
    assert torch.allclose(got, want, atol=1e-6)
    # Plain gradients differ: they gate by the forward ReLU instead of rectifying the signal.
    assert not torch.allclose(project(model, x, "3", units, method="gradient"), want, atol=1e-6)


def test_other_classifiers_get_guided_backprop_and_layer_errors_are_clear(images):
    model = create_model("resnet18", num_classes=3).eval()
    assert default_method(model) == "guided"
    tops = top_activations(model, images, "conv3", maps=1, top=2)
    units = [(tops.channels[0], r, q) for r, q in tops.positions[0]]
    guided = project(model, images[tops.image_indices[0]], "conv3", units, method="guided")
    assert guided.abs().sum() > 0
    with pytest.raises(ValueError, match="conv1..conv"):
        resolve_layer(model, "conv999")
    with pytest.raises(ValueError, match="feature maps"):
        layer_activations(model, images[:2], "net.fc")


def test_top_activations_are_the_strongest(images):
    torch.manual_seed(0)
    model = create_model("zfnet", num_classes=3).eval()
    tops = top_activations(model, images, "conv2", maps=3, top=4)
    with torch.no_grad():
        act = layer_activations(model, images, "conv2")
    peaks = act.flatten(2).amax(2)  # N,C
    for c, idx, pos, vals in zip(tops.channels, tops.image_indices, tops.positions, tops.values):
        assert vals == sorted(vals, reverse=True)
        assert torch.allclose(torch.tensor(vals), peaks[:, c].topk(4).values)
        for i, (r, q), v in zip(idx, pos, vals):
            assert act[i, c, r, q].item() == pytest.approx(v)


def test_visualize_model_writes_one_png_grid_per_layer(images, tmp_path):
    import matplotlib.image

    torch.manual_seed(0)
    model = create_model("zfnet", num_classes=3).eval()
    result = visualize_model(model, images, ["conv1", "conv2"], tmp_path, maps=4, top=9)
    assert result["method"] == "deconvnet"
    for layer in ("conv1", "conv2"):
        info = result["layers"][layer]
        picture = matplotlib.image.imread(info["png"])
        assert picture.shape[0] > 100 and picture.shape[1] > 300
        assert len(info["maps"]) == 4 and all(len(m["units"]) == 9 for m in info["maps"])
