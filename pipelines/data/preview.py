"""A PNG grid of view rows (images with their boxes, labels and masks), to see what a trainer sees."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def save_preview(rows: list[dict], path, categories: list[dict] | None = None, columns: int = 4,
                 title: str | None = None) -> Path:
    """Draw up to 16 rows of a task view into one PNG at ``path``; return the path.

    Rows are those of ``pipelines.data.augment``: detection/segmentation rows (``boxes``, ``labels``
    1..K, optional ``masks``) or classification/localization rows (``label`` 0..K-1, optional ``box``).
    ``categories`` (the manifest's list) turns labels into names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not rows:
        raise ValueError("save_preview needs at least one row to draw")
    rows = rows[:16]
    names = {c["label"]: c["name"] for c in categories or []}
    cols = min(columns, len(rows))
    grid = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(grid, cols, figsize=(2.6 * cols, 2.6 * grid), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows):
        image = np.asarray(row["image"])
        ax.imshow(image)
        if "boxes" in row:  # detection / segmentation: labels are 1..K
            boxes, labels = np.asarray(row["boxes"]).reshape(-1, 4), np.asarray(row["labels"]).reshape(-1)
            masks = np.asarray(row["masks"]) if "masks" in row else None
            for i, (box, label) in enumerate(zip(boxes, labels)):
                c = colours(int(label) % 10)
                if masks is not None and len(masks) > i:
                    overlay = np.zeros((*masks[i].shape, 4))
                    overlay[masks[i] > 0] = (*c[:3], 0.45)
                    ax.imshow(overlay)
                ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color=c, lw=1.2))
                ax.text(box[0], box[1], names.get(int(label), str(int(label))), color="white", fontsize=6,
                        bbox={"facecolor": c, "pad": 1, "lw": 0})
        else:  # classification / localization: label is 0..K-1
            label = int(row["label"])
            ax.set_title(names.get(label + 1, str(label)), fontsize=8)
            if "box" in row:
                b = np.asarray(row["box"])
                ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, color="yellow", lw=1.2))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
