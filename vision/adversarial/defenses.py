"""The pure pieces of the two classic defenses, used by the classification trainer.

- Adversarial training (Goodfellow et al. 2015; Madry et al. 2018): part of every batch is replaced
  by FGSM or PGD examples made against the current model.
- Defensive distillation (Papernot et al. 2016): a teacher trained with softmax at temperature T, a
  student trained on the teacher's soft labels at the same T, deployed at T=1 (plain logits).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision.adversarial.attacks import fgsm, pgd

ADVERSARIAL_MODES = ("none", "fgsm", "pgd")


def adversarial_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, attack: str = "fgsm",
                      eps: float = 8 / 255, ratio: float = 0.5, steps: int = 7, alpha: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A training batch with a share ``ratio`` of the images replaced by adversarial ones.

    Takes float images N,C,H,W in [0, 1] and labels (N,) 0..K-1 (which stay valid: the attacked images
    keep their true labels). ``attack``: "none", "fgsm" or "pgd" (L-infinity, ``steps`` steps).
    The first ``round(ratio * N)`` images are attacked (batches come shuffled). Returns the new images."""
    if attack not in ADVERSARIAL_MODES:
        raise ValueError(f"attack must be one of {ADVERSARIAL_MODES}, got {attack!r}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    k = int(round(ratio * images.shape[0]))
    if attack == "none" or k == 0 or eps == 0:
        return images
    if attack == "fgsm":
        adv = fgsm(model, images[:k], labels[:k], eps)
    else:
        adv = pgd(model, images[:k], labels[:k], eps, alpha=alpha, steps=steps, generator=generator)
    return torch.cat([adv, images[k:]])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Cross-entropy of the student's softmax at ``temperature`` against the teacher's soft labels at
    the same temperature (mean over the batch). The teacher's logits carry no gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    soft = (teacher_logits.detach() / temperature).softmax(1)
    return -(soft * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean()


def tempered_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of softmax(logits / T): how a distillation teacher is trained."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return F.cross_entropy(logits / temperature, labels)
