"""Parameters and FLOPs of registered models, measured (``torch.utils.flop_counter``), not typed in.

Models are built on the ``meta`` device where they allow it, so profiling VGG-16 costs no memory and no
arithmetic. FLOPs count a multiply-add as two (torch's convention); torchvision's model tables list
multiply-adds as "GFLOPS", half of these figures.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from vision.models.registry import create_model, get_entry, list_models

# ImageNet-sized heads make the counts comparable with the published ones.
PROFILE_CLASSES = {"classification": 1000, "localization": 1000, "detection": 80, "segmentation": 80}


def _inputs(task: str, image_size: int, device) -> object:
    x = torch.rand(1, 3, image_size, image_size, device=device)
    return [x[0]] if task in ("detection", "segmentation") else x


def measure(model: nn.Module, task: str = "classification", image_size: int = 224) -> dict:
    """One inference forward pass of ``model`` (eval mode) on a 1x3xSxS input (a one-image list for
    detectors) -> {"params": parameters of the layers that ran, "params_total": all parameters,
    "flops": FLOPs of that pass, "input_hw": (height, width) the first convolution saw}. Layers idle at
    inference (GoogLeNet's aux classifiers) are not counted in "params", as in the published figures.
    A detector resizes its input to its own ``min_size``/``max_size`` first: its FLOPs are at that size,
    which ``input_hw`` says, not at S."""
    model.eval()
    used: set[int] = set()
    seen: list[tuple[int, int]] = []

    def first_conv(mod, args):
        if not seen:
            seen.append(tuple(int(s) for s in args[0].shape[-2:]))
    hooks = [m.register_forward_pre_hook(lambda mod, _args, used=used: used.add(id(mod)))
             for m in model.modules()]
    hooks += [m.register_forward_pre_hook(first_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(_inputs(task, image_size, device))
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for m in model.modules() if id(m) in used for p in m.parameters(recurse=False))
    return {"params": params, "params_total": sum(p.numel() for p in model.parameters()),
            "flops": int(counter.get_total_flops()), "input_hw": seen[0] if seen else (image_size, image_size)}


def profile(name: str, image_size: int = 224, num_classes: int | None = None) -> dict:
    """Registered model ``name`` -> {"name", "task", "params", "params_total", "gflops", "image_size"}."""
    task = get_entry(name).task
    k = num_classes or PROFILE_CLASSES[task]
    try:
        with torch.device("meta"):
            stats = measure(create_model(name, num_classes=k), task, image_size)
    except Exception:  # noqa: BLE001  some models compute on concrete tensors while building; measure on the CPU
        stats = measure(create_model(name, num_classes=k), task, image_size)
    return {"name": name, "task": task, "params": stats["params"], "params_total": stats["params_total"],
            "gflops": stats["flops"] / 1e9, "image_size": image_size, "input_hw": stats["input_hw"]}


def profile_all(task: str | None = None, image_size: int = 224, progress=None) -> list[dict]:
    """``profile`` of every registered model (of ``task``), in registry order; a model that cannot be
    built or run gets {"name", "task", "error"} instead of failing the whole table. ``progress(row, total)``,
    when given, hears each row as it is measured (the detectors run on the CPU: seconds each)."""
    rows = []
    names = list_models(task)
    for name in names:
        try:
            rows.append(profile(name, image_size))
        except Exception as exc:  # noqa: BLE001  one broken entry must not hide the others
            rows.append({"name": name, "task": get_entry(name).task, "error": f"{type(exc).__name__}: {exc}"})
        if progress is not None:
            progress(rows[-1], len(names))
    return rows
