"""What each layer learned: the strongest feature maps of a layer, their top-9 inputs, and the
projection of each of those activations back to pixel space (Zeiler & Fergus 2014).

Works on any classifier that takes float RGB in [0, 1]: the deconvnet rule on ZFNet and AlexNet,
guided backpropagation elsewhere (``method="auto"``). Layers are named as in ``model.named_modules()``
or by the alias ``convK`` (the K-th ``nn.Conv2d`` in module order; for the two-tower AlexNet that is
tower 0's K-th convolution). A convolution's maps are read after rectification.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vision.explain.backward_rules import backward_rule

DECONVNET_MODELS = ("zfnet", "alexnet", "alexnet2012")


class _Stop(Exception):
    """Raised by the capture hook: nothing past the chosen layer needs computing."""


def conv_layers(model: nn.Module) -> list[str]:
    """Module names of every ``nn.Conv2d`` in order (``conv1`` is the first)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """``(module name, module)`` for a module name or a ``convK`` alias; a clear error otherwise."""
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return layer, modules[layer]
    convs = conv_layers(model)
    if layer.lower().startswith("conv") and layer[4:].isdigit():
        k = int(layer[4:])
        if 1 <= k <= len(convs):
            return convs[k - 1], modules[convs[k - 1]]
    raise ValueError(f"unknown layer {layer!r}; expected conv1..conv{len(convs)} or a module name such as "
                     f"{', '.join(convs[:3])}")


def default_method(model: nn.Module) -> str:
    """``"deconvnet"`` for ZFNet/AlexNet (by registry name), ``"guided"`` for every other network."""
    return "deconvnet" if getattr(model, "visionflow_name", None) in DECONVNET_MODELS else "guided"


def layer_activations(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The (rectified) maps N,C,h,w of ``layer`` for float images N,3,H,W in [0, 1]; runs the model only
    up to that layer."""
    _, module = resolve_layer(model, layer)
    captured = {}

    def hook(_m, _inp, out):
        captured["out"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in captured:
        raise RuntimeError(f"layer {layer!r} did not run in the model's forward pass")
    out = captured["out"]
    if out.dim() != 4:
        raise ValueError(f"layer {layer!r} gives shape {tuple(out.shape)}; pick a layer with feature maps N,C,h,w")
    # torch.relu, not clamp: inside a backward rule it is a rectifier like the network's own.
    return torch.relu(out) if isinstance(module, nn.Conv2d) else out


@dataclass
class TopActivations:
    """For each of the strongest ``channels``: the indices of its top images, the (row, col) of the
    maximum in each, and the activation values (all lists aligned with ``channels``)."""

    layer: str
    channels: list[int]
    image_indices: list[list[int]]
    positions: list[list[tuple[int, int]]]
    values: list[list[float]]
    map_size: tuple[int, int]


@torch.no_grad()
def top_activations(model: nn.Module, images: torch.Tensor, layer: str, maps: int = 9, top: int = 9,
                    batch_size: int = 32) -> TopActivations:
    """The ``maps`` feature maps of ``layer`` with the strongest responses over ``images`` and, for each,
    the ``top`` images that activate it most (one maximum per image)."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch N,3,H,W, got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        peaks, where = [], []
        for batch in images.split(batch_size):
            act = layer_activations(model, batch, layer)
            value, index = act.flatten(2).max(2)  # N,C
            peaks.append(value.cpu())
            where.append(index.cpu())
            map_size = tuple(act.shape[-2:])
    finally:
        model.train(was_training)
    peaks, where = torch.cat(peaks), torch.cat(where)  # N,C
    top = min(top, peaks.shape[0])
    top_values, top_images = peaks.topk(top, dim=0)  # top,C
    strength = top_values.mean(0)
    channels = strength.topk(min(maps, strength.numel())).indices.tolist()
    w = map_size[1]
    result = TopActivations(layer, channels, [], [], [], map_size)
    for c in channels:
        idx = top_images[:, c].tolist()
        result.image_indices.append(idx)
        result.positions.append([divmod(int(where[i, c]), w) for i in idx])
        result.values.append(top_values[:, c].tolist())
    return result


def project(model: nn.Module, images: torch.Tensor, layer: str, units: list[tuple[int, int, int]],
            method: str = "deconvnet") -> torch.Tensor:
    """Project one activation per image back to pixel space.

    ``units[k] = (channel, row, col)`` picks the activation of image ``k``; every other activation of the
    layer is set to zero (as the deconvnet does) and the signal is sent down with ``method``
    (``deconvnet``, ``guided``, ``gradient`` or ``linear``). Returns N,3,H,W."""
    if len(units) != images.shape[0]:
        raise ValueError(f"need one unit per image: {len(units)} units for {images.shape[0]} images")
    was_training = model.training
    model.eval()
    try:
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad(), backward_rule(method):
            act = layer_activations(model, x, layer)
            seed = torch.zeros_like(act)
            for k, (c, i, j) in enumerate(units):
                # The activation's own value (or 1 where the map is silent, so a receptive field still shows).
                seed[k, c, i, j] = act[k, c, i, j].detach().clamp_min(0) if method != "linear" else 1.0
            (grad,) = torch.autograd.grad(act, x, seed, allow_unused=True)
    finally:
        model.train(was_training)
    return torch.zeros_like(images) if grad is None else grad.detach()


def receptive_field_boxes(model: nn.Module, images: torch.Tensor, layer: str,
                          units: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The input pixels each unit can see, as ``(x1, y1, x2, y2)`` (end exclusive) clipped to the image.

    Found by sending a signal down with the ``linear`` rule (every path open), so it holds for any
    architecture, including the two-tower AlexNet."""
    support = project(model, images, layer, units, method="linear").abs().sum(1) > 0  # N,H,W
    boxes = []
    for mask in support:
        ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        if len(ys) == 0:
            boxes.append((0, 0, mask.shape[1], mask.shape[0]))
        else:
            boxes.append((int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1))
    return boxes
