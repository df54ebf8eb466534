"""Tiny shape crops and a tiny CNN trained on them in plain torch, for the adversarial and explain tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = ("disc", "square", "cross")


def render_shapes(n: int, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images N,3,size,size in [0, 1]: a bright disc, square or cross on a dark noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    for i in range(n):
        bg = torch.rand(3, 1, 1, generator=g) * 0.5
        fg = 0.5 + torch.rand(3, 1, 1, generator=g) * 0.5
        cy, cx = torch.randint(7, size - 7, (2,), generator=g).tolist()
        r = int(torch.randint(4, 7, (1,), generator=g))
        dy, dx = (yy - cy).abs(), (xx - cx).abs()
        mask = [dy**2 + dx**2 <= r * r, (dy <= r) & (dx <= r),
                ((dy <= 1) & (dx <= r + 1)) | ((dx <= 1) & (dy <= r + 1))][int(labels[i])]
        images[i] = (torch.where(mask, fg, bg) + 0.05 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
    return images, labels


def tiny_cnn(num_classes: int = len(CLASSES), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 6 * 6, num_classes),
    )


def train_classifier(model: nn.Module, images, labels, steps: int = 200, step_fn=None, lr: float = 3e-3,
                     seed: int = 1) -> nn.Module:
    """Adam on random mini-batches; ``step_fn(model, x, y) -> loss`` replaces plain cross-entropy."""
    opt = torch.optim.Adam(model.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=g)
        x, y = images[idx], labels[idx]
        loss = step_fn(model, x, y) if step_fn else F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
