"""The torchvision classifiers behind one face (after timm): AlexNet, VGG, GoogLeNet, ResNet, DenseNet,
ResNeXt, SqueezeNet.

Every model here takes float RGB in [0, 1] (ImageNet normalization happens inside), accepts 64x64 as
well as 224x224 inputs (torchvision's adaptive pooling), and offers ``forward_features`` (the last
feature map, N x C x h x w), ``forward_head``, ``get_classifier``, ``reset_classifier`` and ``num_features``.
GoogLeNet in training mode returns ``(logits, aux1, aux2)``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torchvision.models as tvm

from vision.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """ImageNet mean/std normalization of float RGB in [0, 1], as buffers so it follows the model's device."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# Per family: (feature extractor, head, name of the final classifier layer inside the head).
def _resnet_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _resnet_head(net, x):
    return net.fc(torch.flatten(net.avgpool(x), 1))


def _vgg_features(net, x):  # VGG and AlexNet: a `features` Sequential, then avgpool + MLP
    return net.features(x)


def _vgg_head(net, x):
    return net.classifier(torch.flatten(net.avgpool(x), 1))


def _densenet_features(net, x):
    return torch.relu(net.features(x))


def _densenet_head(net, x):
    return net.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _squeezenet_features(net, x):
    return net.features(x)


def _squeezenet_head(net, x):
    return torch.flatten(net.classifier(x), 1)


def _googlenet_features(net, x):
    x = net._transform_input(x)
    for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                 "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                 "inception5a", "inception5b"):
        x = getattr(net, name)(x)
    return x


def _googlenet_head(net, x):
    return net.fc(net.dropout(torch.flatten(net.avgpool(x), 1)))


_FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "resnet": (_resnet_features, _resnet_head),
    "vgg": (_vgg_features, _vgg_head),
    "densenet": (_densenet_features, _densenet_head),
    "squeezenet": (_squeezenet_features, _squeezenet_head),
    "googlenet": (_googlenet_features, _googlenet_head),
}


