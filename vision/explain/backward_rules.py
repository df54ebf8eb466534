"""Backward passes that project a unit's activation back to pixel space.

Ordinary backpropagation already unpools through max pooling with the forward pass's switches and
runs convolutions with transposed filters; what distinguishes the projections is what happens at
each rectifier (and normalization) on the way down. ``backward_rule(rule)`` is a context manager
(a ``TorchFunctionMode``) that swaps those pieces during the forward pass, so the same code works on
any network, however its ReLUs are written (``nn.ReLU``, ``F.relu``, in place or not):

- ``"deconvnet"`` (Zeiler & Fergus 2014): the signal going down is rectified (``relu(grad)``), whatever
  the forward input was; local response normalization is passed through (the deconvnet does not
  invert it).
- ``"guided"`` (Springenberg et al. 2015): rectified signal *and* the forward ReLU's mask.
- ``"linear"``: every ReLU and normalization passes the signal, max pooling spreads it over its whole
  window; the non-zero pixels of the result are then exactly the unit's receptive field.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RULES = ("deconvnet", "guided", "linear", "gradient")


class _Rectify(torch.autograd.Function):
    """ReLU forward; the rule decides the backward."""

    @staticmethod
    def forward(ctx, x, rule):
        ctx.save_for_backward(x)
        ctx.rule = rule
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            return grad.clamp_min(0), None
        if ctx.rule == "guided":
            return grad.clamp_min(0) * (x > 0), None
        return grad, None  # linear


def _pool_args(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return input, kernel_size, stride, padding, dilation, ceil_mode, return_indices


class _BackwardRule(TorchFunctionMode):
    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.rule == "plain":
            return func(*args, **kwargs)
        if name in ("relu", "relu_") and args and isinstance(args[0], torch.Tensor):
            return _Rectify.apply(args[0], self.rule)  # out of place: callers use the returned tensor
        if name == "local_response_norm" and self.rule in ("deconvnet", "linear"):
            x = args[0]
            return x + (func(*args, **kwargs) - x).detach()  # value normalized, signal passed unchanged
        if name in ("max_pool2d", "max_pool2d_with_indices") and self.rule == "linear":
            x, k, s, p, d, ceil, with_idx = _pool_args(*args, **kwargs)
            out = func(*args, **kwargs)
            value = out[0] if with_idx else out
            if d not in (1, (1, 1)):
                raise ValueError("receptive fields through dilated max pooling are not supported")
            spread = F.avg_pool2d(x, k, s if s is not None else k, p, ceil_mode=ceil, count_include_pad=True)
            value = spread + (value - spread).detach()  # max pooling's value, average pooling's spread
            return (value, out[1]) if with_idx else value
        return func(*args, **kwargs)


def backward_rule(rule: str):
    """Context manager: forward passes run inside it backpropagate with ``rule`` (see module doc)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "gradient":
        return _BackwardRule("plain")  # no rule: ordinary gradients (plain ReLU handled by autograd)
    return _BackwardRule(rule)
