"""Native FAB / FAB-T: exact projections, minimal norms within the threat model as reported, and
the same robust accuracy and minimal norms as pyautoattack's FAB on the same model."""

from __future__ import annotations

import pytest
import torch

from attacks import create_attack, list_attacks
from attacks.fab import FABTargeted, project_on_hyperplane_in_box
from bastion.errors import ConfigError
from bastion.threat import ThreatModel, lp_norm

torch.set_num_threads(1)


def test_registered_and_configured():
    assert {"fab", "fab-t"} <= set(list_attacks())
    atk = create_attack("fab-t", "l2:0.5")
    assert atk.minimum_norm and not atk.bounded
    cfg = atk.config
    assert (cfg.steps, cfg.restarts, cfg.alpha_max, cfg.eta, cfg.beta, cfg.n_target_classes) == (100, 1, 0.1, 1.05,
                                                                                                   0.9, 9)
    with pytest.raises(ConfigError, match="linf or l2"):
        create_attack("fab", "l1:2")
    with pytest.raises(ConfigError, match="beta"):
        create_attack("fab", "linf:0.1", beta=1.5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_minimal_and_in_the_box(norm):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(256, 40, generator=g, dtype=torch.float64)
    t[t < 0.3] = 0.0                                      # saturated pixels, as in digits
    w = torch.randn(256, 40, generator=g, dtype=torch.float64)
    w[torch.rand(256, 40, generator=g) < 0.1] = 0
    c = torch.randn(256, generator=g, dtype=torch.float64) * torch.where(torch.arange(256) % 2 == 0, 0.5, 20.0)
    d = project_on_hyperplane_in_box(t, w, c, norm)
    assert float((t + d).min()) >= 0 and float((t + d).max()) <= 1
    reached = ((w * d).sum(1) - c).abs() < 1e-9
    assert reached[::2].float().mean() > 0.9              # small offsets: mostly reachable
    corner = torch.where(w * torch.sign(c).unsqueeze(1) > 0, 1 - t, t) * torch.sign(w * torch.sign(c).unsqueeze(1))
    assert torch.allclose(d[~reached], corner[~reached])  # out of reach: the closest box corner
    aa = pytest.importorskip("pyautoattack.fab_projections")
    ref_fn = aa.projection_linf if norm == "linf" else aa.projection_l2
    b = (w * t).sum(1) + c
    ref = ref_fn(t.float().clone(), w.float().clone(), b.float().clone()).double()
    both = reached & (((w * ref).sum(1) - c).abs() < 1e-3)
    assert int(both.sum()) > 100
    assert torch.allclose(lp_norm(d[both], norm), lp_norm(ref[both], norm), atol=1e-4)


@pytest.mark.parametrize("threat", ["linf:0.1", "l2:0.5"])
def test_fab_t_matches_pyautoattack_and_norms_are_bounded(threat, mlp, batch):
    pytest.importorskip("pyautoattack")
    x, y = batch
    t = ThreatModel.parse(threat)
    kw = dict(steps=30, n_target_classes=3, progress=False)
    res = create_attack("fab-t", t, **kw).run(mlp, x, y)
    t.check(x, res.x_adv)
    assert bool(torch.isfinite(res.norms).all())
    assert torch.equal(res.success, res.norms <= t.eps + 1e-6), "broken exactly where the minimal norm is within eps"
    assert bool((mlp(res.x_adv[res.success]).argmax(1) != y[res.success]).all())
    assert bool((lp_norm(res.x_adv[res.success] - x[res.success], t.norm) <= res.norms[res.success] + 1e-6).all())
    ref = create_attack("autoattack", t, version="custom", attacks=("fab-t",), restarts=1, **kw).run(mlp, x, y)
    acc = (mlp(res.x_adv).argmax(1) == y).float().mean().item()
    acc_ref = (mlp(ref.x_adv).argmax(1) == y).float().mean().item()
    assert 0 < acc < 1 and abs(acc - acc_ref) <= 0.04, (acc, acc_ref)
    fast = create_attack("fab-t", t, stop_within_eps=True, **kw).run(mlp, x, y)
    assert torch.equal(fast.success, res.success), "stopping within eps must not change what breaks"


@pytest.mark.parametrize("norm,big", [("linf", 1.0), ("l2", 8.0)])
def test_minimal_norms_no_larger_than_pyautoattack_fab(norm, big, mlp, batch):
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    x, y = batch
    ours = create_attack("fab", f"{norm}:{big}", steps=30, progress=False).run(mlp, x, y).norms
    ref = fab_pt.FABAttack_PT(mlp, norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, n_iter=30, eps=big,
                              seed=0, device=x.device)
    xa = ref.perturb(x, y)
    theirs = torch.where(mlp(xa).argmax(1) != y, lp_norm(xa - x, norm), torch.full_like(ours, float("inf")))
    assert torch.isfinite(ours).sum() >= torch.isfinite(theirs).sum()
    both = torch.isfinite(ours) & torch.isfinite(theirs)
    assert float(ours[both].median()) <= float(theirs[both].median()) * 1.02


def test_targets_restarts_and_float64(mlp, batch):
    x, y = batch[0][:12].double(), batch[1][:12]
    model = mlp.double()
    try:
        t = ThreatModel.parse("linf:0.5")
        goal = (y + 3) % 10
        res = create_attack("fab", t, targeted=True, steps=30, progress=False).run(model, x, y, y_target=goal)
        assert res.x_adv.dtype == torch.float64
        assert (model(res.x_adv).argmax(1) == goal).float().mean() >= 0.9
        t2 = ThreatModel.parse("l2:0.3")
        one = create_attack("fab", t2, steps=10, restarts=1, progress=False).run(model, x, y)
        three = create_attack("fab", t2, steps=10, restarts=3, progress=False).run(model, x, y)
        t2.check(x, three.x_adv)
        assert int(three.success.sum()) >= int(one.success.sum())
        assert bool((three.norms[one.success] <= one.norms[one.success] + 1e-12).all()), "restarts keep the best"
    finally:
        mlp.float()


def test_autoattack_native_runs_fab_t_natively(mlp, batch):
    atk = create_attack("autoattack-native", "linf:0.1", steps=10, n_target_classes=3, n_queries=50)
    part = atk._part("fab-t")
    assert isinstance(part, FABTargeted) and part.config.stop_within_eps
    x, y = batch
    res = create_attack("autoattack-native", "linf:0.1", steps=10, n_target_classes=3, n_queries=50,
                        parts=("fab-t",)).run(mlp, x, y)
    assert set(filter(None, res.broken_by)) == {"fab-t"}


def test_robustness_curve_from_one_fab_run(mlp, digits, tmp_path):
    import json

    from attacks import AttackProbe
    from bastion.evaluate import CleanProbe, evaluate_model

    data = digits[1].subset(slice(0, 40))
    probe = AttackProbe("linf:0.1", ["fab-t"], attack_params={"fab-t": {"steps": 20, "n_target_classes": 3}})
    evaluate_model(mlp, data, [CleanProbe(), probe], tmp_path / "run", {"t": 1}, batch_size=20, quiet=True)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rob = next(s for s in doc["sections"] if s["type"] == "robustness")["data"]
    curve = rob["min_norm"]["linf:0.1"]["curve"]
    assert curve["0"] == pytest.approx(rob["clean"]["accuracy"])
    assert curve["0.1"] == pytest.approx(rob["robust"]["linf:0.1"]["accuracy"])
    vals = [curve[k] for k in sorted(curve, key=float)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0]


def _general_projection(t, w, c, norm):
    """The projection written once for both norms (speed 1 for linf), as before its linf shortcuts."""
    w = w * torch.sign(c).unsqueeze(1)
    c = c.abs()
    direction, aw = torch.sign(w), w.abs()
    room = torch.where(w > 0, 1 - t, t).clamp_min(0)
    speed = torch.ones_like(aw) if norm == "linf" else aw
    kink = torch.where(speed > 0, room / speed.clamp_min(1e-12), torch.full_like(room, float("inf")))
    kink, order = kink.sort(dim=1)
    aw_s, room_s, speed_s = aw.gather(1, order), room.gather(1, order), speed.gather(1, order)
    full = aw_s * room_s
    before = full.cumsum(1) - full
    rate = (aw_s * speed_s).flip(1).cumsum(1).flip(1)
    reach = before + torch.where(rate > 0, torch.nan_to_num(kink, posinf=0.0) * rate, torch.zeros_like(rate))
    k = (reach < c.unsqueeze(1)).sum(1)
    kk = k.clamp_max(t.shape[1] - 1).unsqueeze(1)
    s = ((c - before.gather(1, kk)[:, 0]) / rate.gather(1, kk)[:, 0].clamp_min(1e-12)).clamp_min(0)
    move = torch.where((k < t.shape[1]).unsqueeze(1), torch.minimum(s.unsqueeze(1) * speed, room), room)
    return direction * move


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_shortcuts_are_exact(norm, dtype):
    """The linf shortcuts (kink = room, no products with a speed of 1) give the general formula's bits,
    ties and saturated pixels included."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randint(0, 17, (300, 64), generator=g) / 16).to(dtype)  # digits' 17 grey levels: many ties
    w = torch.randn(300, 64, generator=g).to(dtype)
    w[torch.rand(300, 64, generator=g) < 0.1] = 0
    c = torch.randn(300, generator=g).to(dtype) * 3
    assert torch.equal(project_on_hyperplane_in_box(t, w, c, norm), _general_projection(t, w, c, norm))
