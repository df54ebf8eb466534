"""Training curves as PNG: one run's loss and main metric by epoch (``RUN/curves.png``), and the runs of a
comparison side by side (``curves.png`` of `visionflow compare`), one line per run, the legend outside the
plots.

Records are ``metrics.jsonl``'s (``pipelines.storage.read_metrics``): ``epoch`` 0-based (drawn 1-based:
"after epoch 1"), ``train_loss``, ``val_loss`` where the task has one, ``val_<main metric>``.
"""
from __future__ import annotations

import io

from pipelines.reports.compare import MAIN_METRICS

TASK_ORDER = ("classification", "localization", "detection", "segmentation")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"] + 1, float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and isinstance(r.get("epoch"), int)]
    return [p[0] for p in pts], [p[1] for p in pts]


def metric_key(task: str | None, records: list[dict]) -> str | None:
    """The record key of the task's main metric (``val_top1``, ``val_bbox/AP``...) when the records hold it;
    for a segmentation run without mask AP (a semantic segmenter), its ``val_miou``."""
    for key in (f"val_{k}" for k, _label in MAIN_METRICS.get(task, [])):
        if any(key in r for r in records):
            return key
    return None


def _metric_label(task: str | None, key: str) -> str:
    for k, label in MAIN_METRICS.get(task, []):
        if key == f"val_{k}":
            return f"val {label}"
    return key.replace("_", " ")


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def run_figure(records: list[dict], task: str | None, title: str):
    """The figure of ``run_curves``."""
    plt = _plt()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for key, label, style in (("train_loss", "train loss", "-o"), ("val_loss", "val loss", "--s")):
        xs, ys = _series(records, key)
        if xs:
            ax_loss.plot(xs, ys, style, label=label, markersize=4)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss by epoch", fontsize=10)
    _integer_epochs(ax_loss)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    key = metric_key(task, records)
    if key:
        xs, ys = _series(records, key)
        ax_metric.plot(xs, ys, "-o", color="tab:green", label=_metric_label(task, key), markersize=4)
        train_key = "train_" + key[len("val_"):]
        txs, tys = _series(records, train_key)
        name = _metric_label(task, key)[len("val "):] if _metric_label(task, key).startswith("val ") else key
        if txs:
            ax_metric.plot(txs, tys, "--s", color="tab:olive", label=f"train {name}", markersize=4)
        ax_metric.set_ylabel(name)
        ax_metric.set_title(f"{name} by epoch", fontsize=10)
        ax_metric.legend(fontsize=8)
    else:
        ax_metric.text(0.5, 0.5, "no main metric recorded", ha="center", va="center", transform=ax_metric.transAxes)
        ax_metric.set_title("main metric", fontsize=10)
    _integer_epochs(ax_metric)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def run_curves(records: list[dict], task: str | None, title: str) -> bytes:
    """PNG: train/val loss (left) and the task's main metric (right) by epoch."""
    return _png(run_figure(records, task, title))


def comparison_figure(runs: list[dict]):
    """The figure of ``comparison_curves``; ``runs``: ``{"label", "task", "records"}`` each."""
    plt = _plt()
    panels: list[tuple[str, str, str | None]] = [("train_loss", "train loss", None)]
    if any(any("val_loss" in r for r in run["records"]) for run in runs):
        panels.append(("val_loss", "val loss", None))
    for task in TASK_ORDER:
        keys = {metric_key(task, run["records"]) for run in runs if run["task"] == task} - {None}
        for key in sorted(keys):
            panels.append((key, f"{task}: {_metric_label(task, key)}", task))
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    handles: dict[str, object] = {}
    for i, (key, title, task) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for j, run in enumerate(runs):
            if task is not None and run["task"] != task:
                continue
            xs, ys = _series(run["records"], key)
            if not xs:
                continue
            (line,) = ax.plot(xs, ys, "-o", markersize=3, color=colours(j % colours.N), label=run["label"])
            handles.setdefault(run["label"], line)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(title.split(": ")[-1])
        _integer_epochs(ax)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper left", bbox_to_anchor=(1.0, 1.0),
                   fontsize=8, title="run", frameon=False)
    else:
        fig.text(0.5, 0.5, "no finished epoch to draw", ha="center")
    return fig


def comparison_curves(runs: list[dict]) -> bytes:
    """PNG: the runs' curves side by side (train loss, val loss, each task's main metric), one line (and
    colour) per run, the legend to the right of the plots."""
    return _png(comparison_figure(runs))
