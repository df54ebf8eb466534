"""Accuracy under attack: the numbers behind a robustness report.

``ATTACKS`` maps a name to ``fn(model, images, labels, eps) -> adversarial images``; all share one
epsilon axis in L-infinity pixel units, except ``pgd_l2`` whose ``eps`` is a per-pixel RMS
(L2 radius ``eps * sqrt(C*H*W)``), so that its curve sits on the same axis.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from vision.adversarial._common import check_images, check_labels, logits_of, mode
from vision.adversarial.attacks import fgsm, gaussian_noise, pgd, uniform_noise

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _seeded(fn):
    def attack(model, images, labels, eps):
        return fn(model, images, labels, eps, generator=torch.Generator(device=images.device).manual_seed(0))

    return attack


def _pgd_linf(model, images, labels, eps):
    return pgd(model, images, labels, eps, steps=10, norm="linf",
               generator=torch.Generator(device=images.device).manual_seed(0))


def _pgd_l2(model, images, labels, eps):
    radius = eps * math.sqrt(images[0].numel())
    return pgd(model, images, labels, radius, steps=10, norm="l2",
               generator=torch.Generator(device=images.device).manual_seed(0))


ATTACKS: dict[str, Attack] = {
    "gaussian": _seeded(gaussian_noise),
    "uniform": _seeded(uniform_noise),
    "fgsm": fgsm,
    "pgd": _pgd_linf,
    "pgd_l2": _pgd_l2,
}


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}") from None


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Predicted classes (N,) of ``images`` in eval mode."""
    with mode(model, False):
        return torch.cat([logits_of(model, b).argmax(1) for b in images.split(batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Top-1 accuracy of ``model`` on float images in [0, 1] with labels 0..K-1."""
    check_images(images)
    check_labels(labels, images)
    return (predict(model, images, batch_size) == labels).float().mean().item()


def accuracy_under_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack | str,
                          eps: float, batch_size: int = 64) -> float:
    """Top-1 accuracy on adversarial images made batch by batch with ``attack`` at ``eps``."""
    check_images(images)
    check_labels(labels, images)
    attack = get_attack(attack) if isinstance(attack, str) else attack
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        adv = attack(model, x, y, eps)
        correct += (predict(model, adv, batch_size) == y).sum().item()
    return correct / max(1, len(labels))


def robustness_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_values, attacks=None,
                     batch_size: int = 64, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Accuracy against epsilon for each attack.

    ``attacks``: names from ``ATTACKS`` or a name -> fn dict (default: every attack in ``ATTACKS``).
    Returns rows ``{"attack", "eps", "accuracy"}``; eps 0 is the clean accuracy for every attack."""
    if attacks is None:
        attacks = dict(ATTACKS)
    elif not isinstance(attacks, dict):
        attacks = {name: get_attack(name) for name in attacks}
    eps_values = sorted(float(e) for e in eps_values)
    clean = accuracy(model, images, labels, batch_size)
    rows = []
    for name, attack in attacks.items():
        for eps in eps_values:
            acc = clean if eps == 0 else accuracy_under_attack(model, images, labels, attack, eps, batch_size)
            rows.append({"attack": name, "eps": eps, "accuracy": acc})
            if progress:
                progress(f"{name:>9s} eps={eps:.4f} accuracy={acc:.3f}")
    return rows
