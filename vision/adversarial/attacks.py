"""Attacks on classifiers: random noise, FGSM and PGD (L-infinity and L2).

Every attack takes float images N,C,H,W in [0, 1] and integer labels 0..K-1, works batched on the
images' device, leaves the model's train/eval mode and parameter gradients untouched, and returns
adversarial images in [0, 1] whose distance to the input is at most ``eps`` in the attack's norm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision.adversarial._common import (
    check_eps,
    check_images,
    check_labels,
    logits_of,
    mode,
    per_sample_norm,
)

NORMS = ("linf", "l2")


def gaussian_noise(model: nn.Module | None, images: torch.Tensor, labels: torch.Tensor | None = None,
                   eps: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images plus Gaussian noise of standard deviation ``eps``, clamped to [0, 1].

    ``model`` and ``labels`` are ignored (kept so every attack has the same signature)."""
    check_images(images)
    eps = check_eps(eps)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + eps * noise).clamp(0, 1)


def uniform_noise(model: nn.Module | None, images: torch.Tensor, labels: torch.Tensor | None = None,
                  eps: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images plus noise uniform in [-eps, eps] per pixel (an L-infinity baseline), clamped to [0, 1]."""
    check_images(images)
    eps = check_eps(eps)
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + eps * (2 * noise - 1)).clamp(0, 1)


def _input_grad(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. the input (not the parameters)."""
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(logits_of(model, x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / per_sample_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _finish(images: torch.Tensor, delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Clamp to the pixel range; clamping only shrinks each coordinate of delta, so the budget holds."""
    return (images + _project(delta, eps, norm)).clamp(0, 1).detach()


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-infinity step of size ``eps``.

    Takes a classifier, images N,C,H,W in [0, 1], labels (N,) in 0..K-1; returns adversarial images."""
    check_images(images)
    check_labels(labels, images)
    eps = check_eps(eps)
    if eps == 0:
        return images.detach().clone()
    with mode(model, False):
        grad = _input_grad(model, images, labels)
    return _finish(images, eps * grad.sign(), eps, "linf")


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018), L-infinity or L2.

    ``steps`` ascent steps of size ``alpha`` (default ``2.5 * eps / steps``) on the cross-entropy, each
    followed by projection onto the ``eps``-ball around ``images`` and the [0, 1] box. ``random_start``
    begins at a uniformly random point of the ball. Returns the adversarial images."""
    check_images(images)
    check_labels(labels, images)
    eps = check_eps(eps)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    alpha = check_eps(2.5 * eps / steps if alpha is None else alpha, "alpha")
    if eps == 0:
        return images.detach().clone()
    images = images.detach()
    delta = torch.zeros_like(images)
    if random_start:
        if norm == "linf":
            delta = (2 * torch.rand(images.shape, generator=generator, device=images.device,
                                    dtype=images.dtype) - 1) * eps
        else:  # a uniform point in the L2 ball: random direction, radius eps * U^(1/d)
            direction = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            direction = direction / per_sample_norm(direction, 2).clamp_min(1e-12)
            u = torch.rand((images.shape[0],) + (1,) * (images.dim() - 1), generator=generator,
                           device=images.device, dtype=images.dtype)
            delta = direction * eps * u.pow(1.0 / images[0].numel())
        delta = (images + delta).clamp(0, 1) - images
    with mode(model, False):
        for _ in range(int(steps)):
            grad = _input_grad(model, images + delta, labels)
            if norm == "linf":
                step = alpha * grad.sign()
            else:
                step = alpha * grad / per_sample_norm(grad, 2).clamp_min(1e-12)
            delta = _project(delta + step, eps, norm)
            delta = (images + delta).clamp(0, 1) - images
    return _finish(images, delta, eps, norm)
