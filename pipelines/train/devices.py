"""Which devices a training worker (or a process loading a checkpoint) may use."""
from __future__ import annotations

import inspect

import torch


def local_devices() -> list[torch.device]:
    """The visible GPUs (a Ray worker sees only the ones it was given), else the CPU."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [torch.device(f"cuda:{i}") for i in range(n)] or [torch.device("cpu")]


def tower_devices() -> tuple[torch.device, torch.device]:
    """Two devices for a two-tower model: two GPUs when there are two, else the one device twice."""
    devs = local_devices()
    return (devs[0], devs[1] if len(devs) > 1 else devs[0])


def wants_devices(builder) -> bool:
    """Whether a registry builder places the model itself (it takes a ``devices`` argument)."""
    return "devices" in inspect.signature(builder).parameters


def is_multi_device(model: torch.nn.Module) -> bool:
    """A model that placed its parts on devices itself (the two-tower AlexNet) must not be moved as a whole."""
    return hasattr(model, "devices")
