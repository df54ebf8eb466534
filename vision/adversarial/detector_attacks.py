"""FGSM and PGD against a detector's classification loss.

The detector follows torchvision's convention: in train mode ``model(list[CHW], targets)`` returns a
dict of losses. The attack ascends the losses whose names mention classification (``loss_classifier``;
box regression losses are left out), so the boxes matter less than the labels going wrong.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vision.adversarial._common import check_eps, mode, per_sample_norm

CLASSIFICATION_KEYS = ("classifier", "cls", "class")


def _check(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of C,H,W float tensors in [0, 1]")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or not im.is_floating_point():
            raise ValueError(f"images[{i}] must be a float C,H,W tensor, got {getattr(im, 'shape', type(im))}")
        if im.numel() and (im.min() < -1e-6 or im.max() > 1 + 1e-6):
            raise ValueError(f"images[{i}] must lie in [0, 1]")
    return [im.detach() for im in images]


def classification_loss(model: nn.Module, images: list[torch.Tensor], targets: list[dict],
                        loss_keys: tuple[str, ...] | None = None) -> torch.Tensor:
    """Sum of the detector's classification losses (train mode) for ``images`` and their ``targets``.

    ``loss_keys``: exact loss names to sum; by default every key naming classification."""
    with mode(model, True):
        # Train mode for the losses only: batch norm keeps its running statistics (the attack must not change
        # the model it attacks, and they normalise as in inference) and dropout stays off.
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                m.eval()
        losses = model(images, targets)
    if not isinstance(losses, dict):
        raise TypeError("the detector must return a dict of losses in train mode (torchvision convention)")
    keys = list(loss_keys) if loss_keys else [k for k in losses if any(s in k for s in CLASSIFICATION_KEYS)]
    missing = [k for k in keys if k not in losses]
    if not keys or missing:
        raise ValueError(f"no classification loss {missing or ''} among the detector's losses {sorted(losses)};"
                         " pass loss_keys=")
    return sum(losses[k] for k in keys)


def _grads(model, xs, targets, loss_keys):
    xs = [x.clone().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        loss = classification_loss(model, xs, targets, loss_keys)
        return list(torch.autograd.grad(loss, xs))


def fgsm_detector(model: nn.Module, images, targets: list[dict], eps: float,
                  loss_keys: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """One L-infinity step of size ``eps`` up the detector's classification loss.

    Takes a list of C,H,W images in [0, 1] and torchvision-style targets (``boxes``, ``labels`` 1..K);
    returns the list of adversarial images."""
    xs = _check(images)
    eps = check_eps(eps)
    grads = _grads(model, xs, targets, loss_keys)
    return [(x + eps * g.sign()).clamp(0, 1).detach() for x, g in zip(xs, grads)]


def pgd_detector(model: nn.Module, images, targets: list[dict], eps: float, alpha: float | None = None,
                 steps: int = 10, norm: str = "linf", random_start: bool = True, seed: int = 0,
                 loss_keys: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """PGD (L-infinity or L2, per image) up the detector's classification loss; returns the images."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    xs = _check(images)
    eps = check_eps(eps)
    alpha = check_eps(2.5 * eps / steps if alpha is None else alpha, "alpha")
    generator = torch.Generator().manual_seed(seed)

    def project(d):
        if norm == "linf":
            return d.clamp(-eps, eps)
        return d * (eps / d.norm().clamp_min(1e-12)).clamp(max=1.0)

    deltas = []
    for x in xs:
        d = torch.zeros_like(x)
        if random_start and norm == "linf":
            d = (2 * torch.rand(x.shape, generator=generator) - 1).to(x) * eps
        elif random_start:  # a uniform point in the L2 ball: random direction, radius eps * U^(1/d)
            direction = torch.randn(x.shape, generator=generator)
            radius = eps * float(torch.rand((), generator=generator)) ** (1.0 / x.numel())
            d = (direction * (radius / direction.norm().clamp_min(1e-12))).to(x)
        deltas.append((x + d).clamp(0, 1) - x)
    for _ in range(int(steps)):
        grads = _grads(model, [x + d for x, d in zip(xs, deltas)], targets, loss_keys)
        new = []
        for x, d, g in zip(xs, deltas, grads):
            step = g.sign() if norm == "linf" else g / per_sample_norm(g[None], 2)[0].clamp_min(1e-12)
            d = project(d + alpha * step)
            new.append((x + d).clamp(0, 1) - x)
        deltas = new
    return [(x + d).clamp(0, 1).detach() for x, d in zip(xs, deltas)]
