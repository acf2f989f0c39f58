"""Options a torchattacks/AutoAttack user expects: bounded third-party attacks (never an abort),
explicit-only third-party defaults, batch_size, margin (bf16 re-prediction), float64 AutoAttack,
warnings captured whatever the logger level."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import AttackProbe, create_attack
from bastion.evaluate import CleanProbe, evaluate_model
from bastion.threat import ThreatModel

torch.set_num_threads(1)



def test_unbounded_third_party_attacks_count_only_inside_eps(mlp, digits, tmp_path):
    pytest.importorskip("torchattacks")
    data = digits[1].subset(slice(0, 32))
    threat = ThreatModel.parse("l2:0.5")
    probe = AttackProbe(threat, ["torchattacks:CW", "torchattacks:DeepFool"],
                        attack_params={"torchattacks:CW": {"steps": 20}, "torchattacks:DeepFool": {"steps": 10}})
    doc = evaluate_model(mlp, data, [CleanProbe(), probe], tmp_path / "run", {"t": 1}, batch_size=16, quiet=True)
    block = doc["robust"]["l2:0.5"]
    assert 0 < block["accuracy"] < 1
    recs = [r for r in map(__import__("json").loads, (tmp_path / "run" / "records.jsonl").read_text().splitlines())
            if r["kind"] == "robust"]
    assert any(r["min_norm"] is not None and r["min_norm"] > 0.5 for r in recs)  # found, but outside eps
    for r in recs:  # an example counts as broken only when its minimal norm is within eps
        if r["broken_by"]:
            assert r["min_norm"] is not None and r["min_norm"] <= 0.5 + 1e-6
    assert any("lay outside l2:0.5" in f for f in doc["flags"])


def test_project_clips_instead(mlp, digits):
    pytest.importorskip("torchattacks")
    x, y = digits[1].images[:16], digits[1].labels[:16]
    threat = ThreatModel.parse("l2:0.3")
    res = create_attack("torchattacks:DeepFool", threat, steps=10, project=True).run(mlp, x, y)
    threat.check(x, res.x_adv)
    assert any("project=True clipped" in n for n in res.notes)
    assert torch.equal(res.success, mlp(res.x_adv).argmax(1) != y)


def test_torchattacks_defaults_are_kept_and_reported():
    pytest.importorskip("torchattacks")
    atk = create_attack("torchattacks:EOTPGD", "linf:0.1")
    assert "eot_iter" not in atk._kwargs and atk.defaults_used["eot_iter"] == 2
    assert atk.describe()["torchattacks_defaults"]["alpha"] == pytest.approx(2 / 255)
    atk = create_attack("torchattacks:EOTPGD", "linf:0.1", eot_iter=5, step_size=0.01, steps=7)
    assert atk._kwargs["eot_iter"] == 5 and atk._kwargs["alpha"] == 0.01 and atk._kwargs["steps"] == 7
    with pytest.raises(Exception, match="n_restarts"):
        create_attack("torchattacks:PGD", "linf:0.1", restarts=3)


def test_batch_size_and_progress_options(mlp, digits):
    x, y = digits[1].images[:24], digits[1].labels[:24]
    whole = create_attack("pgd", "linf:0.1", steps=5).run(mlp, x, y)
    parts = create_attack("pgd", "linf:0.1", steps=5, batch_size=7, progress=False).run(mlp, x, y)
    ThreatModel.parse("linf:0.1").check(x, parts.x_adv)
    assert parts.x_adv.shape == x.shape
    assert abs(int(parts.success.sum()) - int(whole.success.sum())) <= 2
    with pytest.raises(Exception, match="batch_size"):
        create_attack("pgd", "linf:0.1", batch_size=0)


def test_margin_keeps_adversarial_examples_adversarial_in_bf16(mlp, digits):
    x, y = digits[1].images[:64], digits[1].labels[:64]
    ok = mlp(x).argmax(1) == y
    x, y = x[ok], y[ok]
    threat = "linf:0.15"
    plain = create_attack("pgd", threat, steps=20).run(mlp, x, y)
    kept = create_attack("pgd", threat, steps=40, margin=2.0).run(mlp, x, y)

    def logit_margin(z):
        other = z.masked_fill(F.one_hot(y, 10).bool(), float("-inf")).amax(1)
        return other - z.gather(1, y.view(-1, 1))[:, 0]

    with torch.no_grad():
        m_plain = logit_margin(mlp(plain.x_adv))[plain.success]
        m_kept = logit_margin(mlp(kept.x_adv))[kept.success]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = mlp(kept.x_adv.bfloat16().float()).float().argmax(1)
    assert kept.success.sum() >= plain.success.sum() - 1
    assert float(m_kept.median()) >= 2.0 > float(m_plain.median())
    assert bool((bf[kept.success] != y[kept.success]).all()), "a margin-kept example flipped back in bf16"


def test_autoattack_float64_and_warnings_whatever_the_logger_level(mlp, digits):
    x, y = digits[1].images[:12].double(), digits[1].labels[:12]
    model = copy.deepcopy(mlp).double()

    class Soft(nn.Module):  # softmax output: pyautoattack warns
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, z):
            return F.softmax(self.m(z), 1)

    logger = logging.getLogger("auto-attack")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        atk = create_attack("autoattack", "linf:0.1", version="custom", attacks=("apgd-ce", "fab-t"), steps=4,
                            n_target_classes=2, restarts=1)
        res = atk.run(Soft(), x, y)
    finally:
        logger.setLevel(old)
    assert logger.level == old
    assert res.x_adv.dtype == torch.float64
    ThreatModel.parse("linf:0.1").check(x, res.x_adv)
    assert any("softmax" in n.lower() or "probab" in n.lower() for n in res.notes), res.notes
    assert atk.config.restarts == 1
    alias = create_attack("autoattack", "linf:0.1", n_restarts=2)
    assert alias.config.restarts == 2


def test_autoattack_native_follows_the_protocol(mlp, digits):
    x, y = digits[1].images[:60], digits[1].labels[:60]
    threat = ThreatModel.parse("linf:0.1")
    kw = dict(steps=10, n_target_classes=3, n_queries=100)
    res = create_attack("autoattack-native", threat, **kw).run(mlp, x, y)
    threat.check(x, res.x_adv)
    ref = create_attack("autoattack", threat, version="custom", attacks=("apgd-ce", "apgd-t", "fab-t", "square"),
                        restarts=1, **kw).run(mlp, x, y)
    acc = (mlp(res.x_adv).argmax(1) == y).float().mean().item()
    acc_ref = (mlp(ref.x_adv).argmax(1) == y).float().mean().item()
    assert abs(acc - acc_ref) <= 0.05, (acc, acc_ref)
    assert set(filter(None, res.broken_by)) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert res.broken_by.count("apgd-ce") > 0
    with pytest.raises(Exception, match="parts"):
        create_attack("autoattack-native", threat, parts=("pgd",))


def test_l1_end_to_end(mlp, digits, tmp_path):
    """L1 threat model: native APGD-L1 and FMN-L1 inside the ball, as strong as pyautoattack's APGD-L1
    within a few points, and through the evaluator."""
    x, y = digits[1].images[:100], digits[1].labels[:100]
    t = ThreatModel.parse("l1:2")
    ours = create_attack("apgd-ce", t, steps=50).run(mlp, x, y)
    t.check(x, ours.x_adv)
    ref = create_attack("autoattack", t, version="custom", attacks=("apgd-ce",), steps=50, restarts=1).run(mlp, x, y)
    t.check(x, ref.x_adv)
    acc = (mlp(ours.x_adv).argmax(1) == y).float().mean().item()
    acc_ref = (mlp(ref.x_adv).argmax(1) == y).float().mean().item()
    assert acc <= acc_ref + 0.05, (acc, acc_ref)
    doc = evaluate_model(mlp, digits[1].subset(slice(0, 30)), [CleanProbe(), AttackProbe(t, ["apgd-ce", "fmn-l1"])],
                         tmp_path / "run", {"t": 1}, batch_size=15, quiet=True)
    assert doc["robust"]["l1:2"]["accuracy"] < doc["clean"]["accuracy"]
