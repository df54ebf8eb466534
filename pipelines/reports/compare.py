"""The overall comparison of trained architectures: a Markdown table, a PNG chart and the training curves.

For each run directory: architecture, task, parameters, GFLOPs (the trained model given a 224x224 image,
measured by ``torch.utils.flop_counter``, with the size its first convolution saw: a detector resizes the
image to its own ``min_size`` first), the accuracy it reached (the task's main metric: top-1, localization
accuracy, box AP, mask AP; mIoU for a semantic segmenter), images/s in training and in inference on this
machine. A run directory that holds ``failed.json`` ({"error": ...}, written by the DAG) is listed as
failed with its error.
"""
from __future__ import annotations

import math

from pipelines import storage

# Each task's main metric (its key in metrics.json, "val_" + key in the training records) and its label, in
# order of preference: a semantic segmenter (DeepLabV3, FCN) has no mask AP; it is scored by mIoU.
MAIN_METRICS = {"classification": [("top1", "top-1")], "localization": [("loc_acc", "loc. acc.")],
                "detection": [("bbox/AP", "box AP")], "segmentation": [("segm/AP", "mask AP"), ("miou", "mIoU")]}


def main_metric(task: str | None, evaluated: dict | None, record: dict | None) -> tuple[str, str]:
    """``(key, label)`` of the first of ``task``'s main metrics that the evaluation (metrics.json) or the
    last training record (``val_<key>``) holds; the task's first when neither does."""
    options = MAIN_METRICS.get(task) or [("top1", "top-1")]
    for key, label in options:
        if key in (evaluated or {}) or f"val_{key}" in (record or {}):
            return key, label
    return options[0]


def _train_dir(run_dir: str) -> str:
    """The trainer's run directory: ``run_dir`` itself, or its ``train/`` (the DAG's ``archs/<arch>/``)."""
    if not storage.exists(run_dir, "config.json") and storage.exists(run_dir, "train/config.json"):
        return storage.join(run_dir, "train")
    return run_dir


def _eval_metrics(run_dir: str, train_dir: str, arch: str, epoch: int, data=None) -> dict | None:
    """``metrics.json`` of `visionflow eval` next to the run (RUN/eval, or the DAG's archs/<arch>/eval), when
    it scored this run's last checkpoint on the val split of the run's own data: an evaluation of another
    split or other data (``eval --data OTHER`` writes RUN/eval too), of an earlier epoch (before a resume) or of
    another run (the folder above a plain run directory may hold any run's) is not this run's accuracy, and the
    last training record's validation stands instead."""
    for base in (train_dir, run_dir, train_dir.rstrip("/").rsplit("/", 1)[0]):
        doc = storage.read_json(base, "eval/metrics.json")
        if doc and doc.get("arch", arch) == arch and doc.get("epoch", epoch) == epoch \
                and doc.get("split", "val") == "val" \
                and (doc.get("data") is None or data is None or storage.same_place(doc["data"], data)):
            return doc
    return None


def _model_size(config: dict, image_size: int = 224) -> tuple[int | None, float | None, tuple | None]:
    """(parameters, GFLOPs, (height, width) it computed at) of the model a run trained given an
    ``image_size`` square, built on the meta device."""
    import torch

    from pipelines.train.checkpoint import build_from_config
    from pipelines.train.devices import wants_devices
    from vision.models import get_entry
    from vision.models.flops import measure

    config = {k: v for k, v in config.items() if k != "epoch"}
    if wants_devices(get_entry(config["arch"]).builder):
        config["model_kwargs"] = {**config.get("model_kwargs", {}), "devices": ("meta", "meta")}
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                stats = measure(build_from_config(config), config["task"], image_size)
            return stats["params"], stats["flops"] / 1e9, stats["input_hw"]
        except Exception:  # noqa: BLE001  a model that cannot run on meta is measured on the CPU
            if device == "cpu":
                return None, None, None
            if "devices" in config.get("model_kwargs", {}):
                config["model_kwargs"] = {**config["model_kwargs"], "devices": ("cpu", "cpu")}
    return None, None, None


