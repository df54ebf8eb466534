"""Adversarial patch (Brown et al. 2017): a printable square that fools a classifier wherever it sits.

The patch is optimised over random placements (expectation over locations), so it works anywhere
in the image; its pixels stay in [0, 1] and a total-variation penalty keeps it smooth enough to print.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision.adversarial._common import check_images, check_labels, logits_of, mode


def _locations(n: int, height: int, width: int, size: int, generator, device) -> torch.Tensor:
    ys = torch.randint(0, height - size + 1, (n,), generator=generator).to(device)
    xs = torch.randint(0, width - size + 1, (n,), generator=generator).to(device)
    return torch.stack([ys, xs], dim=1)


def apply_patch(images: torch.Tensor, patch: torch.Tensor, locations=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Paste ``patch`` (C,s,s in [0, 1]) onto each image.

    ``locations``: None (random per image), a ``(y, x)`` pair for all images, or an N,2 tensor of top-left
    corners. Differentiable w.r.t. ``patch``. Returns new images N,C,H,W."""
    check_images(images)
    if patch.dim() != 3 or patch.shape[0] != images.shape[1] or patch.shape[1] != patch.shape[2]:
        raise ValueError(f"patch must be a square C,s,s with C={images.shape[1]}, got {tuple(patch.shape)}")
    n, _, h, w = images.shape
    size = patch.shape[-1]
    if size > min(h, w):
        raise ValueError(f"patch side {size} does not fit images of size {h}x{w}")
    if locations is None:
        locs = _locations(n, h, w, size, generator, images.device)
    else:
        locs = torch.as_tensor(locations, device=images.device).long()
        locs = locs.expand(n, 2) if locs.dim() == 1 else locs
        if locs.shape != (n, 2) or (locs < 0).any() or (locs[:, 0] > h - size).any() or (locs[:, 1] > w - size).any():
            raise ValueError(f"locations must be (y, x) top-left corners inside the {h}x{w} image, got {locations!r}")
    # A mask and a padded patch per image: one differentiable composite, no in-place writes.
    canvas, mask = [], []
    for y, x in locs.tolist():
        pad = (x, w - x - size, y, h - y - size)
        canvas.append(F.pad(patch, pad))
        mask.append(F.pad(torch.ones_like(patch[:1]), pad))
    canvas, mask = torch.stack(canvas), torch.stack(mask)
    return images * (1 - mask) + canvas * mask


def total_variation(patch: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels: low for printable, smooth patches."""
    return (patch[:, 1:, :] - patch[:, :-1, :]).abs().mean() + (patch[:, :, 1:] - patch[:, :, :-1]).abs().mean()


def train_patch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int, *,
                target: int | None = None, steps: int = 100, lr: float = 0.05, batch_size: int = 32,
                tv_weight: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Optimise a square patch of side ``size`` against ``model`` on ``images``/``labels``.

    Untargeted (``target=None``) maximises the cross-entropy of the true labels; targeted minimises the
    cross-entropy toward class ``target``. Each step places the patch at random positions. Returns the
    patch, a C,size,size tensor in [0, 1] on the images' device."""
    check_images(images)
    check_labels(labels, images)
    if not 1 <= size <= min(images.shape[-2:]):
        raise ValueError(f"size must be in 1..{min(images.shape[-2:])}, got {size!r}")
    generator = torch.Generator().manual_seed(seed)
    patch = torch.rand((images.shape[1], size, size), generator=generator).to(images.device)
    patch.requires_grad_(True)
    optimizer = torch.optim.Adam([patch], lr=lr)
    with mode(model, False), torch.enable_grad():
        for _ in range(int(steps)):
            idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
            x, y = images[idx.to(images.device)], labels[idx.to(labels.device)]
            logits = logits_of(model, apply_patch(x, patch, generator=generator))
            if target is None:
                loss = -F.cross_entropy(logits, y)
            else:
                loss = F.cross_entropy(logits, torch.full_like(y, int(target)))
            loss = loss + tv_weight * total_variation(patch)
            (patch.grad,) = torch.autograd.grad(loss, [patch])  # the model's parameters get no gradient
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
    return patch.detach()


def patch_attack(patch: torch.Tensor, seed: int = 0):
    """An attack ``fn(model, images, labels, eps)`` that pastes ``patch`` at random places
    (``eps`` is ignored), for use beside FGSM/PGD in a robustness report."""
    def attack(model, images, labels, eps=0.0):
        return apply_patch(images, patch.to(images.device), generator=torch.Generator().manual_seed(seed))

    return attack
