"""Native PGD's fast path gives the same tensors, bit for bit, as the plain per-step computation.

`attacks.native.pgd_engine` keeps its best point lazily (iterates in a reused buffer, folded by
`_first_max`), compacts that buffer when examples break, checks success with one comparison,
fuses the linf step and skips index gathers while nothing has broken. Each test runs the engine
against `_reference_pgd` below, the straightforward loop (a ``torch.where`` per step, masks on
every break), and demands equal x_adv, success, step and best loss, over threat models, restarts,
NaN and tied losses, tiny buffers, per-example radii, momentum, EOT and float64. The `Attack.run`
hygiene (mode and flag restore, range check) is checked against its contract."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attacks.native as native
from attacks import create_attack
from attacks.base import AttackError, attack_mode
from attacks.native import (
    _ball_project,
    _ball_start,
    _bshape,
    _direction,
    _first_max,
    _Outcome,
    _per_example,
    _sub,
    evaluate_objective,
    pgd_engine,
)
from attacks.objectives import LossObjective, ObjectiveOutput
from bastion.threat import ThreatModel


class _RefOutcome:
    """The engine's bookkeeping as first written: masks, no fast paths."""

    def __init__(self, x, loss0, success0):
        self.x_adv, self.best, self.success = x.clone(), loss0.clone(), success0.clone()
        self.step = torch.full((x.shape[0],), -1, dtype=torch.long)
        self.step[success0] = 0

    def hit(self, idx, mask, x_cur, step):
        pos = idx[mask]
        self.x_adv[pos] = x_cur[mask]
        self.success[pos] = True
        self.step[pos] = step

    def keep_best(self, idx, loss, x_best):
        if idx.numel() == 0:
            return
        better = loss > self.best[idx]
        self.best[idx] = torch.where(better, loss, self.best[idx])
        self.x_adv[idx] = torch.where(better.view(_bshape(x_best)), x_best, self.x_adv[idx])

    def remaining(self):
        return (~self.success).nonzero().flatten()


def _reference_pgd(model, x, y, objective, threat, steps, step_size, restarts, random_start, eot, generator, out,
                   loss_target=None, goal_target=None, margin=0.0, eps=None, momentum=None):
    for r in range(restarts):
        idx = out.remaining()
        if idx.numel() == 0:
            break
        x0, yy = x[idx], y[idx]
        lt, gt = _sub(loss_target, idx), _sub(goal_target, idx)
        ee, st = _per_example(eps, idx), _per_example(step_size, idx)
        if ee is not None:
            xc = _ball_start(threat, x0, ee, generator) if random_start else x0.clone()
        else:
            xc = threat.random_start(x0, generator) if random_start else x0.clone()
        best, xb = out.best[idx], out.x_adv[idx]
        buf = torch.zeros_like(x0) if momentum is not None else None
        shape = _bshape(x0)
        stp = st.view(shape) if torch.is_tensor(st) else st
        for k in range(steps + 1):
            need = k < steps
            loss, succ, g = evaluate_objective(objective, model, xc, yy, lt, gt, eot, need, margin)
            better = loss > best
            best = torch.where(better, loss, best)
            xb = torch.where(better.view(shape), xc, xb)
            if succ.any():
                out.hit(idx, succ, xc, r * steps + k)
                keep = ~succ
                idx, xc, x0, yy, best, xb = idx[keep], xc[keep], x0[keep], yy[keep], best[keep], xb[keep]
                lt, gt, ee, buf = _sub(lt, keep), _sub(gt, keep), _sub(ee, keep), _sub(buf, keep)
                if torch.is_tensor(st):
                    st = st[keep]
                    stp = st.view(shape)
                if g is not None:
                    g = g[keep]
                if idx.numel() == 0:
                    break
            if not need:
                break
            with torch.no_grad():
                if buf is not None:
                    scale = g.abs().flatten(1).mean(1) if threat.norm == "linf" else g.flatten(1).norm(dim=1)
                    buf = momentum * buf + g / scale.clamp_min(1e-12).view(shape)
                    g = buf
                xn = xc + stp * _direction(threat, g, xc)
                xc = threat.project(x0, xn) if ee is None else _ball_project(threat, x0, xn, ee)
        out.keep_best(idx, best, xb)
    return out


