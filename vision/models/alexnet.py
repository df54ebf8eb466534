"""AlexNet as in the 2012 paper: two towers, each on its own device.

The towers exchange activations only where the paper's figure crosses: conv3 reads both towers' conv2
maps, and every fully connected layer reads both towers' previous outputs. conv1, conv2, conv4 and conv5
see only their own tower (on one device that is a grouped convolution, ``groups=2``; see ``fused``).

``devices=("cuda:0", "cuda:1")`` puts one tower per GPU (model parallelism, as the 3 GB GPUs of 2012
forced); by default both stay where the model is built (the CPU). Move it with ``place(devices)``:
``.to(device)`` would put both towers on one device while ``devices`` still named the old ones. The logits come back on ``devices[0]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision.models.classification import Normalize
from vision.models.registry import register_model


# The paper's response normalisation: b = a / (k + alpha * sum of a^2 over n = 5 maps)^beta with k = 2,
# alpha = 1e-4, beta = 0.75. torch's LocalResponseNorm divides its alpha by n: 5e-4 here is the paper's 1e-4
# (alpha=1e-4 in torch normalised five times more weakly than the paper).
def paper_lrn() -> nn.Module:
    return nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)


class Tower(nn.Module):
    """One half of the network: 48/128/192/192/128 filters, 2048-wide fully connected layers."""

    def __init__(self, dropout: float):
        super().__init__()
        # conv1-conv2: this tower's input only
        self.stem = nn.Sequential(
            nn.Conv2d(3, 48, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True), paper_lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(48, 128, kernel_size=5, padding=2), nn.ReLU(inplace=True), paper_lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.conv3 = nn.Conv2d(256, 192, kernel_size=3, padding=1)  # reads both towers
        self.top = nn.Sequential(  # conv4-conv5: this tower only
            nn.Conv2d(192, 192, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(192, 128, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))  # 64x64 inputs end at 1x1; this restores 6x6
        self.fc6 = nn.Linear(2 * 128 * 6 * 6, 2048)  # reads both towers
        self.fc7 = nn.Linear(2 * 2048, 2048)  # reads both towers
        self.dropout = nn.Dropout(dropout)


class AlexNet2012(nn.Module):
    """The two-tower AlexNet: float RGB N,3,H,W in [0, 1] -> logits N,K on ``devices[0]``."""

    def __init__(self, num_classes: int = 1000, devices=None, dropout: float = 0.5):
        super().__init__()
        if devices is not None and len(devices) != 2:
            raise ValueError(f"devices must name two devices, one per tower; got {devices!r}")
        self.normalize = Normalize()
        self.tower0, self.tower1 = Tower(dropout), Tower(dropout)
        self.fc8 = nn.Linear(2 * 2048, num_classes)  # reads both towers
        self.num_features = 256
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.place(devices)

    def place(self, devices=None) -> "AlexNet2012":
        """Move each tower to its device (the normalization and fc8 go to the first); ``None`` keeps the
        towers where they were built (e.g. the default or the ``meta`` device). Returns self."""
        if devices is None:
            devices = (self.tower0.conv3.weight.device, self.tower1.conv3.weight.device)
        self.devices = tuple(torch.device(d) for d in devices)
        d0, d1 = self.devices
        self.tower0.to(d0)
        self.tower1.to(d1)
        self.normalize.to(d0)
        self.fc8.to(d0)
        return self

    def _cross(self, a: torch.Tensor, b: torch.Tensor, dim: int = 1):
        """Both towers' activations concatenated, once on each tower's device."""
        d0, d1 = self.devices
        return torch.cat([a, b.to(d0)], dim), torch.cat([a.to(d1), b], dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 1] -> conv5 maps of both towers, N,256,h,w on ``devices[0]``."""
        a, b = self._conv(x)
        return torch.cat([a, b.to(self.devices[0])], 1)

    def _conv(self, x):
        d0, d1 = self.devices
        x = self.normalize(x.to(d0))
        a, b = self.tower0.stem(x), self.tower1.stem(x.to(d1))
        a_in, b_in = self._cross(a, b)
        a = self.tower0.top(F.relu(self.tower0.conv3(a_in)))
        b = self.tower1.top(F.relu(self.tower1.conv3(b_in)))
        return a, b

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """conv5 maps N,256,h,w (tower 0's channels first) -> logits N,K on ``devices[0]``."""
        d1 = self.devices[1]
        return self._head(features[:, :128], features[:, 128:].to(d1))

    def _head(self, a, b):
        t0, t1 = self.tower0, self.tower1
        a = torch.flatten(t0.avgpool(a), 1)
        b = torch.flatten(t1.avgpool(b), 1)
        # Flattened per tower then concatenated: the same order as flattening torch.cat of the maps.
        a_in, b_in = self._cross(a, b)
        a = t0.dropout(F.relu(t0.fc6(t0.dropout(a_in))))
        b = t1.dropout(F.relu(t1.fc6(t1.dropout(b_in))))
        a_in, b_in = self._cross(a, b)
        a = F.relu(t0.fc7(a_in))
        b = F.relu(t1.fc7(b_in))
        return self.fc8(torch.cat([a, b.to(self.devices[0])], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:  # a feature extractor: pooled conv5 features, N,num_features
            return F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        a, b = self._conv(x)
        return self._head(a, b)

    def get_classifier(self) -> nn.Module:
        return self.fc8

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh fc8 for ``num_classes``; 0 removes the whole fully connected head (fc6-fc8: no parameter
        left unused under DDP) and ``forward`` returns the pooled conv5 features, N,``num_features`` (it
        returned fc7's 4096 while ``num_features`` said 256)."""
        if num_classes:
            if self.num_classes == 0:
                raise ValueError("the fully connected head was removed (reset_classifier(0)); build a new model")
            self.fc8 = nn.Linear(self.fc8.in_features, num_classes).to(self.devices[0])
        else:
            self.fc8 = nn.Identity()
            for tower in (self.tower0, self.tower1):
                tower.fc6 = tower.fc7 = None
        self.num_classes = num_classes

    @torch.no_grad()
    def fused(self) -> nn.Module:
        """The same network on one device, with grouped convolutions and concatenated weights (the form
        most single-GPU reimplementations use); gives the same output as the two towers (in eval mode)."""
        t0, t1 = self.tower0, self.tower1
        dev = self.devices[0]

        def cat_conv(c0: nn.Conv2d, c1: nn.Conv2d, groups: int) -> nn.Conv2d:
            conv = nn.Conv2d(c0.in_channels * (2 if groups == 2 else 1), 2 * c0.out_channels, c0.kernel_size,
                             c0.stride, c0.padding, groups=groups)
            conv.weight.copy_(torch.cat([c0.weight.to(dev), c1.weight.to(dev)]))
            conv.bias.copy_(torch.cat([c0.bias.to(dev), c1.bias.to(dev)]))
            return conv

        def cat_linear(l0: nn.Linear, l1: nn.Linear) -> nn.Linear:
            lin = nn.Linear(l0.in_features, 2 * l0.out_features)
            lin.weight.copy_(torch.cat([l0.weight.to(dev), l1.weight.to(dev)]))
            lin.bias.copy_(torch.cat([l0.bias.to(dev), l1.bias.to(dev)]))
            return lin

        # conv1 and conv3 read all their input channels: plain convolutions with both towers' filters.
        return _FusedAlexNet(self.normalize, cat_conv(t0.stem[0], t1.stem[0], groups=1),
                             cat_conv(t0.stem[4], t1.stem[4], groups=2), cat_conv(t0.conv3, t1.conv3, groups=1),
                             cat_conv(t0.top[0], t1.top[0], groups=2), cat_conv(t0.top[2], t1.top[2], groups=2),
                             cat_linear(t0.fc6, t1.fc6), cat_linear(t0.fc7, t1.fc7), self.fc8).to(dev).eval()


class _FusedAlexNet(nn.Module):
    def __init__(self, normalize, conv1, conv2, conv3, conv4, conv5, fc6, fc7, fc8):
        super().__init__()
        self.normalize, self.conv1, self.conv2 = normalize, conv1, conv2
        self.conv3, self.conv4, self.conv5 = conv3, conv4, conv5
        self.fc6, self.fc7, self.fc8 = fc6, fc7, fc8
        self.lrn, self.pool = paper_lrn(), nn.MaxPool2d(3, 2)

    def _grouped_lrn(self, x):  # the paper normalizes within a tower
        return torch.cat([self.lrn(h) for h in x.chunk(2, 1)], 1)

    def forward(self, x):
        x = self.normalize(x)
        x = self.pool(self._grouped_lrn(F.relu(self.conv1(x))))
        x = self.pool(self._grouped_lrn(F.relu(self.conv2(x))))
        x = F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(x))))))
        x = F.adaptive_avg_pool2d(self.pool(x), (6, 6))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        return self.fc8(x)


@register_model("alexnet2012", task="classification", description="AlexNet as in 2012: two towers, two devices")
def alexnet2012(num_classes: int, devices=None, pretrained: bool = False, **kw) -> nn.Module:
    if pretrained:
        raise ValueError("alexnet2012 has no published weights; use pretrained=False (or the 'alexnet' entry)")
    return AlexNet2012(num_classes, devices=None if devices is None else tuple(devices), **kw)
