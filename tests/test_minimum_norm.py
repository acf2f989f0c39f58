"""Minimum-norm attacks: per-example minimal norms, inside the threat model as reported, no worse
than the references on the same model, and a robust-accuracy-vs-eps curve from one run."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import AttackProbe, create_attack
from bastion.errors import ConfigError
from bastion.evaluate import CleanProbe, evaluate_model
from bastion.threat import ThreatModel

torch.set_num_threads(1)


@pytest.mark.parametrize("name,threat", [("fmn-linf", "linf:0.1"), ("fmn-l2", "l2:0.5"), ("fmn-l1", "l1:2"),
                                         ("fmn-l0", "l0:4"), ("ddn", "l2:0.5"), ("cw-l2", "l2:0.5"),
                                         ("deepfool", "l2:0.5"), ("deepfool", "linf:0.1")])
def test_minimal_norms_are_found_and_bounded(name, threat, mlp, batch):
    x, y = batch
    t = ThreatModel.parse(threat)
    params = {"binary_steps": 5} if name == "cw-l2" else {}
    res = create_attack(name, t, **params).run(mlp, x, y)
    t.check(x, res.x_adv)
    found = torch.isfinite(res.norms)
    assert found.float().mean() >= 0.9, f"{name} found adversarial examples for only {found.float().mean():.0%}"
    inside = found & (res.norms <= t.eps + 1e-6)
    assert torch.equal(res.success, inside), "broken exactly where the minimal norm is within eps"
    assert bool((mlp(res.x_adv[res.success]).argmax(1) != y[res.success]).all())


def test_minimum_norm_no_worse_than_torchattacks(mlp, batch):
    pytest.importorskip("torchattacks")
    x, y = batch
    t = ThreatModel.parse("l2:10")
    for ours, theirs in (("ddn", "torchattacks:DeepFool"), ("fmn-l2", "torchattacks:DeepFool"),
                         ("cw-l2", "torchattacks:CW")):
        a = create_attack(ours, t).run(mlp, x, y).norms
        b = create_attack(theirs, t, steps=100).run(mlp, x, y).norms
        both = torch.isfinite(a) & torch.isfinite(b)
        assert torch.isfinite(a).sum() >= torch.isfinite(b).sum()
        assert float(a[both].median()) <= float(b[both].median()) * 1.02, (ours, theirs)


def test_fmn_norm_must_match_the_threat_model():
    with pytest.raises(ConfigError, match="use fmn-l2"):
        create_attack("fmn-linf", "l2:0.5")
    with pytest.raises(ConfigError, match="measures l2"):
        create_attack("ddn", "linf:0.1")


def test_curve_from_one_run_matches_fixed_eps_runs(mlp, digits, tmp_path):
    data = digits[1].subset(slice(0, 40))
    probe = AttackProbe("l2:0.5", ["ddn"])
    evaluate_model(mlp, data, [CleanProbe(), probe], tmp_path / "run", {"t": 1}, batch_size=20, quiet=True)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rob = next(s for s in doc["sections"] if s["type"] == "robustness")["data"]
    curve = rob["min_norm"]["l2:0.5"]["curve"]
    assert curve["0"] == pytest.approx(rob["clean"]["accuracy"])
    assert curve["0.5"] == pytest.approx(rob["robust"]["l2:0.5"]["accuracy"])
    vals = [curve[k] for k in sorted(curve, key=float)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0]
    assert any(s["type"] == "robustness_curves" for s in doc["sections"])
    curves = next(s for s in doc["sections"] if s["type"] == "robustness_curves")
    assert "minimum-norm" in curves["title"] and curves["data"]["norm"] == "l2"
