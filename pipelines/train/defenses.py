"""The classification trainer's defenses, as its ``train_step`` calls them (pure pieces in vision.adversarial).

- Adversarial training (``cfg.adversarial`` = fgsm | pgd): a share ``cfg.adv_ratio`` of each batch is
  replaced by examples made against the current weights at ``cfg.adv_eps`` (PGD: ``cfg.adv_steps``).
- Defensive distillation: a teacher trained with ``cfg.temperature`` = T (softmax of logits / T), then
  a student with ``cfg.distill_from`` = the teacher's checkpoint, trained on its soft labels at the same
  T. Evaluation and deployment use the plain logits (T = 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipelines.train.checkpoint import load_checkpoint
from vision.adversarial import adversarial_batch, distillation_loss, tempered_cross_entropy

_TEACHERS: dict[tuple[str, str], nn.Module] = {}


def uses_temperature(cfg) -> bool:
    return bool(cfg.distill_from) or cfg.temperature != 1.0


def adversarial_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg) -> torch.Tensor:
    """The batch with ``cfg.adv_ratio`` of its images attacked (``cfg.adversarial``); DDP's wrapper is
    bypassed so that making the examples does not start a gradient synchronisation."""
    net = getattr(model, "module", model)
    return adversarial_batch(net, images, labels, attack=cfg.adversarial, eps=cfg.adv_eps, ratio=cfg.adv_ratio,
                             steps=cfg.adv_steps)


def teacher(path: str, device: torch.device, num_classes: int) -> nn.Module:
    """The distillation teacher of ``path`` (loaded once per process and device), in eval mode."""
    key = (str(path), str(device))
    if key not in _TEACHERS:
        model, config = load_checkpoint(path, device=device)
        if config.get("num_classes") != num_classes:
            raise ValueError(f"teacher {path} predicts {config.get('num_classes')} classes; the student has "
                             f"{num_classes}: distill on the same data")
        for p in model.parameters():
            p.requires_grad_(False)
        _TEACHERS[key] = model
    return _TEACHERS[key]


def check_teacher(cfg) -> None:
    """On the driver, before a distillation trains: ``cfg.distill_from`` must be a readable classifier
    checkpoint of the student's classes (FileNotFoundError / ValueError, one line); the workers found out at
    their first step. A remote teacher (s3://) is only looked for: the workers read it."""
    from pipelines.train.checkpoint import category_names, check_categories, checkpoint_file, load_payload

    if not cfg.distill_from:
        return
    if "://" in cfg.distill_from:
        checkpoint_file(cfg.distill_from)
        return
    config = load_payload(cfg.distill_from, mmap=True)["config"]
    if config.get("task") != "classification":
        raise ValueError(f"--distill-from {cfg.distill_from} holds a {config.get('task')} model; a teacher is a "
                         f"classifier trained on the same data")
    if config.get("num_classes") != cfg.num_classes:
        raise ValueError(f"--distill-from {cfg.distill_from} predicts {config.get('num_classes')} classes; the "
                         f"student has {cfg.num_classes}: distill on the same data")
    check_categories(config, category_names(cfg.categories), f"--distill-from {cfg.distill_from}", cfg.data)


def tempered_loss(outputs, images: torch.Tensor, labels: torch.Tensor, cfg) -> torch.Tensor:
    """Training loss at temperature ``cfg.temperature``: soft cross-entropy against the teacher's soft
    labels when ``cfg.distill_from`` is set, cross-entropy of softmax(logits / T) otherwise."""
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    if cfg.distill_from:
        with torch.no_grad():
            soft = teacher(cfg.distill_from, images.device, logits.shape[1])(images)
        return distillation_loss(logits.float(), soft.float().to(logits.device), cfg.temperature)
    return tempered_cross_entropy(logits.float(), labels.to(logits.device), cfg.temperature)