def summarize_run(run_dir: str) -> dict:
    """One row of the comparison for ``run_dir``: {"arch", "task", "status", ...}; failed runs carry "error"."""
    run_dir = str(run_dir)
    failed = storage.read_json(run_dir, "failed.json")
    train_dir = _train_dir(run_dir)
    config = storage.read_json(train_dir, "config.json") or {}
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    if failed is not None:
        return {"run_dir": run_dir, "arch": failed.get("arch") or config.get("arch") or name,
                "task": failed.get("task") or config.get("task"), "status": "failed",
                "error": str(failed.get("error", "unknown error"))}
    if not config:
        return {"run_dir": run_dir, "arch": name, "task": None, "status": "failed",
                "error": f"not a training run: {run_dir} holds no config.json (nor failed.json)"}
    records = storage.read_metrics(train_dir)
    if not records:
        return {"run_dir": run_dir, "arch": config["arch"], "task": config["task"], "status": "failed",
                "error": "no finished epoch (metrics.jsonl is empty)"}
    task, last = config["task"], records[-1]
    evaluated = _eval_metrics(run_dir, train_dir, config["arch"], last["epoch"], config.get("data"))
    key, label = main_metric(task, evaluated, last)
    accuracy = (evaluated or {}).get(key, last.get(f"val_{key}"))
    # `visionflow eval`'s rate where it ran; else the training's validation pass (batched, beside Ray Train's
    # data pipeline: not the same measurement, and the table says so)
    inference = (evaluated or {}).get("inference_images_per_s")
    source = "eval" if inference else ("validation" if last.get("val_images_per_s") else None)
    inference = inference or last.get("val_images_per_s")
    params, gflops, input_hw = _model_size(config)
    return {"run_dir": run_dir, "arch": config["arch"], "task": task, "status": "done",
            "backbone": config.get("model_kwargs", {}).get("backbone"),
            "params": params, "gflops": gflops, "flops_input": input_hw and f"{input_hw[0]}x{input_hw[1]}",
            "metric": label, "accuracy": accuracy,
            "epochs": last["epoch"] + 1, "workers": config.get("workers"),
            "train_images_per_s": sum(r["train_images_per_s"] for r in records) / len(records),
            "inference_images_per_s": inference, "inference_source": source}


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table, failed runs last with their error. Inference images/s are
    `visionflow eval`'s; "(val)" marks a run without an evaluation, whose figure is its training's last
    validation pass."""
    head = ["| architecture | task | params (M) | GFLOPs | computed at (given 224x224) | metric | accuracy | "
            "train img/s | inference img/s |", "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    ok = sorted((r for r in rows if r["status"] == "done"), key=lambda r: (r["task"] or "", r["arch"]))
    lines = [f"| {r.get('label', r['arch'])} | {r['task']} | {_num(r['params'] and r['params'] / 1e6, '.2f')} | "
             f"{_num(r['gflops'], '.2f')} | {r.get('flops_input') or ''} | {r['metric']} | {_num(r['accuracy'], '.3f')} | "
             f"{_num(r['train_images_per_s'], '.1f')} | {_num(r['inference_images_per_s'], '.1f')}"
             f"{' (val)' if r.get('inference_source') == 'validation' else ''} |" for r in ok]
    for r in rows:
        if r["status"] != "done":
            err = " ".join(str(r["error"]).split()).replace("|", "\\|")[:200]
            lines.append(f"| {r.get('label', r['arch'])} | {r['task'] or ''} | | | | failed | {err} | | |")
    return "\n".join(head + lines) + "\n"


def place_labels(points: list[tuple[float, float]], box: tuple[float, float], step: float = 4.0,
                 rings: int = 12) -> list[tuple[float, float]]:
    """Offsets (in points, like ``annotate``'s ``xytext``) for one label of size ``box`` (w, h, in points)
    per point (given in points on the page), chosen greedily so that no two labels overlap each other:
    each label tries positions on growing rings around its point and takes the first free one."""
    w, h = box
    placed: list[tuple[float, float, float, float]] = []
    offsets = []
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for x, y in points:
        choice = None
        for ring in range(1, rings + 1):
            for dx, dy in dirs:
                ox, oy = dx * ring * step, dy * ring * step
                x0 = x + ox - (w if dx < 0 else 0 if dx > 0 else w / 2)
                y0 = y + oy - (h if dy < 0 else 0 if dy > 0 else h / 2)
                rect = (x0, y0, x0 + w, y0 + h)
                if all(rect[2] <= p[0] or rect[0] >= p[2] or rect[3] <= p[1] or rect[1] >= p[3] for p in placed):
                    choice = (ox, oy, rect)
                    break
            if choice:
                break
        if choice is None:  # crowded beyond the rings: stack it above everything placed
            top = max((p[3] for p in placed), default=y)
            choice = (0.0, top - y + step, (x - w / 2, top + step, x + w / 2, top + step + h))
        placed.append(choice[2])
        offsets.append(choice[:2])
    return offsets


def _ranked(rows: list[dict], task: str, metric: str) -> list[dict]:
    """The finished rows of ``task`` scored by ``metric`` (a label), best first (the numbers on the chart)."""
    # NaN (a diverged evaluation) and COCO's -1 (no ground truth of a kind) are not points: NaN scrambled the
    # ranking and made the y limits NaN (the chart and comparison.json were not written)
    pts = [r for r in rows if r["status"] == "done" and r["task"] == task and r.get("metric") == metric
           and isinstance(r["accuracy"], (int, float)) and math.isfinite(r["accuracy"]) and r["accuracy"] >= 0]
    return sorted(pts, key=lambda r: (-r["accuracy"], r["arch"]))


def _panels(rows: list[dict], tasks) -> list[tuple[str, str]]:
    """``(task, metric label)`` of each chart panel, in ``tasks`` order: one per metric a task's rows use."""
    return [(t, label) for t in tasks for _key, label in MAIN_METRICS.get(t, []) if _ranked(rows, t, label)]


def chart(rows: list[dict], path: str) -> bytes:
    """PNG: one panel per task and metric (semantic and instance segmenters apart), accuracy against GFLOPs,
    marker area by parameters.
    Points carry numbers placed without overlap (``place_labels``); beside each panel its table, sorted by
    the metric, names every number. Returns the PNG bytes (also written to ``path`` when given)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"classification": "tab:blue", "localization": "tab:orange", "detection": "tab:green",
               "segmentation": "tab:red"}
    panels = _panels(rows, colours)
    failed = [r["arch"] for r in rows if r["status"] != "done"]
    n = max(1, len(panels))
    tallest = max((len(_ranked(rows, *p)) for p in panels), default=1)
    fig = plt.figure(figsize=(12, max(3.2, 0.22 * tallest + 1.6) * n), dpi=110)
    grid = fig.add_gridspec(n, 2, width_ratios=[1.5, 1], hspace=0.45, wspace=0.05)
    biggest = max((r["params"] or 1 for r in rows if r["status"] == "done"), default=1)
    for i, (task, metric) in enumerate(panels):
        pts = _ranked(rows, task, metric)
        ax, side = fig.add_subplot(grid[i, 0]), fig.add_subplot(grid[i, 1])
        xs = [r["gflops"] or 1e-3 for r in pts]
        ys = [r["accuracy"] for r in pts]
        ax.scatter(xs, ys, s=[30 + 900 * (r["params"] or 0) / biggest for r in pts], alpha=0.5,
                   color=colours[task], edgecolors="black")
        ax.set_xscale("log")
        lo, hi = min(ys), max(ys)
        pad = max(0.05, (hi - lo) * 0.15)
        ax.set_ylim(max(0.0, lo - pad), min(1.05, hi + pad))
        ax.set_xlim(min(xs) / 2.5, max(xs) * 2.5)
        ax.set_xlabel("GFLOPs per image, at the size each model computes on (log)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} vs compute (marker area ~ parameters)", fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.canvas.draw()
        to_pt = 72.0 / fig.dpi
        page = [tuple(v * to_pt for v in ax.transData.transform((x, y))) for x, y in zip(xs, ys)]
        width = 7.0 * len(str(len(pts))) + 4
        for k, ((x, y), (ox, oy)) in enumerate(zip(zip(xs, ys), place_labels(page, (width, 11.0))), start=1):
            ax.annotate(str(k), (x, y), xytext=(ox, oy), textcoords="offset points", fontsize=8,
                        ha="left" if ox > 0 else "right" if ox < 0 else "center",
                        va="bottom" if oy > 0 else "top" if oy < 0 else "center",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#555555"})
        side.axis("off")
        cells = [[str(k), r.get("label", r["arch"]), _num(r["accuracy"], ".3f"), _num(r["gflops"], ".2f"),
                  _num(r["params"] and r["params"] / 1e6, ".1f")] for k, r in enumerate(pts, start=1)]
        table = side.table(cellText=cells, colLabels=["#", "architecture", metric, "GFLOPs", "M params"],
                           loc="upper left", cellLoc="left", colLoc="left", colWidths=[0.06, 0.47, 0.15, 0.14, 0.18])
        table.auto_set_font_size(False)
        table.set_fontsize(7.5)
        table.scale(1, 1.1)
    if not panels:
        fig.text(0.5, 0.5, "no finished run with a metric", ha="center")
    if failed:
        fig.text(0.01, 0.005, "failed: " + ", ".join(failed), fontsize=8, color="tab:red")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path:
        with open(path, "wb") as f:
            f.write(data)
    return data


def label_runs(rows: list[dict]) -> list[dict]:
    """``rows`` each with its ``label``: the architecture, and where runs share one, the shortest end of each run
    directory that tells them apart (``runs/a/archs/resnet18`` and ``runs/b/archs/resnet18``: ``a/archs/resnet18``
    and ``b/archs/resnet18``; their last folder alone named both the same, and the legend kept one)."""
    out = []
    for r in rows:
        same = [s["run_dir"].rstrip("/").split("/") for s in rows if s["arch"] == r["arch"]]
        label = r["arch"]
        if len(same) > 1:
            parts = r["run_dir"].rstrip("/").split("/")
            k = next((k for k in range(1, len(parts) + 1)
                      if sum(p[-k:] == parts[-k:] for p in same) == 1), len(parts))
            label = f"{r['arch']} ({'/'.join(parts[-k:])})"
        out.append({**r, "label": label})
    return out


def curve_runs(rows: list[dict]) -> list[dict]:
    """The finished runs' per-epoch records for ``pipelines.reports.curves.comparison_curves``: one entry per
    run, labelled as ``label_runs`` labels it."""
    return [{"label": r["label"], "task": r["task"], "records": storage.read_metrics(_train_dir(r["run_dir"]))}
            for r in label_runs(rows) if r["status"] == "done"]


def compare(run_dirs: list[str], out_dir: str) -> dict:
    """Summarize ``run_dirs`` into ``out_dir``: ``comparison.md`` (table), ``comparison.png`` (chart),
    ``curves.png`` (the runs' training curves side by side), ``comparison.json`` (rows).
    Returns {"table", "chart", "curves", "json", "markdown", "rows"}."""
    from pipelines.reports.curves import comparison_curves

    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    rows = label_runs([summarize_run(str(d)) for d in run_dirs])
    table = markdown_table(rows)
    out_dir = str(out_dir)
    return {"table": storage.write_bytes(out_dir, "comparison.md", table.encode()),
            "chart": storage.write_bytes(out_dir, "comparison.png", chart(rows, None)),
            "curves": storage.write_bytes(out_dir, "curves.png", comparison_curves(curve_runs(rows))),
            "json": storage.write_json(out_dir, "comparison.json", rows),
            "markdown": table, "rows": rows}
