"""AAER regularizer math on a hand-built batch, both gradient semantics, and the objectives'
perturbation geometry (FGSM / FGSM-RS / N-FGSM / warm-up), presets and factories."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError
from bastion.train import StepContext, create_objective
from defenses.single_step import SingleStepObjective, aae_regularizer, epoch_summary, preset_lambdas


def ce0(u0: float, u1: float) -> float:
    """Cross-entropy of logits (u0, u1) for label 0, by hand."""
    return math.log(math.exp(u0) + math.exp(u1)) - u0


# Hand-built batch, label 0 everywhere, two classes.
#   ex0: start (0,0) -> adv (1,0): loss drops  -> AAE, ||dz||^2 = 1
#   ex1: start (0,0) -> adv (0,2): loss rises  -> NAE, ||dz||^2 = 4
#   ex2: start (1,0) -> adv (1,1): loss rises  -> NAE, ||dz||^2 = 1
#   ex3: start (0,0) -> adv (3,0): loss drops  -> AAE, ||dz||^2 = 9
Z_ETA = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
Z_ADV = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0]]
L1, L2, L3 = 1.0, 2.5, 1.5


def _batch(z_adv_rows=Z_ADV, z_eta_rows=Z_ETA):
    y = torch.zeros(len(z_adv_rows), dtype=torch.long)
    z_eta = torch.tensor(z_eta_rows, dtype=torch.float64)
    z_adv = torch.tensor(z_adv_rows, dtype=torch.float64, requires_grad=True)
    l_eta = F.cross_entropy(z_eta, y, reduction="none")
    l_adv = F.cross_entropy(z_adv, y, reduction="none")
    return z_eta, l_eta, z_adv, l_adv


def test_hand_batch_values_and_reference_gradients():
    z_eta, l_eta, z_adv, l_adv = _batch()
    reg, st = aae_regularizer(z_eta, l_eta, z_adv, l_adv, L1, L2, L3, ce_term_grad=False)
    m, b = 2, 4
    v_a, v_n = (1 + 9) / 2, (4 + 1) / 2
    c_a = ((ce0(0, 0) - ce0(1, 0)) + (ce0(0, 0) - ce0(3, 0))) / 2
    r = L1 * m / b
    assert st["aae_count"] == 2 and st["aae_frac"] == 0.5 and st["mixed"] == 1.0
    assert st["v_a"] == pytest.approx(v_a) and st["v_n"] == pytest.approx(v_n)
    assert st["v_gap"] == pytest.approx(v_a - v_n) and st["gate_open"] == 1.0
    assert st["c_a"] == pytest.approx(c_a)
    assert float(reg.detach()) == pytest.approx(r * (L2 * c_a + L3 * (v_a - v_n)))
    assert st["reg"] == pytest.approx(float(reg.detach()))
    assert st["reg_grad"] == pytest.approx(r * L3 * (v_a - v_n))
    reg.backward()
    # Only the AAE rows' adversarial logits carry gradient: (2*l1*l3/B) * (z_adv - z_eta).
    expect = torch.zeros(4, 2, dtype=torch.float64)
    expect[0] = 2 * L1 * L3 / b * torch.tensor([1.0, 0.0])
    expect[3] = 2 * L1 * L3 / b * torch.tensor([3.0, 0.0])
    assert torch.allclose(z_adv.grad, expect)
    assert z_eta.grad is None  # start logits are constants


def test_hand_batch_ce_term_grad():
    z_eta, l_eta, z_adv, l_adv = _batch()
    reg, st = aae_regularizer(z_eta, l_eta, z_adv, l_adv, L1, L2, L3, ce_term_grad=True)
    b, m = 4, 2
    reg.backward()
    expect = torch.zeros(4, 2, dtype=torch.float64)
    for i, u in ((0, 1.0), (3, 3.0)):
        s = 1 / (1 + math.exp(-u))              # softmax prob of class 0 for logits (u, 0)
        dce = torch.tensor([s - 1, 1 - s])      # d CE / d z  (label 0)
        # + r*l3*(1/m)*2*(z_adv - z_eta)   - r*l2*(1/m)*dCE/dz
        expect[i] = 2 * L1 * L3 / b * torch.tensor([u, 0.0]) - (L1 * m / b) * L2 / m * dce
    assert torch.allclose(z_adv.grad, expect)
    c_a = ((ce0(0, 0) - ce0(1, 0)) + (ce0(0, 0) - ce0(3, 0))) / 2
    assert st["reg_grad"] == pytest.approx(L1 * m / b * (L2 * c_a + L3 * 2.5))


def test_gate_closed_keeps_only_constant_ce_term():
    # AAEs move little (||dz||^2 = 0.01 each), NAEs a lot: V_A < V_N -> the lambda3 term is 0.
    z_adv = [[0.1, 0.0], [0.0, 2.0], [1.0, 1.0], [0.1, 0.0]]
    z_eta, l_eta, za, la = _batch(z_adv)
    reg, st = aae_regularizer(z_eta, l_eta, za, la, L1, L2, L3, ce_term_grad=False)
    assert st["gate_open"] == 0.0 and st["v_gap"] < 0
    c_a = ce0(0, 0) - ce0(0.1, 0)
    assert float(reg.detach()) == pytest.approx(0.5 * L2 * c_a)   # logged, but ...
    assert st["reg_grad"] == 0.0
    reg.backward()
    assert torch.count_nonzero(za.grad) == 0             # ... carries no gradient


@pytest.mark.parametrize("ce_term_grad", [False, True])
@pytest.mark.parametrize("rows", [
    [[-1.0, 0.0], [0.0, 2.0]],   # no AAE (both losses rise)
    [[1.0, 0.0], [3.0, 0.0]],    # all AAE (both losses drop)
])
def test_regularizer_exactly_zero_without_aae_or_nae(rows, ce_term_grad):
    z_eta, l_eta, z_adv, l_adv = _batch(rows, [[0.0, 0.0], [0.0, 0.0]])
    reg, st = aae_regularizer(z_eta, l_eta, z_adv, l_adv, 1.0, 10.0, 10.0, ce_term_grad)
    assert float(reg) == 0.0 and not reg.requires_grad
    assert st["reg"] == 0.0 and st["mixed"] == 0.0 and st["v_gap"] == 0.0


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _ctx(epoch=0, it=0, iters=10, seed=0):
    return StepContext(epoch, it, iters, 100, torch.Generator().manual_seed(seed))


def _x():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("name,lo,hi", [("fgsm", 0.1, 0.1), ("fgsm_rs", 0.0, 0.1), ("n_fgsm", 0.0, 0.3)])
def test_perturbation_geometry(name, lo, hi):
    obj = create_objective(name, eps=0.1)
    x, y = _x()
    x = x * 0.4 + 0.3        # keep away from the box so the ball is not cut
    _, _, delta = obj.perturb(_Lin(), x, y, torch.Generator().manual_seed(0))
    d = delta.abs().amax().item()
    assert d <= hi + 1e-6 and d >= lo - 1e-6
    if name == "n_fgsm":
        assert d > 0.1 + 1e-3     # no projection: noise 2 eps + step eps exceeds eps


def test_objective_loss_matches_manual_and_warmup():
    model = _Lin()
    x, y = _x()
    obj = create_objective("rs_aaer", eps=0.1, lambda2=2.5, lambda3=1.5)
    res = obj(model, x, y, _ctx(seed=3))
    z_eta, l_eta, delta = obj.perturb(model, x, y, torch.Generator().manual_seed(3))
    z_adv = model(x + delta)
    l_adv = F.cross_entropy(z_adv, y, reduction="none")
    reg, _ = aae_regularizer(z_eta, l_eta, z_adv, l_adv, 1.0, 2.5, 1.5)
    assert float(res.loss.detach()) == pytest.approx(float((l_adv.mean() + reg).detach()))
    assert set(res.stats) >= {"aae_count", "aae_frac", "v_a", "v_n", "v_gap", "reg", "gate_open", "mixed"}
    # eps warm-up: at progress 0.5 of a 2-epoch warm-up the step and radius are eps/4; noise unscaled
    w = SingleStepObjective(0.1, 1.0, 0.0, True, warmup_epochs=2)
    assert w.warmup_factor(_ctx(epoch=0, it=5, iters=10)) == pytest.approx(0.25)
    _, _, d = w.perturb(model, x * 0.4 + 0.3, y, None, w=0.25)
    assert d.abs().amax().item() == pytest.approx(0.025, abs=1e-6)


def test_presets_and_factories():
    assert preset_lambdas("cifar10", 8 / 255, "rs") == (1.0, 2.5, 1.5)
    assert preset_lambdas("cifar10", 16 / 255, "n") == (1.0, 8.5, 1.5)
    assert preset_lambdas("cifar100", 32 / 255, "rs") == (1.0, 5.0, 0.75)
    assert preset_lambdas("svhn", 8 / 255, "n") == (1.0, 4.0, 1.5)
    with pytest.raises(ConfigError, match="published eps"):
        preset_lambdas("cifar10", 10 / 255, "rs")
    o = create_objective("aaer", eps="16/255", variant="rs", preset="cifar10")
    assert (o.noise, o.step, o.clip, o.lambda2, o.lambda3) == (1.0, 1.25, True, 7.0, 3.25)
    o = create_objective("n_aaer", eps="8/255", preset="cifar10", ce_term_grad="true")
    assert (o.noise, o.step, o.clip, o.lambda2, o.lambda3, o.ce_term_grad) == (2.0, 1.0, False, 1.5, 0.15, True)
    with pytest.raises(ConfigError, match="takes no parameter"):
        create_objective("fgsm_rs", eps=0.1, lambda3=1.0)
    with pytest.raises(ConfigError, match="need an epsilon"):
        create_objective("fgsm")
    with pytest.raises(ConfigError, match="L-inf only"):
        create_objective("fgsm", eps=0.1, norm="l2")


def test_epoch_summary_conditional_means():
    # 4 iterations; fit divides every sum by 4. v_gap defined on 2 mixed batches (-2 and -4).
    rec = {"train_aae_frac": 0.1, "train_v_gap": (-2 - 4) / 4, "train_mixed": 2 / 4, "train_gate_open": 0.0,
           "train_v_a": (1 + 2) / 4, "train_has_aae": 2 / 4, "train_v_n": 12 / 4, "train_has_nae": 1.0,
           "train_reg": 0.0}
    s = epoch_summary(rec)
    assert s["v_gap"] == pytest.approx(-3.0) and s["v_a"] == pytest.approx(1.5) and s["v_n"] == pytest.approx(3.0)
    assert s["gate_open_frac"] == 0.0
    assert epoch_summary({"train_aae_frac": 0.0, "train_mixed": 0.0, "train_v_gap": 0.0})["v_gap"] is None


def test_lambda2_has_no_effect_under_reference_semantics_only():
    from bastion.data import load_dataset
    from bastion.models import create_model
    from bastion.train import TrainConfig, fit

    data = load_dataset("synthetic", "train", seed=0, num_examples_total=128, size=8)
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.2, schedule="cyclic")

    def train(**params):
        torch.manual_seed(0)
        m = create_model("conv_linear", 4, 1, 8, width=4)
        res = fit(m, data, create_objective("aaer", eps=0.5, variant="rs", lambda3=5.0, **params), cfg, quiet=True)
        return m.state_dict(), res.history

    (a, ha), (b, _) = train(lambda2=0.0), train(lambda2=50.0)
    assert sum(r["train_mixed"] for r in ha) > 0          # the regularizer had mixed batches to act on
    assert all(torch.equal(a[k], b[k]) for k in a)        # the C_A term is a constant: same update
    (c, _), (d, _) = train(lambda2=0.0, ce_term_grad=True), train(lambda2=50.0, ce_term_grad=True)
    assert all(torch.equal(a[k], c[k]) for k in a)        # lambda2 = 0: the switch changes nothing
    assert not all(torch.equal(c[k], d[k]) for k in c)    # with gradient through C_A, lambda2 matters
