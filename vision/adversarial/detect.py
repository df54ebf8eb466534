"""Detecting adversarial inputs.

Each detector gives every image a score (higher = more likely adversarial) and is calibrated on clean
images: the threshold is the clean-score quantile that yields the wanted false-positive rate.

- ``GradientDetector``: magnitude of the input gradient of the loss toward the predicted class. A clean,
  confident prediction sits in a flat region; an adversarial one sits near a decision boundary.
- ``SqueezeDetector`` (feature squeezing, Xu et al. 2018): L1 distance between the softmax on the image
  and on squeezed copies (fewer colour bits, median filter); adversarial noise does not survive squeezing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision.adversarial._common import check_images, logits_of, mode


class AdversarialDetector:
    """Base: ``score(images) -> (N,)``, ``calibrate(clean, fpr)`` sets ``threshold``, ``detect`` flags."""

    name = "detector"

    def __init__(self, model: nn.Module, batch_size: int = 64):
        self.model = model
        self.batch_size = batch_size
        self.threshold: float | None = None
        self.target_fpr: float | None = None

    def _score_batch(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (N,) of float images N,C,H,W in [0, 1]; higher means more likely adversarial."""
        check_images(images)
        with mode(self.model, False):
            return torch.cat([self._score_batch(b) for b in images.split(self.batch_size)]).detach().cpu()

    def calibrate(self, clean_images: torch.Tensor, fpr: float = 0.05) -> float:
        """Choose the threshold so that a fraction ``fpr`` of ``clean_images`` is flagged; returns it."""
        if not 0 < fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
        scores = self.score(clean_images)
        self.threshold = float(torch.quantile(scores.double(), 1 - fpr))
        self.target_fpr = fpr
        return self.threshold

    def detect(self, images: torch.Tensor) -> torch.Tensor:
        """Boolean (N,): which images score above the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}.calibrate(clean_images, fpr) must run before detect()")
        return self.score(images) > self.threshold


class GradientDetector(AdversarialDetector):
    """Score = L2 norm of d CE(f(x), argmax f(x)) / dx."""

    name = "input_gradient"

    def _score_batch(self, images):
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = logits_of(self.model, x)
            loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return grad.flatten(1).norm(dim=1)


def reduce_bit_depth(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise [0, 1] images to ``bits`` bits per channel."""
    levels = 2**bits - 1
    return torch.round(images * levels) / levels


def median_filter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel median over ``size`` x ``size`` windows (same spatial size out)."""
    pad = (size // 2, (size - 1) // 2, size // 2, (size - 1) // 2)
    padded = F.pad(images, pad, mode="reflect")
    windows = F.unfold(padded.flatten(0, 1)[:, None], size)  # (N*C, size*size, H*W)
    return windows.median(dim=1).values.view_as(images)


class SqueezeDetector(AdversarialDetector):
    """Score = max over squeezers of || softmax(f(x)) - softmax(f(squeeze(x))) ||_1."""

    name = "feature_squeezing"

    def __init__(self, model: nn.Module, bits: int = 4, median: int = 2, batch_size: int = 64):
        super().__init__(model, batch_size)
        self.bits, self.median = bits, median

    @torch.no_grad()
    def _score_batch(self, images):
        p = logits_of(self.model, images).softmax(1)
        squeezed = [reduce_bit_depth(images, self.bits), median_filter(images, self.median)]
        return torch.stack([(logits_of(self.model, s).softmax(1) - p).abs().sum(1) for s in squeezed]).amax(0)


def detection_report(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attacks: dict,
                     eps: float, fpr: float = 0.05, detectors: list[AdversarialDetector] | None = None) -> dict:
    """Detection rate of each detector against each attack at ``eps``.

    The images are split in half: the first half calibrates each threshold at ``fpr``; the second half
    measures the false-positive rate actually reached and the share of adversarial images flagged
    (counting only attacks that changed the prediction, since a failed attack needs no detection).
    ``attacks``: name -> ``fn(model, images, labels, eps)``. Returns a JSON-ready dict."""
    if images.shape[0] < 4:
        raise ValueError(f"detection_report needs at least 4 images, got {images.shape[0]}")
    detectors = detectors or [GradientDetector(model), SqueezeDetector(model)]
    half = images.shape[0] // 2
    calib, test_x, test_y = images[:half], images[half:], labels[half:]
    with torch.no_grad(), mode(model, False):
        clean_pred = logits_of(model, test_x).argmax(1)
    adversarial = {}
    for name, attack in attacks.items():
        adv = attack(model, test_x, test_y, eps)
        with torch.no_grad(), mode(model, False):
            fooled = (logits_of(model, adv).argmax(1) != test_y) & (clean_pred == test_y)
        adversarial[name] = (adv, fooled)
    report = {"eps": eps, "target_fpr": fpr, "calibration_images": half, "test_images": len(test_x),
              "detectors": {}}
    for det in detectors:
        det.calibrate(calib, fpr)
        row = {"threshold": det.threshold, "clean_fpr": det.detect(test_x).float().mean().item(), "attacks": {}}
        for name, (adv, fooled) in adversarial.items():
            flagged = det.detect(adv)
            n = int(fooled.sum())
            row["attacks"][name] = {
                "successful": n,
                "detection_rate": flagged[fooled.cpu()].float().mean().item() if n else None,
                "flagged_all": flagged.float().mean().item(),
            }
        report["detectors"][det.name] = row
    return report
