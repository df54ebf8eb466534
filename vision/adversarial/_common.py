"""Checks and helpers shared by every attack: input validation, logits, mode switching."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise a clear error unless ``images`` is a float N,C,H,W tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape N,C,H,W, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape N,C,H,W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1], got dtype {images.dtype}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} hold NaN or infinite values; expected values in [0, 1]")
    if images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
        )


def check_labels(labels: torch.Tensor, images: torch.Tensor) -> None:
    """Raise unless ``labels`` is an integer vector with one entry per image."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape (N,), got {getattr(labels, 'shape', labels)!r}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")
    if labels.numel() and int(labels.min()) < 0:  # -100 is cross-entropy's "ignore": the image went unattacked
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")


def check_eps(eps: float, name: str = "eps") -> float:
    eps = float(eps)
    if not 0 <= eps < float("inf"):  # also rejects NaN (inf * sign(0) is NaN: images out of [0, 1])
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return eps


def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class logits N,K of a classifier (GoogLeNet-style ``(logits, aux...)`` keeps the first)."""
    out = model(images)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "logits"):  # torchvision's GoogLeNetOutputs / InceptionOutputs
        out = out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TypeError(f"model must return logits of shape N,K, got {type(out).__name__}")
    return out


@contextlib.contextmanager
def mode(model: nn.Module, train: bool):
    """Temporarily put ``model`` in train or eval mode; restores every submodule's own flag."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def per_sample_norm(x: torch.Tensor, p: float) -> torch.Tensor:
    """Norm of each sample of a batch, shaped N,1,1,1 for broadcasting."""
    return x.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (x.dim() - 1)))