class _NaNLoss:
    """CE with NaN at some points (a function of x), so NaN losses reach the best-point fold."""

    def __call__(self, model, x, y, target):
        out = LossObjective("ce")(model, x, y, target)
        bad = (x.flatten(1).sum(1) * 1000).floor().remainder(5) == 0
        return ObjectiveOutput(torch.where(bad, torch.full_like(out.loss, float("nan")), out.loss), out.logits)


class _TiedLoss:
    """CE rounded to halves and shifted, so equal losses (and -0.0 against 0.0) occur across steps."""

    def __call__(self, model, x, y, target):
        out = LossObjective("ce")(model, x, y, target)
        return ObjectiveOutput(torch.round((out.loss - 1.0) * 2) / 2, out.logits)


class _Noisy(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x + 0.05 * torch.randn_like(x))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype).eval()


def _data(dtype=torch.float32, n=48):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 4, 4, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _both(model, x, y, objective, threat, steps, step_size, *, restarts=1, random_start=True, eot=1,
          loss_target=None, goal_target=None, margin=0.0, eps=None, momentum=None):
    """(fast, reference) outcomes of the same run from the same clean check and generator seed."""
    outs = []
    for engine, outcome in ((pgd_engine, _Outcome), (_reference_pgd, _RefOutcome)):
        torch.manual_seed(5)  # a randomized model draws from the global RNG
        loss0, succ0, _ = evaluate_objective(objective, model, x, y, loss_target, goal_target, eot, False, margin)
        out = outcome(x, loss0, succ0)
        engine(model, x, y, objective, threat, steps, step_size, restarts, random_start, eot,
               torch.Generator().manual_seed(7), out, loss_target, goal_target, margin=margin, eps=eps,
               momentum=momentum)
        outs.append(out)
    return outs


def _assert_same(fast, ref):
    for name in ("x_adv", "success", "step", "best"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
                           b.view(-1).view(torch.uint8) if b.is_floating_point() else b), name  # bits, NaN too


@pytest.mark.parametrize("threat, steps", [("linf:0.1", 8), ("linf:0.02", 8), ("l2:0.6", 6), ("l1:3", 5)])
@pytest.mark.parametrize("restarts", [1, 3])
def test_engine_matches_reference(threat, steps, restarts):
    model, (x, y) = _model(), _data()
    t = ThreatModel.parse(threat)
    fast, ref = _both(model, x, y, LossObjective("ce"), t, steps, 2.5 * t.eps / steps, restarts=restarts)
    _assert_same(fast, ref)


@pytest.mark.parametrize("segment", [1, 3 * 48 * 16 * 4, 10 ** 9])  # buffer: 2 entries, 3 entries, all steps
@pytest.mark.parametrize("objective", [LossObjective("ce"), _NaNLoss(), _TiedLoss(), LossObjective("dlr")])
def test_buffer_sizes_nan_and_ties(monkeypatch, segment, objective):
    monkeypatch.setattr(native, "SEGMENT_BYTES", segment)
    model, (x, y) = _model(), _data()
    t = ThreatModel.parse("linf:0.08")
    fast, ref = _both(model, x, y, objective, t, 9, 0.02, restarts=2)
    _assert_same(fast, ref)
    assert bool(fast.success.any()) and not bool(fast.success.all())  # breaks happened mid-run


def test_float64_no_random_start_targeted_margin():
    model, (x, y) = _model(torch.float64), _data(torch.float64)
    target = (y + 2) % 5
    t = ThreatModel.parse("linf:0.1")
    for kw in ({"random_start": False}, {"loss_target": target, "goal_target": target}, {"margin": 0.5}):
        objective = LossObjective("margin") if "margin" in kw else LossObjective("ce")
        fast, ref = _both(model, x, y, objective, t, 7, 0.03, **kw)
        _assert_same(fast, ref)