def _last_layer(net: nn.Module, family: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the layer that produces the logits."""
    if family in ("resnet", "googlenet"):
        return net, "fc"
    if family == "densenet":
        return net, "classifier"
    if family == "vgg":
        return net.classifier, str(len(net.classifier) - 1)
    if family == "squeezenet":
        return net.classifier, "1"
    raise ValueError(f"unknown family {family!r}")


def _feature_channels(net: nn.Module, family: str) -> int:
    if family == "vgg":
        return [m for m in net.features if isinstance(m, nn.Conv2d)][-1].out_channels
    if family == "squeezenet":
        return net.classifier[1].in_channels
    parent, attr = _last_layer(net, family)
    return getattr(parent, attr).in_features


class Classifier(nn.Module):
    """A classification network laid out like a torchvision family, with normalization inside and the timm face.

    ``net`` is the torchvision model (its state_dict keys live under ``net.``), ``family`` one of
    resnet, vgg, densenet, squeezenet, googlenet.
    """

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        if family not in _FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(_FAMILIES)}")
        self.normalize = Normalize()
        self.net = net
        self.family = family
        self.num_features = _feature_channels(net, family)
        self.num_classes = self._count_classes()

    def _count_classes(self) -> int:
        layer = self.get_classifier()
        return getattr(layer, "out_features", getattr(layer, "out_channels", 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB N,3,H,W in [0, 1] -> the last feature map N,C,h,w (C = ``num_features``)."""
        return _FAMILIES[self.family][0](self.net, self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The feature map of ``forward_features`` -> logits N,K."""
        return _FAMILIES[self.family][1](self.net, features)

    def forward(self, x: torch.Tensor):
        """Float RGB in [0, 1] -> logits N,K; GoogLeNet training with aux heads: (logits, aux1, aux2)."""
        if self.family == "googlenet" and self.training and self.net.aux1 is not None:
            out = self.net(self.normalize(x))  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
            return out.logits, out.aux_logits1, out.aux_logits2
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The layer that produces the logits."""
        parent, attr = _last_layer(self.net, self.family)
        return getattr(parent, attr)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final layer for ``num_classes``; 0 removes the classification head entirely, so that
        the model is a pure feature extractor (no parameters left unused under DDP)."""
        if num_classes == 0:
            self._drop_head()
            self.num_classes = 0
            return
        parent, attr = _last_layer(self.net, self.family)
        old = getattr(parent, attr)
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        else:
            new = nn.Linear(old.in_features, num_classes)
        setattr(parent, attr, new.to(next(old.parameters()).device))
        if self.family == "googlenet" and self.net.aux1 is not None:
            self.net.aux1.fc2 = nn.Linear(self.net.aux1.fc2.in_features, num_classes)
            self.net.aux2.fc2 = nn.Linear(self.net.aux2.fc2.in_features, num_classes)
        self.num_classes = num_classes

    def _drop_head(self) -> None:
        if self.family == "vgg":  # the whole MLP goes; the features are pooled to one vector
            self.net.avgpool, self.net.classifier = nn.AdaptiveAvgPool2d(1), nn.Identity()
        elif self.family == "squeezenet":
            self.net.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1))
        else:
            parent, attr = _last_layer(self.net, self.family)
            setattr(parent, attr, nn.Identity())
        if self.family == "googlenet":
            self.net.aux_logits, self.net.aux1, self.net.aux2 = False, None, None


def _build(tv_builder: Callable, family: str, num_classes: int, pretrained: bool = False, **kw) -> nn.Module:
    """torchvision builder -> Classifier. ``pretrained`` loads ImageNet weights (needs the
    internet or a warm torch hub cache) and then gives the model a fresh ``num_classes`` head."""
    if pretrained:
        net = tv_builder(weights="DEFAULT", **kw)
        model = Classifier(net, family)
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model
    return Classifier(tv_builder(weights=None, num_classes=num_classes, **kw), family)


@register_model("alexnet", task="classification", weights="alexnet", description="AlexNet, single tower (torchvision)")
def alexnet(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.alexnet, "vgg", num_classes, **kw)


@register_model("vgg11", task="classification", weights="vgg11", description="VGG-11")
def vgg11(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.vgg11, "vgg", num_classes, **kw)


@register_model("vgg11_bn", task="classification", weights="vgg11_bn", description="VGG-11 with batch norm")
def vgg11_bn(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.vgg11_bn, "vgg", num_classes, **kw)


@register_model("vgg16", task="classification", weights="vgg16", description="VGG-16")
def vgg16(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.vgg16, "vgg", num_classes, **kw)


@register_model("vgg16_bn", task="classification", weights="vgg16_bn", description="VGG-16 with batch norm")
def vgg16_bn(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.vgg16_bn, "vgg", num_classes, **kw)


@register_model("googlenet", task="classification", weights="googlenet", description="GoogLeNet (Inception v1) with two aux classifiers")
def googlenet(num_classes: int, aux_logits: bool = True, **kw) -> nn.Module:
    if not kw.get("pretrained"):  # with weights torchvision refuses init_weights=True (they replace it)
        kw.setdefault("init_weights", True)  # torchvision warns and defaults to its scipy-free init otherwise
    # Passed on: with weights torchvision drops the aux heads unless asked for them (they are not trained)
    model = _build(tvm.googlenet, "googlenet", num_classes, aux_logits=aux_logits, **kw)
    if not aux_logits:
        model.net.aux_logits, model.net.aux1, model.net.aux2 = False, None, None
    return model


@register_model("resnet18", task="classification", weights="resnet18", description="ResNet-18")
def resnet18(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.resnet18, "resnet", num_classes, **kw)


@register_model("resnet34", task="classification", weights="resnet34", description="ResNet-34")
def resnet34(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.resnet34, "resnet", num_classes, **kw)


@register_model("resnet50", task="classification", weights="resnet50", description="ResNet-50")
def resnet50(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.resnet50, "resnet", num_classes, **kw)


@register_model("resnet101", task="classification", weights="resnet101", description="ResNet-101")
def resnet101(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.resnet101, "resnet", num_classes, **kw)


@register_model("resnet152", task="classification", weights="resnet152", description="ResNet-152")
def resnet152(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.resnet152, "resnet", num_classes, **kw)


@register_model("resnext50_32x4d", task="classification", weights="resnext50_32x4d", description="ResNeXt-50 32x4d")
def resnext50_32x4d(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.resnext50_32x4d, "resnet", num_classes, **kw)


@register_model("densenet121", task="classification", weights="densenet121", description="DenseNet-121")
def densenet121(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.densenet121, "densenet", num_classes, **kw)


@register_model("squeezenet1_0", task="classification", weights="squeezenet1_0", description="SqueezeNet 1.0")
def squeezenet1_0(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.squeezenet1_0, "squeezenet", num_classes, **kw)


@register_model("squeezenet1_1", task="classification", weights="squeezenet1_1", description="SqueezeNet 1.1")
def squeezenet1_1(num_classes: int, **kw) -> nn.Module:
    return _build(tvm.squeezenet1_1, "squeezenet", num_classes, **kw)
