"""Multi-scale RoIAlign whose training pass on the CPU is a sparse matrix product.

RoIAlign (``aligned=False``, a fixed ``sampling_ratio``, as torchvision's ``MultiScaleRoIAlign`` calls it)
is linear in the features and the same for every channel: each output bin is a weighted sum of at most
``4 * sampling_ratio**2`` feature pixels. Written as a sparse matrix M (one row per RoI bin, one column per
feature pixel of every pyramid level), the forward pass is ``M @ X`` and the backward pass ``M.T @ dY``.

torchvision's CPU kernel computes the same forward pass, but its backward pass scatters every sample into
the feature gradient one element at a time on one thread: in a Mask R-CNN (ResNet-18 FPN, 96 px, batch 4)
training step on 2 cores it took 47% of the step. The products give the same outputs and gradients (to
float rounding) in a fraction of that time, and their memory grows with the samples, not with the feature
maps. They are used where that backward pass runs: in training on the CPU. Without gradients, on a GPU, in
half precision or with an adaptive sampling ratio (``<= 0``) the module is torchvision's own. It has no
weights: checkpoints are the same with either.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign as _TorchvisionMultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper


def _axis(v: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Sample coordinates (K, S) along one axis of maps ``size`` (K,) long -> the two pixels each reads and
    their weights, (K, S, 2) each: torchvision's bilinear rule (a sample below -1 or above ``size`` weighs
    nothing, one in [-1, 0] reads pixel 0, one past the last pixel centre reads the last pixel)."""
    size = size[:, None]
    finite = torch.isfinite(v)
    inside = (finite & (v >= -1) & (v <= size)).to(v.dtype)
    # A NaN or huge coordinate (a diverging detector's box) weighs nothing and reads pixel 0: floor() of it
    # as an integer would be a column index far outside the matrix, which the sparse kernels do not check.
    v = torch.minimum(torch.where(finite, v, torch.zeros_like(v)).clamp(min=0), size.to(v.dtype))
    low = v.floor().long().clamp(max=size - 1)
    at_edge = low >= size - 1
    frac = torch.where(at_edge, torch.zeros_like(v), v - low)
    index = torch.stack([low, torch.where(at_edge, low, low + 1)], -1)
    return index, torch.stack([1 - frac, frac], -1) * inside[..., None]


def _samples(start: Tensor, end: Tensor, bins: int, sr: int) -> Tensor:
    """(K, bins * sr) sample coordinates along one axis, in torchvision's order of float operations
    (``start + bin * size + (s + 0.5) * size / sr``), so that both land on the same floats."""
    size = (end - start).clamp(min=1.0) / bins
    b = torch.arange(bins, dtype=start.dtype, device=start.device)
    s = torch.arange(sr, dtype=start.dtype, device=start.device) + 0.5
    v = (start[:, None, None] + b[None, :, None] * size[:, None, None]) + (s[None, None, :] * size[:, None, None]) / sr
    return v.reshape(start.shape[0], bins * sr)


def roi_align_matrix(shapes: list[tuple[int, int, int]], scales: list[float], rois: Tensor, levels: Tensor,
                     output_size: tuple[int, int], sampling_ratio: int) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """RoIAlign over several feature maps as one sparse matrix: its entries (rows, cols, values; in row
    order, ``4 * sampling_ratio**2`` per row, a column may repeat within a row) and its shape.

    ``shapes``: (N, H, W) of each level, whose pixels are the columns ``n * H * W + y * W + x`` after those
    of the levels before; ``rois``: (K, 5) of (image index, x1, y1, x2, y2) in image pixels; ``levels``: (K,)
    the level each RoI reads, at ``scales[level]``. Row ``k * ph * pw + i * pw + j`` is bin (i, j) of RoI k.
    As torchvision's ``roi_align(aligned=False)``: a RoI at least one feature pixel long each way, samples at
    the centres of ``sampling_ratio`` equal parts of a bin each way, averaged."""
    ph, pw = output_size
    sr = int(sampling_ratio)
    k = rois.shape[0]
    dtype, device = rois.dtype, rois.device
    sizes = torch.tensor([n * h * w for n, h, w in shapes], device=device)
    offsets = torch.cumsum(sizes, 0) - sizes
    height = torch.tensor([h for _, h, _ in shapes], device=device)[levels]
    width = torch.tensor([w for _, _, w in shapes], device=device)[levels]
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    x1, y1, x2, y2 = (rois[:, 1:] * scale[:, None]).unbind(1)
    iy, wy = _axis(_samples(y1, y2, ph, sr), height)
    ix, wx = _axis(_samples(x1, x2, pw, sr), width)
    # entries ordered (K, ph, pw, sample y, sample x, corner y, corner x)
    iy, wy = iy.view(k, ph, 1, sr, 1, 2, 1), wy.view(k, ph, 1, sr, 1, 2, 1)
    ix, wx = ix.view(k, 1, pw, 1, sr, 1, 2), wx.view(k, 1, pw, 1, sr, 1, 2)
    shape = (k, ph, pw, sr, sr, 2, 2)
    base = (offsets[levels] + rois[:, 0].long() * height * width).view(k, 1, 1, 1, 1, 1, 1)
    cols = (base + iy * width.view(k, 1, 1, 1, 1, 1, 1) + ix).expand(shape).reshape(-1)
    vals = (wy * wx / (sr * sr)).expand(shape).reshape(-1)
    rows = torch.arange(k * ph * pw, device=device).repeat_interleave(4 * sr * sr)
    return rows, cols, vals, (k * ph * pw, int(sizes.sum()))


def sparse_matrix(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """The CSR matrix of the entries (duplicates summed, columns sorted within rows: torch's invariants,
    so that every backend's product and transpose read it right)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape, check_invariants=False)
        return coo.coalesce().to_sparse_csr()


class MultiScaleRoIAlign(_TorchvisionMultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same arguments, levels and scales) whose training pass on the
    CPU is one sparse product over every level (:func:`roi_align_matrix`); torch differentiates it."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for name, v in x.items() if name in self.featmap_names]
        if not (torch.is_grad_enabled() and self.sampling_ratio > 0 and features
                and features[0].device.type == "cpu" and features[0].dtype in (torch.float32, torch.float64)
                and any(f.requires_grad for f in features)):  # (no sparse CPU product in half precision)
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = self._setup(features, image_shapes)
        c, dtype = features[0].shape[1], features[0].dtype
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)]).to(dtype)
        k = rois.shape[0]
        if k == 0:
            return features[0].new_zeros((0, c, *self.output_size))
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(k, dtype=torch.long)
        with torch.no_grad():
            m = sparse_matrix(*roi_align_matrix([(f.shape[0], f.shape[2], f.shape[3]) for f in features],
                                                self.scales, rois, levels, self.output_size, self.sampling_ratio))
        stacked = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features]).to(dtype)
        out = torch.sparse.mm(m, stacked)
        return out.view(k, *self.output_size, c).permute(0, 3, 1, 2).contiguous()

    def _setup(self, features: list[Tensor], image_shapes: list[tuple[int, int]]) -> tuple[list[float], LevelMapper]:
        """torchvision's scales (2**-k from the largest image's height) and FPN level mapper."""
        if not image_shapes:
            raise ValueError("MultiScaleRoIAlign: the images list is empty")
        height = max(s[0] for s in image_shapes)
        scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
        return scales, LevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])),
                                   canonical_scale=self.canonical_scale, canonical_level=self.canonical_level)