def test_per_example_radii_step_sizes_and_momentum():
    model, (x, y) = _model(), _data()
    g = torch.Generator().manual_seed(3)
    eps = 0.02 + 0.1 * torch.rand(x.shape[0], generator=g)
    for norm, momentum in (("linf", 0.75), ("l2", 0.9), ("linf", None)):
        scale = 10 if norm == "l2" else 1
        t = ThreatModel(norm, float(eps.max()) * scale)
        fast, ref = _both(model, x, y, LossObjective("ce"), t, 6, 2.5 * eps * scale / 6, eps=eps * scale,
                          momentum=momentum)
        _assert_same(fast, ref)


def test_eot_on_a_randomized_model():
    model, (x, y) = _Noisy(_model()), _data()
    t = ThreatModel.parse("linf:0.06")
    for eot in (1, 3):
        fast, ref = _both(model, x, y, LossObjective("ce"), t, 5, 0.02, eot=eot)
        _assert_same(fast, ref)


def test_first_max_is_the_sequential_where():
    g = torch.Generator().manual_seed(0)
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 1.0, -1.0])
    m = vals[torch.randint(0, len(vals), (400, 6), generator=g)]
    best, j = _first_max(m)
    seq_best, seq_j = m[:, 0].clone(), torch.zeros(400, dtype=torch.long)
    for k in range(1, 6):
        better = m[:, k] > seq_best
        seq_best = torch.where(better, m[:, k], seq_best)
        seq_j = torch.where(better, k, seq_j)
    assert torch.equal(j, seq_j)
    assert torch.equal(best.view(torch.int32), seq_best.view(torch.int32))


def test_results_do_not_alias_the_reused_buffer():
    model, (x, y) = _model(), _data()
    atk = create_attack("pgd", "linf:0.05", steps=6)
    first = atk.run(model, x, y)
    kept = first.x_adv.clone()
    atk.run(model, x.flip(0), y.flip(0))
    assert torch.equal(first.x_adv, kept)


class _Switchy(nn.Module):
    """Overrides ``train`` (so ``eval()`` must still be called) and counts the calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lin = nn.Linear(16, 5)
        self.bn = nn.BatchNorm1d(16)

    def train(self, mode=True):
        self.calls += 1
        return super().train(mode)

    def forward(self, x):
        return self.lin(self.bn(x.flatten(1)))


def test_attack_mode_restores_exactly():
    model = _Switchy()
    model.train()
    model.lin.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    calls = model.calls
    with attack_mode(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        model.bn.train()  # a model may switch its own modes inside; they are restored too
    assert model.calls == calls + 1
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    plain = _model()  # nothing to change: every mode and flag as it was
    with attack_mode(plain):
        pass
    assert not plain.training and all(p.requires_grad for p in plain.parameters())


def test_range_check():
    model, (x, y) = _model(), _data()
    atk = create_attack("pgd", "linf:0.05", steps=2)
    for bad in (x - 0.5, x + 0.5):
        with pytest.raises(AttackError):
            atk(model, bad, y)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    atk(model, nan, y)  # NaN passes, as with the min/max check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atk(model, x.clone().requires_grad_(True), y)  # no warning for inputs that require grad


def test_clean_misclassified_examples_are_excluded_as_before():
    model, (x, y) = _model(), _data()
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert bool(wrong.any())
    res = create_attack("pgd", "linf:0.02", steps=4).run(model, x, y)
    assert torch.equal(res.step[wrong], torch.zeros(int(wrong.sum()), dtype=torch.long))
    assert torch.equal(res.x_adv[wrong], x[wrong])


def test_forked_rng_on_cpu_is_fork_rng():
    from bastion.rng import forked_rng

    torch.manual_seed(3)
    before = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with forked_rng(torch.device("cpu"), g1):
        inside = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        assert torch.equal(torch.rand(5), inside)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # one draw taken from each


def test_inputs_that_require_grad():
    model, (x, y) = _model(), _data()
    x = x.clone().requires_grad_(True)  # training code may pass its batch straight in
    t = ThreatModel.parse("linf:0.08")
    fast, ref = _both(model, x, y, LossObjective("ce"), t, 6, 0.02)
    for name in ("x_adv", "success", "step", "best"):
        assert torch.equal(getattr(fast, name).detach(), getattr(ref, name).detach()), name
