"""Attack layer: registry, losses, native engines, adapters, composite objectives, and a shared
conformance suite run over every registered attack."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import AttackError, create_attack, list_attacks
from attacks.adaptive import DetectorObjective, MixingObjective, SmoothedObjective
from attacks.native import apgd_checkpoints
from attacks.objectives import SHORT_ROW_MIN_BATCH, ce_loss, cross_entropy, dlr_loss, margin_loss
from bastion.errors import ConfigError
from bastion.threat import ThreatModel

torch.set_num_threads(1)





@pytest.fixture(scope="module")
def batch(digits, mlp):
    te = digits[1]
    x, y = te.images[:64], te.labels[:64]
    ok = mlp(x).argmax(1) == y
    return x[ok][:24], y[ok][:24]


# --- registry ---------------------------------------------------------------------------------

def test_registry_lists_and_rejects_unknown():
    names = list_attacks()
    for n in ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "eot-pgd", "eot-apgd", "smoothadv", "autoattack",
              "torchattacks:<Name>"):
        assert n in names
    assert list_attacks("apgd*") == ["apgd-ce", "apgd-dlr", "apgd-t"]
    with pytest.raises(ConfigError, match="unknown attack 'nope'"):
        create_attack("nope", "linf:8/255")
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['stepz'\]"):
        create_attack("pgd", "linf:8/255", stepz=3)
    with pytest.raises(ConfigError, match="unknown attack loss"):
        create_attack("pgd", "linf:8/255", loss="hinge")
    with pytest.raises(ConfigError, match="no targeted mode"):
        create_attack("autoattack", "linf:8/255", targeted=True)
    cfg = create_attack("pgd", "l2:0.5", steps=7).config
    assert cfg.threat == ThreatModel("l2", 0.5) and cfg.steps == 7
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    assert create_attack("pgd", "linf:8/255").describe()["threat"] == "linf:8/255"


# --- losses -----------------------------------------------------------------------------------

def test_margin_loss_masks_correctly_when_all_logits_negative():
    # one-hot multiplication would pick 0 for the masked class and report max_other = 0
    z = torch.tensor([[-1.0, -3.0, -2.0]])
    assert margin_loss(z, torch.tensor([0])).item() == pytest.approx(-2.0 + 1.0)
    assert margin_loss(z, torch.tensor([0]), torch.tensor([2])).item() == pytest.approx(-2.0 + 1.0)


def test_dlr_loss_by_hand():
    z = torch.tensor([[4.0, 1.0, 3.0, 0.0]])
    y = torch.tensor([0])
    assert dlr_loss(z, y).item() == pytest.approx(-(4 - 3) / (4 - 1))
    t = torch.tensor([2])
    assert dlr_loss(z, y, t).item() == pytest.approx(-(4 - 3) / (4 - 0.5 * (1 + 0)))
    with pytest.raises(AttackError, match="at least 3 classes"):
        dlr_loss(torch.zeros(1, 2), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,classes", [(SHORT_ROW_MIN_BATCH, 10), (450, 2), (450, 15), (450, 16), (64, 10)])
def test_cross_entropy_matches_torch_on_both_paths(rows, classes, dtype):
    # the transposed path (few classes, many rows, CPU) and the fallback give F.cross_entropy's values
    g = torch.Generator().manual_seed(rows * classes)
    z = (torch.randn(rows, classes, generator=g) * 8).to(dtype)
    y = torch.randint(0, classes, (rows,), generator=g)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours, ref = cross_entropy(za, y), F.cross_entropy(zb, y, reduction="none")
    tol = dict(rtol=0, atol=4 * torch.finfo(dtype).eps * (1 + float(ref.detach().abs().max())))
    torch.testing.assert_close(ours, ref, **tol)
    (ga,), (gb,) = torch.autograd.grad(ours.sum(), za), torch.autograd.grad(ref.sum(), zb)
    torch.testing.assert_close(ga, gb, rtol=0, atol=4 * torch.finfo(dtype).eps)
    t = (y + 1) % classes
    torch.testing.assert_close(ce_loss(z, y, t), -F.cross_entropy(z, t, reduction="none"), **tol)


def test_apgd_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == [1]


# --- native engines ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-t", "fgsm"])
def test_native_attacks_break_and_claims_hold(name, mlp, batch):
    x, y = batch
    threat = ThreatModel.parse("linf:0.15")
    res = create_attack(name, threat, **({} if name == "fgsm" else {"steps": 10})).run(mlp, x, y)
    threat.check(x, res.x_adv)
    pred = mlp(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)            # the claim is exact on a deterministic model
    assert res.success.float().mean() > 0.3
    assert (res.step[res.success] >= 0).all() and (res.step[~res.success] == -1).all()


def test_early_exit_runs_fewer_model_calls(mlp, batch):
    x, y = batch
    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mlp

        def forward(self, z):
            calls.append(z.shape[0])
            return self.m(z)

    create_attack("pgd", "linf:0.3", steps=20)(Counting(), x, y)
    assert sum(calls) < 0.5 * 22 * len(x)  # full-batch cost would be (steps + 2) * N
    assert min(calls) < len(x)


def test_pgd_restarts_and_l2(mlp, batch):
    x, y = batch
    one = create_attack("pgd", "l2:0.6", steps=5, restarts=1).run(mlp, x, y)
    three = create_attack("pgd", "l2:0.6", steps=5, restarts=3).run(mlp, x, y)
    ThreatModel.parse("l2:0.6").check(x, three.x_adv)
    assert three.success.sum() >= one.success.sum()
    assert three.step.max() <= 3 * 5


def test_native_pgd_no_weaker_than_torchattacks(mlp, digits):
    ta = pytest.importorskip("torchattacks")
    x, y = digits[1].images[:300], digits[1].labels[:300]
    eps, steps = 0.08, 10
    ours = create_attack("pgd", f"linf:{eps}", steps=steps)(mlp, x, y)
    torch.manual_seed(0)
    theirs = ta.PGD(mlp, eps=eps, alpha=2.5 * eps / steps, steps=steps)(x, y)
    acc_ours = (mlp(ours).argmax(1) == y).float().mean().item()
    acc_theirs = (mlp(theirs).argmax(1) == y).float().mean().item()
    assert acc_ours <= acc_theirs + 0.005, (acc_ours, acc_theirs)


# --- conformance over every registered attack ---------------------------------------------------

FAST = {
    "pgd": {"steps": 5}, "pgd-margin": {"steps": 5}, "pgd-dlr": {"steps": 5},
    "apgd-ce": {"steps": 8}, "apgd-dlr": {"steps": 8}, "apgd-t": {"steps": 5, "n_target_classes": 2},
    "eot-pgd": {"steps": 4, "eot_iter": 2}, "eot-apgd": {"steps": 4, "eot_iter": 2},
    "eot-apgd-dlr": {"steps": 4, "eot_iter": 2}, "smoothadv": {"steps": 4, "num_noise": 4, "sigma": 0.1},
    "autoattack": {"version": "custom", "attacks": ("apgd-ce", "square"), "steps": 4, "n_queries": 20},
    "autoattack-rand": {"steps": 3, "eot_iter": 2},
    "autoattack-plus": {"steps": 2, "restarts": 1, "n_target_classes": 2, "n_queries": 10},
    "torchattacks:PGD": {"steps": 3},
    "torchattacks:CW": {"steps": 5},
    "torchattacks:DeepFool": {"steps": 3},
    "torchattacks:OnePixel": {"steps": 2, "popsize": 4},
    "fmn-linf": {"steps": 10}, "fmn-l2": {"steps": 10}, "fmn-l1": {"steps": 10}, "fmn-l0": {"steps": 10},
    "ddn": {"steps": 10}, "cw-l2": {"steps": 10, "binary_steps": 2}, "deepfool": {"steps": 5},
    "fab": {"steps": 5}, "fab-t": {"steps": 5, "n_target_classes": 2}, "square": {"n_queries": 20},
    "autoattack-native": {"steps": 4, "n_queries": 10, "n_target_classes": 2},
}
TA_EXTRA = ("torchattacks:PGD", "torchattacks:CW", "torchattacks:DeepFool", "torchattacks:OnePixel")


def _all_attack_names() -> list[str]:
    names = [n for n in list_attacks() if n != "torchattacks:<Name>"]
    return names + list(TA_EXTRA)


def _threat_for(name: str) -> ThreatModel:
    """Each attack's own threat model family (minimum-norm attacks measure in their norm)."""
    for suffix, t in (("-l0", "l0:6"), ("-l1", "l1:2"), ("-l2", "l2:0.5"), ("ddn", "l2:0.5"),
                      ("DeepFool", "l2:0.5"), ("CW", "l2:0.5"), ("deepfool", "l2:0.5")):
        if name.endswith(suffix):
            return ThreatModel.parse(t)
    return ThreatModel.parse("linf:0.1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", _all_attack_names())
