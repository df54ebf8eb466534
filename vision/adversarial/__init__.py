"""Adversarial attacks, detectors of adversarial inputs, and defenses.

Attacks take float images N,C,H,W in [0, 1] and labels 0..K-1 and return adversarial images in [0, 1]:
``gaussian_noise``, ``uniform_noise``, ``fgsm``, ``pgd`` (linf/l2), the adversarial patch
(``train_patch``/``apply_patch``), and ``fgsm_detector``/``pgd_detector`` against a detector's
classification loss. Detectors: ``GradientDetector``, ``SqueezeDetector``. Defenses:
``adversarial_batch`` (adversarial training), ``distillation_loss`` (defensive distillation).
"""
from vision.adversarial.attacks import fgsm, gaussian_noise, pgd, uniform_noise
from vision.adversarial.defenses import (
    ADVERSARIAL_MODES,
    adversarial_batch,
    distillation_loss,
    tempered_cross_entropy,
)
from vision.adversarial.detect import (
    AdversarialDetector,
    GradientDetector,
    SqueezeDetector,
    detection_report,
    median_filter,
    reduce_bit_depth,
)
from vision.adversarial.detector_attacks import classification_loss, fgsm_detector, pgd_detector
from vision.adversarial.patch import apply_patch, patch_attack, total_variation, train_patch
from vision.adversarial.robustness import ATTACKS, accuracy, accuracy_under_attack, robustness_curve

__all__ = [
    "fgsm", "pgd", "gaussian_noise", "uniform_noise",
    "train_patch", "apply_patch", "patch_attack", "total_variation",
    "fgsm_detector", "pgd_detector", "classification_loss",
    "AdversarialDetector", "GradientDetector", "SqueezeDetector", "detection_report",
    "reduce_bit_depth", "median_filter",
    "adversarial_batch", "distillation_loss", "tempered_cross_entropy", "ADVERSARIAL_MODES",
    "ATTACKS", "accuracy", "accuracy_under_attack", "robustness_curve",
]
