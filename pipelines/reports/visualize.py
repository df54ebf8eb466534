"""Layer visualizations of a classifier checkpoint, for `visionflow visualize` and the DAG.

``visualize_checkpoint(checkpoint, data_dir, out_dir, layers)`` loads the model through
``pipelines.train.load_checkpoint``, takes crops of the data's split, and writes one PNG grid per layer
(deconvnet on ZFNet/AlexNet, guided backpropagation elsewhere) plus ``visualizations.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.reports.robustness import load_crops


def visualize_checkpoint(checkpoint, data_dir, out_dir, layers=("conv1", "conv2"), *, images: int = 128,
                         maps: int = 9, top: int = 9, method: str = "auto", split: str = "val",
                         device: str | None = None, progress=print) -> dict:
    """Grids of ``layers`` (``convK`` aliases or module names) of ``checkpoint`` over ``images`` crops of
    ``data_dir/split``. Returns ``{"json", "method", "layers": {layer: {"png", "module", "maps"}}}``."""
    from pipelines.train import load_checkpoint
    from vision.explain import resolve_layer, visualize_model

    layers = list(layers)
    if not layers:
        raise ValueError("give at least one layer (e.g. conv1)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_checkpoint(checkpoint, device=device)
    if config.get("task") != "classification":
        raise ValueError(f"{checkpoint} holds a {config.get('task')} model; visualizations take a classifier")
    for layer in layers:
        resolve_layer(model, layer)  # a misspelt layer fails before the data is read
    x, _, _ = load_crops(data_dir, int(config.get("image_size", 64)), images, split)
    x = x.to(next(model.parameters()).device)
    out = Path(out_dir)
    result = visualize_model(model, x, layers, out, maps=maps, top=top, method=method, progress=progress)
    result.update({"checkpoint": str(checkpoint), "arch": config.get("arch"), "images": len(x),
                   "json": str(out / "visualizations.json")})
    (out / "visualizations.json").write_text(json.dumps(result, indent=2, default=str))
    return result
