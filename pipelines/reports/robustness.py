"""Robustness report of classifier checkpoints: accuracy against epsilon per attack, detection rates of
adversarial inputs, and pictures (curves, examples), for `visionflow attack` and the DAG's robustness stage.

``robustness_report(checkpoints, data_dir, out_dir)`` writes ``robustness.json``, ``robustness.md``,
``robustness.png`` (one panel per attack, one curve per checkpoint) and ``examples_<model>.png``
(clean | perturbation | adversarial, with predictions), and returns their paths and the numbers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from vision.adversarial import ATTACKS, detection_report, fgsm, pgd, robustness_curve
from vision.adversarial.robustness import get_attack, predict

DEFAULT_EPSILONS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
DEFAULT_ATTACKS = ("gaussian", "fgsm", "pgd")


def load_crops(data_dir, size: int, limit: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``limit`` classification crops of ``data_dir/split`` at ``size`` pixels, without random
    augmentation: (float images N,3,size,size in [0, 1], labels 0..K-1, class names by label)."""
    from pipelines.data import augment, load_split, quiet_execution
    from pipelines.train.checkpoint import category_names

    ds, manifest = load_split(data_dir, split, num_cpus=0.25)
    view = quiet_execution(augment(ds, task="classification", size=int(size), train=False, num_cpus=0.25))
    rows = view.limit(int(limit)).take_all()
    if not rows:
        raise ValueError(f"{data_dir}/{split} has no object crops to attack")
    images = torch.from_numpy(np.stack([np.asarray(r["image"], dtype=np.uint8) for r in rows]))
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)
    return images.permute(0, 3, 1, 2).float().div(255.0), labels, category_names(manifest.get("categories"))


def model_label(config: dict, path) -> str:
    """A readable name of what a checkpoint holds: arch plus its defense."""
    label = config.get("arch", Path(str(path)).name)
    if config.get("adversarial", "none") != "none":
        label += f" adv-{config['adversarial']} eps={config.get('adv_eps', 0):.3g}"
    if config.get("distill_from"):
        label += f" distilled T={config.get('temperature', 1):g}"
    elif config.get("temperature", 1) != 1:
        label += f" teacher T={config.get('temperature'):g}"
    return label


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _input_device(model) -> torch.device:
    return next(model.parameters()).device


