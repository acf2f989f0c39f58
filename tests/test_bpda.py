"""BPDA: an input-quantized model masks gradients (PGD and APGD stall); PGD through
`attacks.adaptive.bpda` reaches the straight-through number and breaks it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks import AttackProbe, create_attack, sanity_flags
from attacks.adaptive import bpda
from bastion.data import load_dataset
from bastion.models import create_model
from bastion.train import StandardObjective, TrainConfig, fit

torch.set_num_threads(1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    return (x * 4).round() / 4


class Quantized(nn.Module):
    """The defended model: classifier(quantize(x)); its input gradient is zero almost everywhere."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(quantize(x))


class HandSTE(nn.Module):
    """The straight-through reference, written by hand inside the model."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x + (quantize(x) - x).detach())


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = create_model("mlp", 10, 1, 8, hidden=(64,))
    cfg = TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=1e-2, weight_decay=0.0,
                      schedule="constant", seed=0)
    m = fit(m, load_dataset("digits", "train"), StandardObjective(), cfg, quiet=True).model.eval()
    te = load_dataset("digits", "test")
    return m, te.images[:120], te.labels[:120]


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_bpda_pgd_reaches_the_straight_through_number(setup):
    m, x, y = setup
    defended = Quantized(m)
    atk = create_attack("pgd", "linf:0.15", steps=30)
    plain = _acc(defended, atk(defended, x, y), y)
    through = _acc(defended, atk(bpda(m, quantize), x, y), y)
    reference = _acc(defended, atk(HandSTE(m), x, y), y)
    assert through <= reference + 0.01
    assert through < plain - 0.2, (plain, through)
    with torch.no_grad():  # the wrapper's outputs are the defended model's
        assert torch.equal(bpda(m, quantize)(x), defended(x))


def test_flags_point_at_the_remedy(setup):
    m, x, y = setup
    recs = AttackProbe("linf:0.15", ["pgd"]).run(Quantized(m), x[:24], y[:24], torch.arange(24),
                                                  torch.Generator().manual_seed(0))
    assert any("gradient is exactly zero" in f for f in sanity_flags(recs))


def test_bpda_with_a_differentiable_backward(setup):
    m, x, y = setup
    smooth = lambda z: z + 0.0 * torch.sin(z)  # noqa: E731  (any differentiable approximation)
    wrapped = bpda(m, quantize, backward=smooth)
    xg = x[:4].clone().requires_grad_(True)
    wrapped(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