def test_conformance(name, dtype, mlp, batch):
    """Every registered attack (and torchattacks' unbounded CW/DeepFool/OnePixel): inside its
    threat model as reported, seeded, dtype/device/shape kept, model mode and grads restored."""
    if name.startswith("torchattacks:"):
        pytest.importorskip("torchattacks")
    x, y = batch[0][:8].to(dtype), batch[1][:8]
    threat = _threat_for(name)
    atk = create_attack(name, threat, **FAST.get(name, {}))
    model = copy.deepcopy(mlp).to(dtype)
    model.train()                       # the attack must restore it
    model.net[1].eval()                 # ... per module
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    try:
        a = atk(model, x, y)
        b = atk(model, x, y)
        assert torch.equal(a, b), "a fixed seed must reproduce"
        assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
        threat.check(x, a)
        res = atk.run(model, x, y)
        claimed = res.success & (model(res.x_adv).argmax(1) != y)
        if name != "smoothadv":  # smoothadv's claim is about the smoothed classifier
            assert torch.equal(res.success, claimed), "a claimed success must be a misclassification"
        if atk.minimum_norm:
            assert res.norms is not None and res.norms.shape == y.shape
            found = torch.isfinite(res.norms)
            assert bool((res.norms[found] >= 0).all())
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        assert model.training and not model.net[1].training
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), rng), "the global RNG must be untouched"
        other = create_attack(name, threat, **{**FAST.get(name, {}), "seed": 5})
        assert other.config.seed == 5
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_conformance_on_the_accelerator(mlp, batch):
    """On CUDA (when present): inputs on the CPU, model on the GPU; results come back on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = copy.deepcopy(mlp).cuda()
    x, y = batch[0][:8], batch[1][:8]
    for name in [n for n in _all_attack_names() if not n.startswith("torchattacks:")]:
        threat = _threat_for(name)
        a = create_attack(name, threat, **FAST.get(name, {}))(model, x, y)
        assert a.device == x.device and a.dtype == x.dtype, name
        threat.check(x, a)


def _targeted_names() -> list[str]:
    from attacks.base import _REGISTRY

    return [n for n in _all_attack_names() if n in _REGISTRY and _REGISTRY[n].cls.supports_targeted
            and not _REGISTRY[n].cls.minimum_norm] + ["torchattacks:PGD"]


@pytest.mark.parametrize("name", _targeted_names())
def test_targeted_mode_hits_targets(name, mlp, batch):
    if name.startswith("torchattacks:"):
        pytest.importorskip("torchattacks")
    x, y = batch[0][:12], batch[1][:12]
    t = (y + 3) % 10
    params = {**FAST.get(name, {}), "targeted": True}
    if name != "fgsm":
        params["steps"] = max(10, params.get("steps", 10))
    if name == "smoothadv":
        params.update(sigma=0.05, num_noise=4)
    if name.startswith("torchattacks:"):
        params["step_size"] = 0.1  # torchattacks' own default alpha is 2/255
    threat = ThreatModel.parse("linf:0.5")
    atk = create_attack(name, threat, **params)
    x_adv = atk(mlp, x, y, y_target=t)
    threat.check(x, x_adv)
    hit = (mlp(x_adv).argmax(1) == t).float().mean().item()
    assert hit >= (0.5 if name == "fgsm" else 0.9), f"{name} hit only {hit:.0%} of its targets"
    with pytest.raises(AttackError, match="not targeted"):
        create_attack(name, threat, **FAST.get(name, {}))(mlp, x, y, y_target=t)


def test_inputs_outside_unit_box_are_refused(mlp, batch):
    with pytest.raises(AttackError, match=r"\[0, 1\]"):
        create_attack("pgd", "linf:0.1")(mlp, batch[0] * 255, batch[1])


@pytest.mark.parametrize("labels", [[-1, 2], [0.5, 2.0], [float("nan"), 1.0], [True, False]])
def test_labels_that_are_not_class_indices_are_refused(mlp, batch, labels):
    x = batch[0][:2]
    with pytest.raises(AttackError, match="class indices"):
        create_attack("pgd", "linf:0.1", steps=2)(mlp, x, torch.tensor(labels))
    y = torch.tensor([3.0, 1.0])  # whole numbers in a float tensor are accepted
    assert create_attack("pgd", "linf:0.1", steps=2)(mlp, x, y).shape == x.shape


# --- adapters ---------------------------------------------------------------------------------

def test_torchattacks_adapter_params_and_errors(mlp, batch, monkeypatch):
    pytest.importorskip("torchattacks")
    x, y = batch
    atk = create_attack("torchattacks:PGD", "linf:0.1", steps=5, step_size=0.03, random_start=False)
    x_adv = atk(mlp, x, y)
    ThreatModel.parse("linf:0.1").check(x, x_adv)
    x2 = create_attack("torchattacks:PGDL2", "l2:0.5", params={"steps": 3})(mlp, x, y)
    ThreatModel.parse("l2:0.5").check(x, x2)
    with pytest.raises(ConfigError, match="has no attack 'Nope'"):
        create_attack("torchattacks:Nope", "linf:0.1")
    with pytest.raises(ConfigError, match="does not attack the l2"):
        create_attack("torchattacks:PGD", "l2:0.5")
    with pytest.raises(ConfigError, match="takes no argument 'bogus'"):
        create_attack("torchattacks:PGD", "linf:0.1", bogus=1)
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "torchattacks":
            raise ImportError("no torchattacks")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(AttackError, match=r"bastion-robustness\[torchattacks\]"):
        create_attack("torchattacks:PGD", "linf:0.1")


# --- composite objectives -----------------------------------------------------------------------

def test_detector_objective_evades_detector(mlp, batch):
    x, y = batch
    threat = ThreatModel.parse("linf:0.2")

    def detector(z):  # a toy detector: brighter images are more suspicious
        return 20.0 * z.flatten(1).mean(1)

    plain = create_attack("pgd", threat, steps=20)(mlp, x, y)
    thr = float(detector(x).median())
    obj = DetectorObjective(detector, weight=0.5, threshold=thr)
    res = create_attack("pgd", threat, steps=20, restarts=2, objective=obj).run(mlp, x, y)
    threat.check(x, res.x_adv)
    ok = res.success
    assert ok.any()
    assert (detector(res.x_adv)[ok] <= thr).all() and (mlp(res.x_adv).argmax(1)[ok] != y[ok]).all()
    assert detector(res.x_adv).mean() < detector(plain).mean()


def test_mixing_objective_reaches_through_alpha(mlp, batch):
    x, y = batch

    class Mixed(nn.Module):
        """p = (1 - a) p_g + a p_h with a = sigmoid(gamma(x)); g = h = the MLP here."""

        def __init__(self):
            super().__init__()
            self.base = mlp
            self.gate = nn.Linear(64, 1)
            nn.init.constant_(self.gate.weight, 0.5)
            nn.init.constant_(self.gate.bias, 0.0)

        def forward_with_mixing(self, z):
            gamma = self.gate(z.flatten(1)).squeeze(1)
            lp = F.log_softmax(self.base(z), 1)
            return lp, gamma

        def forward(self, z):
            return self.forward_with_mixing(z)[0]

    m = Mixed().eval()
    threat = ThreatModel.parse("linf:0.1")
    obj = MixingObjective(weight=1.0)
    x_adv = create_attack("pgd", threat, steps=10, objective=obj)(m, x, y)
    threat.check(x, x_adv)
    with torch.no_grad():
        assert m.forward_with_mixing(x_adv)[1].mean() < m.forward_with_mixing(x)[1].mean()
    with pytest.raises(AttackError, match="forward_with_mixing"):
        create_attack("pgd", threat, steps=1, objective=obj)(mlp, x, y)


def test_smoothadv_lowers_smoothed_accuracy(mlp, batch):
    x, y = batch
    threat = ThreatModel.parse("l2:1.0")
    res = create_attack("smoothadv", threat, sigma=0.1, num_noise=8, steps=8).run(mlp, x, y)
    threat.check(x, res.x_adv)
    obj = SmoothedObjective(0.1, num_noise=64)
    torch.manual_seed(1)
    with torch.no_grad():
        clean = (obj(mlp, x, y, None).logits.argmax(1) == y).float().mean()
        adv = (obj(mlp, res.x_adv, y, None).logits.argmax(1) == y).float().mean()
    assert adv < clean - 0.2
    with torch.no_grad():
        assert math.isfinite(float(obj(mlp, x, y, None).loss.sum()))
