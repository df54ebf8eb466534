"""Defenses, trained in plain torch on shape crops: adversarial training raises PGD accuracy;
defensive distillation trains a student on soft labels and flattens the input gradients at T=1."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adversarial_shapes import render_shapes, tiny_cnn, train_classifier
from vision.adversarial import (
    accuracy,
    accuracy_under_attack,
    adversarial_batch,
    distillation_loss,
    tempered_cross_entropy,
)

T = 10.0


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return render_shapes(600, seed=0), render_shapes(200, seed=5)


@pytest.fixture(scope="module")
def plain(data):
    (x, y), _ = data
    return train_classifier(tiny_cnn(), x, y, steps=200)


def test_adversarial_training_raises_pgd_accuracy(data, plain):
    (x, y), (tx, ty) = data

    def step(model, xb, yb):
        xb = adversarial_batch(model, xb, yb, attack="pgd", eps=0.06, ratio=0.5, steps=3)
        return F.cross_entropy(model(xb), yb)

    defended = train_classifier(tiny_cnn(), x, y, steps=200, step_fn=step)
    assert accuracy(defended, tx, ty) > 0.9  # still a good classifier on clean crops
    undefended_pgd = accuracy_under_attack(plain, tx, ty, "pgd", 0.06)
    defended_pgd = accuracy_under_attack(defended, tx, ty, "pgd", 0.06)
    assert defended_pgd > undefended_pgd + 0.3, (undefended_pgd, defended_pgd)


def test_adversarial_batch_mixes_clean_and_attacked_images(plain, data):
    _, (tx, ty) = data
    x, y = tx[:10], ty[:10]
    mixed = adversarial_batch(plain, x, y, attack="fgsm", eps=0.05, ratio=0.3)
    changed = (mixed - x).flatten(1).abs().amax(1)
    assert torch.equal(mixed[3:], x[3:])
    assert torch.all(changed[:3] > 0.049) and torch.all(changed[:3] <= 0.05 + 1e-6)
    assert torch.equal(adversarial_batch(plain, x, y, attack="none"), x)
    with pytest.raises(ValueError, match="attack"):
        adversarial_batch(plain, x, y, attack="cw")
    with pytest.raises(ValueError, match="ratio"):
        adversarial_batch(plain, x, y, ratio=1.5)


def test_distillation_loss_is_soft_cross_entropy_at_temperature():
    teacher = torch.tensor([[4.0, 0.0, -2.0], [0.0, 3.0, 1.0]])
    student = torch.zeros_like(teacher, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=2.0)
    soft = (teacher / 2).softmax(1)
    assert loss.item() == pytest.approx(-(soft * (student / 2).log_softmax(1)).sum(1).mean().item())
    # Minimised when the student reproduces the teacher's soft labels.
    matched = teacher.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(distillation_loss(matched, teacher, 2.0), matched)
    assert g.abs().max() < 1e-6
    assert tempered_cross_entropy(teacher, torch.tensor([0, 1]), 1.0) == pytest.approx(
        F.cross_entropy(teacher, torch.tensor([0, 1])).item())
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, 0)


def test_defensive_distillation_student_learns_and_flattens_input_gradients(data, plain):
    (x, y), (tx, ty) = data
    teacher = train_classifier(tiny_cnn(seed=1), x, y, steps=200, lr=5e-3,
                               step_fn=lambda m, xb, yb: tempered_cross_entropy(m(xb), yb, T))
    def student_step(model, xb, yb):
        with torch.no_grad():
            soft = teacher(xb)
        return distillation_loss(model(xb), soft, T)

    student = train_classifier(tiny_cnn(seed=2), x, y, steps=200, lr=5e-3, step_fn=student_step)
    assert accuracy(student, tx, ty) > 0.9  # learned from soft labels alone

    def input_grad_norm(model):  # deployed at T=1: plain logits
        xg = tx[:100].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg), ty[:100], reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
        return g.flatten(1).norm(dim=1).median().item()

    # Trained at T, the logits are ~T times larger at T=1: the softmax saturates and the loss gradient
    # an attacker follows nearly vanishes (Papernot et al.; also why it is gradient masking, not robustness).
    assert input_grad_norm(student) < 0.1 * input_grad_norm(plain)
