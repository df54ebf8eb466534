"""Attacks on a tiny CNN trained on shape crops: FGSM hurts, PGD hurts more, budgets hold exactly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from adversarial_shapes import render_shapes, tiny_cnn, train_classifier
from vision.adversarial import (
    GradientDetector,
    SqueezeDetector,
    accuracy,
    accuracy_under_attack,
    apply_patch,
    detection_report,
    fgsm,
    fgsm_detector,
    gaussian_noise,
    pgd,
    pgd_detector,
    robustness_curve,
    train_patch,
    uniform_noise,
)


@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(1)
    train = render_shapes(600, seed=0)
    test = render_shapes(200, seed=5)
    return train, test


@pytest.fixture(scope="module")
def trained(shapes):
    (x, y), _ = shapes
    return train_classifier(tiny_cnn(), x, y, steps=200)


def test_clean_model_is_accurate_and_fgsm_lowers_accuracy_substantially(trained, shapes):
    _, (tx, ty) = shapes
    clean = accuracy(trained, tx, ty)
    attacked = accuracy_under_attack(trained, tx, ty, "fgsm", eps=0.06)
    assert clean > 0.9
    assert attacked < clean - 0.4, (clean, attacked)


def test_random_noise_hurts_far_less_than_fgsm_at_the_same_eps(trained, shapes):
    _, (tx, ty) = shapes
    assert accuracy_under_attack(trained, tx, ty, "uniform", 0.06) > accuracy_under_attack(trained, tx, ty, "fgsm", 0.06) + 0.3


@pytest.mark.parametrize("eps", [0.02, 0.04, 0.06])
def test_pgd_is_at_least_as_strong_as_fgsm(trained, shapes, eps):
    _, (tx, ty) = shapes
    assert accuracy_under_attack(trained, tx, ty, "pgd", eps) <= accuracy_under_attack(trained, tx, ty, "fgsm", eps)


def test_linf_perturbations_respect_eps_and_use_it(trained, shapes):
    _, (tx, ty) = shapes
    x, y = tx[:64], ty[:64]
    eps = 0.05
    for adv in (fgsm(trained, x, y, eps), pgd(trained, x, y, eps, steps=5), uniform_noise(None, x, y, eps)):
        delta = (adv - x).abs()
        assert adv.min() >= 0 and adv.max() <= 1
        assert delta.max() <= eps + 1e-6
    # FGSM moves every pixel that is not pinned at the border of [0, 1] by exactly eps.
    delta = (fgsm(trained, x, y, eps) - x).abs()
    free = (x > eps) & (x < 1 - eps)
    assert torch.allclose(delta[free], torch.full_like(delta[free], eps), atol=1e-6)


def test_l2_perturbations_respect_eps(trained, shapes):
    _, (tx, ty) = shapes
    x, y = tx[:64], ty[:64]
    eps = 1.0
    adv = pgd(trained, x, y, eps, alpha=0.5, steps=8, norm="l2")
    norms = (adv - x).flatten(1).norm(dim=1)
    assert adv.min() >= 0 and adv.max() <= 1
    assert norms.max() <= eps + 1e-5
    assert norms.max() > 0.9 * eps  # the attack spends its budget
    assert accuracy(trained, adv, y) < accuracy(trained, x, y)


def test_attacks_leave_model_mode_and_gradients_alone(shapes):
    _, (tx, ty) = shapes
    model = tiny_cnn().train()
    pgd(model, tx[:8], ty[:8], 0.03, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    train_patch(model, tx[:8], ty[:8], size=4, steps=2)  # its loss.backward() filled every parameter's grad
    assert model.training and all(p.grad is None for p in model.parameters())


def test_detector_attacks_leave_batch_norm_statistics_and_gradients_alone(shapes):
    """The detector's losses need train mode; its batch norm must not learn from the attack's images."""
    _, (tx, ty) = shapes
    det = TinyDetector()
    det.backbone.insert(1, nn.BatchNorm2d(16))
    det.eval()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    images = list(tx[:4])
    targets = [{"boxes": torch.tensor([[0.0, 0, 24, 24]]), "labels": (l + 1)[None]} for l in ty[:4]]
    fgsm_detector(det, images, targets, 0.03)
    pgd_detector(det, images, targets, 0.03, steps=2, norm="l2")
    assert all(torch.equal(v, before[k]) for k, v in det.state_dict().items())
    assert not det.training and all(p.grad is None for p in det.parameters())
    with pytest.raises(ValueError, match="steps"):
        pgd_detector(det, images, targets, 0.03, steps=0)


def test_bad_inputs_are_rejected_with_clear_errors(trained, shapes):
    _, (tx, ty) = shapes
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fgsm(trained, tx[:4] * 255, ty[:4], 0.1)
    with pytest.raises(ValueError, match="N,C,H,W"):
        fgsm(trained, tx[0], ty[:1], 0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd(trained, tx[:4], ty[:4], -1.0)
    with pytest.raises(ValueError, match="norm"):
        pgd(trained, tx[:4], ty[:4], 0.1, norm="l1")
    with pytest.raises(ValueError, match="labels"):
        fgsm(trained, tx[:4], ty[:3], 0.1)
    with pytest.raises(ValueError, match="eps"):  # inf * sign(0) is NaN: the images left [0, 1]
        fgsm(trained, tx[:4], ty[:4], float("inf"))
    with pytest.raises(ValueError, match="NaN"):
        fgsm(trained, torch.where(tx[:4] > 0.5, float("nan"), tx[:4]), ty[:4], 0.1)
    with pytest.raises(ValueError, match=">= 0"):  # -100 is cross-entropy's "ignore": unattacked, silently
        pgd(trained, tx[:4], torch.tensor([0, 1, -100, 2]), 0.1)


def test_gaussian_noise_stays_in_range_and_has_the_given_spread():
    x = torch.full((4, 3, 16, 16), 0.5)
    noisy = gaussian_noise(None, x, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert math.isclose((noisy - x).std().item(), 0.1, rel_tol=0.1)


def test_robustness_curve_rows(trained, shapes):
    _, (tx, ty) = shapes
    rows = robustness_curve(trained, tx[:64], ty[:64], [0, 0.05], attacks=["fgsm", "pgd"])
    assert [(r["attack"], r["eps"]) for r in rows] == [("fgsm", 0), ("fgsm", 0.05), ("pgd", 0), ("pgd", 0.05)]
    assert rows[0]["accuracy"] == rows[2]["accuracy"] > rows[1]["accuracy"]


def test_adversarial_patch_fools_the_model_anywhere(trained, shapes):
    (x, y), (tx, ty) = shapes
    patch = train_patch(trained, x[:200], y[:200], size=8, steps=60, lr=0.1)
    assert patch.shape == (3, 8, 8) and patch.min() >= 0 and patch.max() <= 1
    random_square = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
    # Same random places for both squares: only the optimisation differs.
    with_patch = accuracy(trained, apply_patch(tx, patch, generator=torch.Generator().manual_seed(7)), ty)
    with_random = accuracy(trained, apply_patch(tx, random_square, generator=torch.Generator().manual_seed(7)), ty)
    assert with_patch < with_random - 0.15, (with_patch, with_random)
    # A fixed placement puts the patch exactly there.
    placed = apply_patch(tx[:2], patch, locations=(3, 5))
    assert torch.equal(placed[:, :, 3:11, 5:13], patch.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="inside"):
        apply_patch(tx[:2], patch, locations=(20, 20))


def test_detectors_flag_adversarial_inputs_at_the_target_false_positive_rate(trained, shapes):
    _, (tx, ty) = shapes
    report = detection_report(trained, tx, ty, {"fgsm": fgsm, "pgd": lambda m, x, y, e: pgd(m, x, y, e, steps=5)},
                              eps=0.03, fpr=0.1)
    assert set(report["detectors"]) == {"input_gradient", "feature_squeezing"}
    for name, row in report["detectors"].items():
        assert row["clean_fpr"] <= 0.25, (name, row)
        for attack, result in row["attacks"].items():
            assert result["successful"] > 10
            # Better than chance: a threshold with 10% clean false positives flags far more attacks.
            assert result["detection_rate"] > max(2 * row["clean_fpr"], 0.25), (name, attack, result)


def test_detector_needs_calibration_first(trained, shapes):
    _, (tx, _) = shapes
    det = GradientDetector(trained)
    with pytest.raises(RuntimeError, match="calibrate"):
        det.detect(tx[:4])
    threshold = SqueezeDetector(trained).calibrate(tx[:100], fpr=0.1)
    assert threshold >= 0


class TinyDetector(nn.Module):
    """A torchvision-style detector in miniature: per-image class logits over a fixed box, losses in train."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.backbone = tiny_cnn(classes + 1)

    def forward(self, images, targets=None):
        logits = self.backbone(torch.stack(images))
        if self.training:
            labels = torch.stack([t["labels"][0] for t in targets])
            return {"loss_classifier": nn.functional.cross_entropy(logits, labels),
                    "loss_box_reg": logits.sum() * 0}
        return [{"boxes": torch.zeros(1, 4), "scores": s.softmax(0).max(0).values[None],
                 "labels": s.argmax(0)[None]} for s in logits]


def test_fgsm_and_pgd_against_a_detector_classification_loss(shapes):
    (x, y), (tx, ty) = shapes
    det = TinyDetector()
    train_classifier(det.backbone, x, y + 1, steps=150)
    det.eval()
    images = list(tx[:40])
    targets = [{"boxes": torch.tensor([[0.0, 0, 24, 24]]), "labels": (l + 1)[None]} for l in ty[:40]]

    def correct(imgs):
        return sum(int(o["labels"][0] == t["labels"][0]) for o, t in zip(det(imgs), targets))

    base = correct(images)
    f = fgsm_detector(det, images, targets, 0.06)
    p = pgd_detector(det, images, targets, 0.06, steps=5)
    assert not det.training  # the mode is restored
    assert all((a - b).abs().max() <= 0.06 + 1e-6 for a, b in zip(f + p, images + images))
    assert correct(f) < base - 10 and correct(p) <= correct(f), (base, correct(f), correct(p))
    with pytest.raises(ValueError, match="loss"):
        fgsm_detector(det, images, targets, 0.06, loss_keys=("loss_mask",))