def markdown_table(models: list[dict]) -> str:
    """Accuracy per (model, attack) row and epsilon column."""
    eps = sorted({r["eps"] for m in models for r in m["curve"]})
    head = "| model | attack | " + " | ".join(f"eps {e:.4g}" for e in eps) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---:" for _ in eps) + " |"]
    for m in models:
        for attack in dict.fromkeys(r["attack"] for r in m["curve"]):
            acc = {r["eps"]: r["accuracy"] for r in m["curve"] if r["attack"] == attack}
            lines.append(f"| {m['label']} | {attack} | " + " | ".join(f"{acc.get(e, float('nan')):.3f}" for e in eps) + " |")
    for m in models:
        det = m.get("detection")
        if not det:
            continue
        lines += ["", f"Detection of adversarial inputs, {m['label']}, eps {det['eps']:.4g}, "
                      f"threshold for {det['target_fpr']:.0%} false positives on clean images:", "",
                  "| detector | clean FPR | " + " | ".join(f"{a} detected" for a in det["attacks"]) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in det["attacks"]) + " |"]
        for name, row in det["detectors"].items():
            rates = [row["attacks"][a]["detection_rate"] for a in det["attacks"]]
            lines.append(f"| {name} | {row['clean_fpr']:.3f} | "
                         + " | ".join("n/a" if r is None else f"{r:.3f}" for r in rates) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(models: list[dict], path) -> Path:
    """One panel per attack: accuracy against epsilon, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for m in models for r in m["curve"]))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.4), squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        for m in models:
            rows = [r for r in m["curve"] if r["attack"] == attack]
            ax.plot([r["eps"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=m["label"])
        ax.set_title(attack)
        ax.set_xlabel("epsilon (pixels in [0, 1])")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_examples(model, images, labels, names: list[str], eps: float, path, count: int = 6) -> Path:
    """Rows of examples: clean, then per attack (FGSM, PGD) the perturbation (amplified) and the
    adversarial image, titled with the true and predicted classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = images[:count], labels[:count]
    advs = {"FGSM": fgsm(model, x, y, eps), "PGD": pgd(model, x, y, eps, steps=10)}
    preds = {"clean": predict(model, x), **{k: predict(model, v) for k, v in advs.items()}}

    def name(i):
        return names[i] if 0 <= i < len(names) else str(i)

    cols = 1 + 2 * len(advs)
    fig, axes = plt.subplots(len(x), cols, figsize=(1.9 * cols, 2.0 * len(x)), squeeze=False)
    for r in range(len(x)):
        panels = [(x[r], f"true {name(int(y[r]))}\npred {name(int(preds['clean'][r]))}")]
        for k, adv in advs.items():
            delta = adv[r] - x[r]
            scale = max(float(delta.abs().max()), 1e-12)
            panels.append((0.5 + 0.5 * delta / scale, f"{k} perturbation\n(x{0.5 / scale:.0f})"))
            panels.append((adv[r], f"{k} eps={eps:.3g}\npred {name(int(preds[k][r]))}"))
        for c, (img, title) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def check_checkpoints(checkpoints: list, data_dir, split: str) -> None:
    """Every checkpoint readable, a classifier, and of the data's categories, before any attack: a typo in the
    second ``--checkpoint`` was found only after the first one's whole report (minutes), leaving its examples
    beside an earlier run's report. ValueError / FileNotFoundError, one line."""
    from pipelines.data import read_manifest
    from pipelines.train.checkpoint import category_names, check_categories, load_payload

    names = category_names(read_manifest(f"{data_dir}/{split}").get("categories"))
    for ckpt in checkpoints:
        config = load_payload(ckpt, mmap=True)["config"]
        if config.get("task") != "classification":
            raise ValueError(f"{ckpt} holds a {config.get('task')} model; the robustness report attacks classifiers")
        check_categories(config, names, ckpt, f"{data_dir}/{split}")


def robustness_report(checkpoints, data_dir, out_dir, *, epsilons=DEFAULT_EPSILONS, attacks=DEFAULT_ATTACKS,
                      images: int = 256, split: str = "val", batch_size: int = 64, detect: bool = True,
                      fpr: float = 0.05, examples: int = 6, visualize: bool = True, device: str | None = None,
                      progress=print) -> dict:
    """Attack each checkpoint (a run dir, checkpoint dir or ``.pt``; one or a list) on ``images`` crops of
    ``data_dir/split`` at every epsilon with every attack (names in ``vision.adversarial.ATTACKS``).

    Writes under ``out_dir``: robustness.json, robustness.md, robustness.png, examples_<model>.png and,
    with ``visualize``, layer grids under visualizations/<model>/. ``detect`` adds the detection rates of
    the adversarial-input detectors at the middle non-zero epsilon. Returns
    ``{"json", "markdown", "curves", "examples": [...], "visualizations": {...}, "models": [...]}``."""
    from pipelines.train import load_checkpoint

    checkpoints = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not checkpoints:
        raise ValueError("robustness_report needs at least one checkpoint")
    attacks = list(attacks)
    for a in attacks:
        get_attack(a)  # fail before any work on a misspelt attack
    epsilons = sorted({float(e) for e in epsilons})
    if any(e < 0 or e > 1 for e in epsilons):
        raise ValueError(f"epsilons must lie in [0, 1] (pixel units), got {epsilons}")
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    check_checkpoints(checkpoints, data_dir, split)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    crops: dict[int, tuple] = {}
    models, example_paths, visualizations, labels_seen = [], [], {}, set()
    for ckpt in checkpoints:
        model, config = load_checkpoint(ckpt, device=device)
        size = int(config.get("image_size", 64))
        if size not in crops:
            crops[size] = load_crops(data_dir, size, images, split)
        x, y, names = crops[size]
        x, y = x.to(_input_device(model)), y.to(_input_device(model))
        label = model_label(config, ckpt)
        while label in labels_seen:  # two runs of the same kind: tell them apart by directory
            label += f" ({Path(str(ckpt)).name})"
        labels_seen.add(label)
        progress(f"{label}: {len(y)} crops of {size}px, attacks {', '.join(attacks)}")
        curve = robustness_curve(model, x, y, epsilons, attacks={a: ATTACKS[a] for a in attacks},
                                 batch_size=batch_size, progress=lambda line: progress(f"  {line}"))
        entry = {"label": label, "checkpoint": str(ckpt), "arch": config.get("arch"), "epoch": config.get("epoch"),
                 "images": len(y), "image_size": size, "curve": curve,
                 "defense": {k: config.get(k) for k in ("adversarial", "adv_eps", "temperature", "distill_from")}}
        nonzero = [e for e in epsilons if e > 0]
        if detect and nonzero and len(y) >= 8:
            eps = nonzero[(len(nonzero) - 1) // 2]
            entry["detection"] = detection_report(
                model, x, y, {"fgsm": fgsm, "pgd": ATTACKS["pgd"]}, eps=eps, fpr=fpr)
            entry["detection"]["attacks"] = ["fgsm", "pgd"]
        if examples and nonzero:
            path = plot_examples(model, x, y, names, max(nonzero), out / f"examples_{_slug(label)}.png", examples)
            example_paths.append(str(path))
        if visualize:
            from vision.explain import conv_layers, visualize_model

            n = len(conv_layers(model))
            layers = list(dict.fromkeys(f"conv{k}" for k in (1, 2, n) if 1 <= k <= n))
            visualizations[label] = visualize_model(model, x, layers, out / "visualizations" / _slug(label),
                                                    progress=lambda line: progress(f"  {line}"))
        models.append(entry)

    curves = plot_curves(models, out / "robustness.png")
    md = out / "robustness.md"
    md.write_text("# Robustness\n\nTop-1 accuracy on adversarial crops against epsilon "
                  f"({split} split, pixels in [0, 1]).\n\n" + markdown_table(models))
    result = {"json": str(out / "robustness.json"), "markdown": str(md), "curves": str(curves),
              "examples": example_paths, "visualizations": visualizations, "epsilons": epsilons,
              "attacks": attacks, "models": models}
    (out / "robustness.json").write_text(json.dumps(result, indent=2, default=str))
    return result
