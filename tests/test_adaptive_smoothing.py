"""Adaptive smoothing: the mixed classifier (numerics, modes, gradients through alpha, checkpoints) and
the mixing-network objective of fit (frozen bases stay bit-identical)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses.mixing_training  # noqa: F401  (registers adaptive_mixing)
from bastion.checkpoints import load_checkpoint, make_card
from bastion.data import load_dataset
from bastion.errors import ConfigError
from bastion.models import create_model
from bastion.train import TrainConfig, create_objective, fit
from defenses.adaptive_smoothing import MixedClassifier, mixer_for, save_mixed
from defenses.mixing_training import bases_unchanged, freeze_check

TAPS = {"accurate": ["net.1", "net.4"], "robust": ["net.1", "net.4"]}


def _bases(seed=0, width=8):
    torch.manual_seed(seed)
    return (create_model("small_cnn", 10, 1, 8, width=width), create_model("small_cnn", 10, 1, 8, width=width))


def _mixed(seed=0, **kw):
    g, h = _bases(seed)
    head = mixer_for(g, h, TAPS, (1, 8, 8), widths=(8, 16), blocks=0)
    return MixedClassifier(g, h, mixer=head, taps=TAPS, **kw), g, h


class _Huge(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        z = self.lin(x.flatten(1))
        return 1e4 * z / z.abs().amax(1, keepdim=True)


def test_probability_mixing_matches_definition():
    m, g, h = _mixed(temperatures=(1.5, 0.7))
    x = torch.rand(5, 1, 8, 8)
    for a in (0.0, 0.3, 0.9, 1.0):
        f = m.with_fixed_alpha(a).eval()
        with torch.no_grad():
            want = (1 - a) * F.softmax(1.5 * g(x), 1) + a * F.softmax(0.7 * h(x), 1)
            assert torch.allclose(f(x).exp(), want, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 1e-8, 0.5, 1 - 1e-8, 1.0])
@pytest.mark.parametrize("mixing", ["probability", "logit"])
def test_numerically_stable_with_huge_logits(alpha, mixing):
    m = MixedClassifier(_Huge(0), _Huge(1), alpha=alpha, mixing=mixing).eval()
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    out, gamma = m.forward_with_mixing(x)
    (grad,) = torch.autograd.grad(F.nll_loss(out, torch.arange(6) % 10), x)
    assert torch.isfinite(out).all() and torch.isfinite(gamma).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("rng", [(0.0, 1.0), (0.5, 1.0), (0.84, 0.99), (1e-8, 1 - 1e-8)])
def test_mixing_net_stable_with_huge_logits_and_ranges(rng):
    m, _, _ = _mixed(alpha_range=rng, b_eval=40.0)
    m.accurate.net[-1].weight.data.mul_(1e4)
    m.robust.net[-1].weight.data.mul_(-1e4)
    m.eval()
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    out, gamma = m.forward_with_mixing(x)
    (grad,) = torch.autograd.grad(F.nll_loss(out, torch.arange(6) % 10) + F.softplus(-gamma).sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    a = m.mixing_weight(x.detach())
    assert (a >= rng[0] - 1e-6).all() and (a <= rng[1] + 1e-6).all()


def test_eval_alpha_does_not_depend_on_batch():
    m, _, _ = _mixed(b_eval=1.0, alpha_range=(0.3, 0.95))
    m.train()
    x = torch.rand(64, 1, 8, 8)
    m.forward_with_mixing(x)  # move the BN running statistics off their initial values
    m.eval()
    with torch.no_grad():
        full_out, full_g = m.forward_with_mixing(x)
        one = [m.forward_with_mixing(x[i:i + 1]) for i in range(64)]
    assert torch.allclose(full_out, torch.cat([o for o, _ in one]), atol=1e-5)
    assert torch.allclose(full_g, torch.cat([g for _, g in one]), atol=1e-5)


def test_gradient_reaches_input_through_alpha():
    m, _, _ = _mixed()
    m.eval()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    _, gamma = m.forward_with_mixing(x)
    (ga,) = torch.autograd.grad(gamma.sum(), x)
    assert ga.abs().sum() > 0, "the alpha path is detached"
    # the output's gradient differs from the one with alpha held fixed at its value
    out, gamma = m.forward_with_mixing(x)
    (g_full,) = torch.autograd.grad(out[:, 0].sum(), x)
    a = torch.sigmoid(gamma.detach())
    lg, lh = F.log_softmax(m.accurate(x), 1), F.log_softmax(m.robust(x), 1)
    fixed = torch.logsumexp(torch.stack([(1 - a).log()[:, None] + lg, a.log()[:, None] + lh]), 0)
    (g_fixed,) = torch.autograd.grad(fixed[:, 0].sum(), x)
    assert not torch.allclose(g_full, g_fixed)
    dbg = m._spawn(detach_features=True).eval()
    x2 = x.detach().requires_grad_(True)
    _, gamma2 = dbg.forward_with_mixing(x2)
    (cut,) = torch.autograd.grad(gamma2.sum(), x2, allow_unused=True)
    assert cut is None  # the debug switch really cuts the path (never for evaluation)


def test_bases_stay_frozen_and_in_eval_mode():
    m, g, h = _mixed()
    m.train()
    assert m.mixer.training and not g.training and not h.training
    assert not any(p.requires_grad for p in list(g.parameters()) + list(h.parameters()))
    with pytest.raises(ConfigError):
        MixedClassifier(g, h)
    with pytest.raises(ConfigError):
        MixedClassifier(g, h, alpha=0.5, alpha_range=(0.9, 0.1))


def test_operating_point_moves_alpha_without_retraining():
    m, _, _ = _mixed()
    m.eval()
    x = torch.rand(16, 1, 8, 8)
    lo = m.operating_point(b_eval=-3.0).mixing_weight(x)
    hi = m.operating_point(b_eval=3.0).mixing_weight(x)
    assert (hi > lo).all()
    r = m.operating_point(alpha_range=(0.7, 0.9)).mixing_weight(x)
    assert (r >= 0.7 - 1e-6).all() and (r <= 0.9 + 1e-6).all()
    assert m.operating_point(alpha_range=(0.7, 0.9)).alpha_floor() == 0.7


def test_composite_checkpoint_roundtrip(tmp_path):
    m, g, h = _mixed(temperatures=(1.2, 0.3), b_eval=1.05, alpha_range=(0.5, 1.0))
    m.train()
    m(torch.rand(32, 1, 8, 8))  # BN running stats are part of the checkpoint
    m.eval()
    card = make_card(g, "small_cnn", 10, (1, 8, 8), {"width": 8})
    save_mixed(tmp_path / "mix", m, card, card, {"widths": [8, 16], "blocks": 0})
    m2, c2 = load_checkpoint(tmp_path / "mix")
    assert c2["composite"]["builder"] == "adaptive_smoothing" and set(c2["composite"]["parts"]) == {
        "accurate", "robust", "mixer"}
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    fixed = m.with_fixed_alpha(0.8)
    save_mixed(tmp_path / "fixed", fixed, card, card)
    f2, _ = load_checkpoint(tmp_path / "fixed")
    with torch.no_grad():
        assert torch.equal(fixed.eval()(x), f2(x))


def test_mixing_objective_trains_the_mixer_only(tmp_path):
    train = load_dataset("digits", "train").every(1, 96)
    m, _, _ = _mixed()
    before = freeze_check(m)
    mixer_before = {k: v.clone() for k, v in m.mixer.state_dict().items()}
    obj = create_objective("adaptive_mixing", eps=0.3, steps_df=2, splits=2).use_pool(train.images)
    res = fit(m, train, obj, TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=1e-5),
              run_dir=tmp_path / "run", quiet=True,
              checkpoint_card={"arch": None, "num_classes": 10, "input_shape": [1, 8, 8]})
    assert bases_unchanged(m, before)
    assert any(not torch.equal(v, m.mixer.state_dict()[k]) for k, v in mixer_before.items())
    rec = res.history[-1]
    assert math.isfinite(rec["train_loss"]) and 0 <= rec["train_alpha_clean"] <= 1


def test_mixing_objective_params_are_checked():
    with pytest.raises(ConfigError, match="attacks"):
        create_objective("adaptive_mixing", attacks=["fgsm"])
    with pytest.raises(ConfigError, match="momentum_max"):
        create_objective("adaptive_mixing", momentum_max=1.0)
    g, h = _bases()
    obj = create_objective("adaptive_mixing", extra_clean=0)
    with pytest.raises(ConfigError, match="mixing network"):
        obj(MixedClassifier(g, h, alpha=0.5), torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), None)
