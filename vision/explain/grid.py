"""The picture of a layer: for each strongest feature map, its top-9 projections beside the image
patches that caused them (the layout of Zeiler & Fergus, Fig. 2), as one PNG."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid

from vision.explain.deconvnet import (
    default_method,
    project,
    receptive_field_boxes,
    resolve_layer,
    top_activations,
)

RULE_NAMES = {"deconvnet": "deconvnet", "guided": "guided backpropagation", "gradient": "gradient"}


def _crop(img: torch.Tensor, box, size: int) -> torch.Tensor:
    x1, y1, x2, y2 = box
    return F.interpolate(img[None, :, y1:y2, x1:x2], size=(size, size), mode="nearest")[0]


def _contrast(p: torch.Tensor) -> torch.Tensor:
    """A projection scaled to [0, 1] around grey, so positive and negative evidence both show."""
    m = p.abs().max()
    return (0.5 + 0.5 * p / m).clamp(0, 1) if m > 0 else torch.full_like(p, 0.5)


def layer_grid(model: nn.Module, images: torch.Tensor, layer: str, maps: int = 9, top: int = 9,
               method: str = "auto", tile: int = 40, batch_size: int = 32) -> dict:
    """Everything the PNG shows, as tensors: for each strongest map a mosaic of projections and one of
    patches (3,h,w in [0, 1]), plus the unit records. ``method``: auto, deconvnet, guided or gradient."""
    method = default_method(model) if method == "auto" else method
    if method not in RULE_NAMES:
        raise ValueError(f"method must be auto, deconvnet, guided or gradient; got {method!r}")
    name, _ = resolve_layer(model, layer)
    tops = top_activations(model, images, layer, maps=maps, top=top, batch_size=batch_size)
    rows = []
    for c, idx, pos, vals in zip(tops.channels, tops.image_indices, tops.positions, tops.values):
        x = images[idx]
        units = [(c, i, j) for i, j in pos]
        proj = project(model, x, layer, units, method=method)
        boxes = receptive_field_boxes(model, x, layer, units)
        nrow = math.ceil(math.sqrt(len(idx)))
        rows.append({
            "channel": c,
            "projections": make_grid(torch.stack([_crop(_contrast(p), b, tile) for p, b in zip(proj, boxes)]),
                                     nrow=nrow, padding=2, pad_value=1.0),
            "patches": make_grid(torch.stack([_crop(im, b, tile) for im, b in zip(x, boxes)]),
                                 nrow=nrow, padding=2, pad_value=1.0),
            "units": [{"image": i, "row": r, "col": q, "activation": v, "box": list(b)}
                      for i, (r, q), v, b in zip(idx, pos, vals, boxes)],
        })
    return {"layer": layer, "module": name, "method": method, "map_size": list(tops.map_size), "rows": rows}


def save_layer_grid(grid: dict, path, title: str | None = None) -> Path:
    """Write the PNG of a ``layer_grid`` result: map pairs (projections | patches), three pairs a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = grid["rows"]
    per_row = min(3, max(1, len(rows)))
    nrows = math.ceil(len(rows) / per_row)
    fig, axes = plt.subplots(nrows, 2 * per_row, figsize=(4.2 * per_row, 2.3 * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, row in enumerate(rows):
        r, c = divmod(k, per_row)
        for offset, key in ((0, "projections"), (1, "patches")):
            ax = axes[r, 2 * c + offset]
            ax.imshow(row[key].permute(1, 2, 0).cpu().numpy())
            ax.set_title(f"map {row['channel']}: {'projection' if offset == 0 else 'patches'}", fontsize=8)
    fig.suptitle(title or f"{grid['layer']} ({grid['module']}): top-{len(rows[0]['units']) if rows else 0} "
                 f"activations, {RULE_NAMES[grid['method']]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def visualize_model(model: nn.Module, images: torch.Tensor, layers, out_dir, maps: int = 9, top: int = 9,
                    method: str = "auto", progress=None) -> dict:
    """One PNG grid per layer under ``out_dir`` (``<layer>.png``) plus the units behind each, for float
    images N,3,H,W in [0, 1]. Returns ``{"method", "layers": {layer: {"png", "module", "maps": [...]}}}``."""
    out_dir = Path(out_dir)
    result = {"method": default_method(model) if method == "auto" else method, "layers": {}}
    for layer in layers:
        grid = layer_grid(model, images, layer, maps=maps, top=top, method=method)
        png = save_layer_grid(grid, out_dir / f"{layer.replace('/', '_')}.png")
        result["layers"][layer] = {"png": str(png), "module": grid["module"], "map_size": grid["map_size"],
                                   "maps": [{"channel": r["channel"], "units": r["units"]} for r in grid["rows"]]}
        if progress:
            progress(f"{layer}: {len(grid['rows'])} maps -> {png}")
    return result
