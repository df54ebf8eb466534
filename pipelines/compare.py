"""The overall comparison of trained architectures: a Markdown table and a PNG chart.

For each run directory: architecture, task, parameters, GFLOPs (the trained model at 224x224, measured by
``torch.utils.flop_counter``), the accuracy it reached (the task's main metric: top-1, localization
accuracy, box AP, mask AP), images/s in training and in inference on this machine. A run directory that
holds ``failed.json`` ({"error": ...}, written by the DAG) is listed as failed with its error.
"""
from __future__ import annotations

import math

from pipelines.train import storage

MAIN_METRIC = {"classification": "top1", "localization": "loc_acc", "detection": "bbox/AP",
               "segmentation": "segm/AP"}
METRIC_LABEL = {"classification": "top-1", "localization": "loc. acc.", "detection": "box AP",
                "segmentation": "mask AP"}


def _train_dir(run_dir: str) -> str:
    """The trainer's run directory: ``run_dir`` itself, or its ``train/`` (the DAG's ``archs/<arch>/``)."""
    if not storage.exists(run_dir, "config.json") and storage.exists(run_dir, "train/config.json"):
        return storage.join(run_dir, "train")
    return run_dir


def _eval_metrics(run_dir: str, train_dir: str) -> dict | None:
    """``metrics.json`` of `visionflow eval` next to the run (RUN/eval, or the DAG's archs/<arch>/eval)."""
    for base in (train_dir, run_dir, train_dir.rstrip("/").rsplit("/", 1)[0]):
        doc = storage.read_json(base, "eval/metrics.json")
        if doc:
            return doc
    return None


def _model_size(config: dict, image_size: int = 224) -> tuple[int | None, float | None]:
    """(parameters, GFLOPs at ``image_size``) of the model a run trained, built on the meta device."""
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
            return stats["params"], stats["flops"] / 1e9
        except Exception:  # noqa: BLE001  a model that cannot run on meta is measured on the CPU
            if device == "cpu":
                return None, None
            if "devices" in config.get("model_kwargs", {}):
                config["model_kwargs"] = {**config["model_kwargs"], "devices": ("cpu", "cpu")}
    return None, None


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
    key = MAIN_METRIC.get(task, "top1")
    evaluated = _eval_metrics(run_dir, train_dir)
    accuracy = (evaluated or {}).get(key, last.get(f"val_{key}"))
    inference = (evaluated or {}).get("inference_images_per_s") or last.get("val_images_per_s")
    params, gflops = _model_size(config)
    return {"run_dir": run_dir, "arch": config["arch"], "task": task, "status": "done",
            "backbone": config.get("model_kwargs", {}).get("backbone"),
            "params": params, "gflops": gflops, "metric": METRIC_LABEL.get(task, key), "accuracy": accuracy,
            "epochs": last["epoch"] + 1, "workers": config.get("workers"),
            "train_images_per_s": sum(r["train_images_per_s"] for r in records) / len(records),
            "inference_images_per_s": inference}


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table, failed runs last with their error."""
    head = ["| architecture | task | params (M) | GFLOPs @224 | metric | accuracy | train img/s | inference img/s |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    ok = sorted((r for r in rows if r["status"] == "done"), key=lambda r: (r["task"] or "", r["arch"]))
    lines = [f"| {r['arch']} | {r['task']} | {_num(r['params'] and r['params'] / 1e6, '.2f')} | "
             f"{_num(r['gflops'], '.2f')} | {r['metric']} | {_num(r['accuracy'], '.3f')} | "
             f"{_num(r['train_images_per_s'], '.1f')} | {_num(r['inference_images_per_s'], '.1f')} |" for r in ok]
    for r in rows:
        if r["status"] != "done":
            err = " ".join(str(r["error"]).split()).replace("|", "\\|")[:200]
            lines.append(f"| {r['arch']} | {r['task'] or ''} | | | failed | {err} | | |")
    return "\n".join(head + lines) + "\n"


def chart(rows: list[dict], path: str) -> bytes:
    """PNG: accuracy against GFLOPs, one point per architecture, marker area by parameters, a colour per
    task. Returns the PNG bytes (also written to ``path`` when given)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "done" and r["gflops"] and r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colours = {"classification": "tab:blue", "localization": "tab:orange", "detection": "tab:green",
               "segmentation": "tab:red"}
    biggest = max((r["params"] or 1 for r in ok), default=1)
    for task in colours:
        pts = [r for r in ok if r["task"] == task]
        if not pts:
            continue
        ax.scatter([r["gflops"] for r in pts], [r["accuracy"] for r in pts],
                   s=[40 + 1500 * (r["params"] or 0) / biggest for r in pts], alpha=0.55,
                   color=colours[task], edgecolors="black", label=f"{task} ({METRIC_LABEL[task]})")
        for r in pts:
            ax.annotate(r["arch"], (r["gflops"], r["accuracy"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    failed = [r["arch"] for r in rows if r["status"] != "done"]
    if failed:
        ax.text(0.01, 0.01, "failed: " + ", ".join(failed), transform=ax.transAxes, fontsize=8, color="tab:red")
    if ok:
        ax.set_xscale("log")
        ax.legend(loc="best", fontsize=8, markerscale=0.4)
    ax.set_ylim(0, 1.05)  # accuracies and APs are fractions: a fixed axis keeps runs comparable
    ax.set_xlabel("GFLOPs per 224x224 image (log)")
    ax.set_ylabel("accuracy (the task's main metric)")
    ax.set_title("accuracy vs compute; marker area ~ parameters")
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def compare(run_dirs: list[str], out_dir: str) -> dict:
    """Summarize ``run_dirs`` into ``out_dir``: ``comparison.md`` (table), ``comparison.png`` (chart),
    ``comparison.json`` (rows). Returns {"table", "chart", "json", "markdown", "rows"}."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    rows = [summarize_run(str(d)) for d in run_dirs]
    table = markdown_table(rows)
    out_dir = str(out_dir)
    return {"table": storage.write_bytes(out_dir, "comparison.md", table.encode()),
            "chart": storage.write_bytes(out_dir, "comparison.png", chart(rows, None)),
            "json": storage.write_json(out_dir, "comparison.json", rows),
            "markdown": table, "rows": rows}
