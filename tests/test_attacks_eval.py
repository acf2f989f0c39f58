"""Attack evaluation: AutoAttack's protocol in the evaluator, loud threat-model violations,
sanity flags, EOT on a randomized model, AutoAttack adapter == pyautoattack, the CLI sweep and
byte-identical resume."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import Attack, AttackConfig, AttackProbe, AttackResult, create_attack, sanity_flags
from bastion.errors import ThreatModelViolation
from bastion.evaluate import CleanProbe, evaluate_model
from bastion.metrics import classification_metrics
from bastion.threat import ThreatModel

torch.set_num_threads(1)



class Noisy(nn.Module):
    """A randomized toy model: its output moves a little per forward pass, its input gradient a
    lot (a random high-frequency term), so single-draw gradients mislead and EOT helps."""

    def __init__(self, base: nn.Module, c: float = 0.5, w: float = 50.0):
        super().__init__()
        self.base, self.c, self.w = base, c, w

    def forward(self, x):
        z = self.base(x)
        f = x.flatten(1)
        r = torch.randn(f.shape[1], z.shape[1], device=x.device, dtype=x.dtype)
        return z + self.c * torch.sin(self.w * f) @ r / math.sqrt(f.shape[1])


def _run(probe, model, x, y, seed=0):
    return probe.run(model, x, y, torch.arange(len(y)), torch.Generator().manual_seed(seed))


def test_probe_records_follow_the_protocol(mlp, digits):
    x, y = digits[1].images[:80], digits[1].labels[:80]
    probe = AttackProbe("linf:0.1", ["fgsm", "pgd", "apgd-ce"], attack_params={"apgd-ce": {"steps": 10}})
    recs = _run(probe, mlp, x, y)
    assert probe.name == "fgsm+pgd+apgd-ce@linf:0.1" and len(recs) == 80
    for r in recs:
        assert {"index", "probe", "kind", "threat", "attack", "broken_by", "step", "label", "pred", "correct",
                "flags"} <= set(r)
        assert r["kind"] == "robust" and r["threat"] == "linf:0.1"
        assert r["correct"] == (r["pred"] == r["label"])
        if r["broken_by"] is not None:
            assert not r["correct"] and r["step"] is not None
    by = {r["broken_by"] for r in recs}
    assert "fgsm" in by and "pgd" in by          # cheaper attacks take what they can first
    assert recs == _run(probe, mlp, x, y)         # deterministic given the generator
    clean = CleanProbe().run(mlp, x, y, torch.arange(80), torch.Generator())
    m = classification_metrics(clean + recs, [str(i) for i in range(10)])
    block = m["robust"]["linf:0.1"]
    assert block["accuracy"] == pytest.approx(sum(r["correct"] for r in recs) / 80)
    assert sum(block["broken_by"].values()) == sum(r["broken_by"] is not None and c["correct"]
                                                   for r, c in zip(recs, clean))
    assert not sanity_flags(recs)


@dataclass(frozen=True)
class _Cfg(AttackConfig):
    pass


class Overshoot(Attack):
    """A broken attack: steps twice as far as allowed."""

    config_class = _Cfg

    def _run(self, model, x, y, y_target, generator):
        x_adv = (x + 2 * self.threat.eps).clamp(0, 1)
        n = x.shape[0]
        return AttackResult(x_adv, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long))


def test_attack_leaving_the_ball_fails_the_evaluation_loudly(mlp, digits, tmp_path):
    threat = ThreatModel.parse("linf:0.05")
    probe = AttackProbe(threat, ["pgd", Overshoot(_Cfg(threat), name="overshoot")])
    data = digits[1].subset(slice(0, 40))
    with pytest.raises(ThreatModelViolation, match="attack 'overshoot'.*left its threat model"):
        evaluate_model(mlp, data, [CleanProbe(), probe], tmp_path / "run", {"t": 1}, batch_size=20, quiet=True)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_randomized_model_is_flagged_and_eot_lowers_robust_accuracy(mlp, digits):
    x, y = digits[1].images[:100], digits[1].labels[:100]
    noisy = Noisy(mlp).eval()
    plain = _run(AttackProbe("linf:0.1", ["pgd"]), noisy, x, y)
    eot = _run(AttackProbe("linf:0.1", ["eot-pgd"], attack_params={"eot-pgd": {"eot_iter": 20}}), noisy, x, y)
    acc_plain = sum(r["correct"] for r in plain) / 100
    acc_eot = sum(r["correct"] for r in eot) / 100
    assert acc_eot < acc_plain - 0.05
    flags = sanity_flags(plain)
    assert any("randomized" in f and "EOT" in f for f in flags)
    assert not sanity_flags(_run(AttackProbe("linf:0.1", ["pgd"]), mlp, x, y))


def test_probability_and_zero_gradient_flags(mlp, digits):
    x, y = digits[1].images[:16], digits[1].labels[:16]

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mlp

        def forward(self, z):
            return F.softmax(self.m(z), 1)

    class Step(nn.Module):  # piecewise-constant: zero gradients everywhere (masking)
        def __init__(self):
            super().__init__()
            self.m = mlp

        def forward(self, z):
            return self.m((z * 4).round() / 4) * 1.0 + 0 * z.sum()

    flags = sanity_flags(_run(AttackProbe("linf:0.1", ["pgd"]), Soft(), x, y))
    assert any("probabilities" in f for f in flags)
    flags = sanity_flags(_run(AttackProbe("linf:0.1", ["pgd"]), Step(), x, y))
    assert any("gradient is exactly zero" in f for f in flags)


def test_black_box_beating_white_box_is_flagged(mlp, digits):
    """On the zero-gradient model, PGD is stuck and Square (gradient-free) breaks examples."""
    x, y = digits[1].images[:24], digits[1].labels[:24]

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mlp

        def forward(self, z):
            return self.m((z * 4).round() / 4) + 0 * z.sum()

    probe = AttackProbe("linf:0.3", ["pgd", "autoattack"], attack_params={
        "autoattack": {"version": "custom", "attacks": ("apgd-ce", "square"), "steps": 5, "n_queries": 200}})
    recs = _run(probe, Step().eval(), x, y)
    assert any(r["broken_by"] == "autoattack/square" for r in recs)
    assert any("gradient-free attack broke" in f for f in sanity_flags(recs))


def test_weaker_attack_beating_stronger_is_flagged(mlp, digits):
    x, y = digits[1].images[:24], digits[1].labels[:24]
    # a deliberately crippled "stronger" attack listed last: tiny steps, no random start
    crippled = {"steps": 2, "step_size": 1e-4, "random_start": False}
    weak_strong = AttackProbe("linf:0.1", ["pgd", "apgd-ce"], attack_params={"apgd-ce": crippled}, cross_check=8)
    recs = _run(weak_strong, mlp, x, y)
    assert any("weaker_beats_stronger" in r["flags"] for r in recs)
    assert any("strongest white-box attack failed" in f for f in sanity_flags(recs))


def test_autoattack_adapter_equals_pyautoattack(mlp, digits):
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    x, y = digits[1].images[:40], digits[1].labels[:40]
    eps, seed, n_iter = 0.1, 3, 8
    direct = AutoAttack(mlp, attacks=["apgd-ce", "apgd-t", "square"], eps=eps, seed=seed, version="custom")
    direct.apgd = APGDAttack(mlp, n_iter=n_iter, eps=eps, seed=seed, n_restarts=1, logger=direct.logger)
    direct.apgd_targeted = APGDAttack_targeted(mlp, n_iter=n_iter, eps=eps, seed=seed, n_restarts=1,
                                               n_target_classes=3, logger=direct.logger)
    direct.square.n_queries = 100
    with torch.random.fork_rng():
        x_d, y_d = direct.run_standard_evaluation(x, y, batch_size=16)
    ours = create_attack("autoattack", f"linf:{eps}", version="custom", attacks=("apgd-ce", "apgd-t", "square"),
                         steps=n_iter, n_restarts=1, n_target_classes=3, n_queries=100, batch_size=16, seed=seed)
    res = ours.run(mlp, x, y)
    acc_direct = (mlp(x_d).argmax(1) == y).float().mean().item()
    acc_ours = (mlp(res.x_adv).argmax(1) == y).float().mean().item()
    assert acc_ours == acc_direct
    assert torch.equal(res.success, y_d != y)
    assert torch.equal(res.x_adv, x_d)
    assert set(filter(None, res.broken_by)) <= {"apgd-ce", "apgd-t", "square"}


def test_cli_sweeps_epsilons_and_resumes_byte_identical(mlp, tmp_path):
    from bastion.checkpoints import make_card, save_checkpoint
    from experiments.cli import main

    save_checkpoint(tmp_path / "m", mlp, make_card(mlp, "mlp", 10, (1, 8, 8), arch_kwargs={"hidden": [64]},
                                                   dataset="digits"))
    args = ["evaluate", "--quiet", "--model", str(tmp_path / "m.safetensors"), "--attacks", "pgd,apgd-ce,autoattack",
            "--eps", "0.05,0.1", "--max", "48", "--batch-size", "16", "--attack-param", "apgd-ce.steps=10",
            "--attack-param", "autoattack.version=custom", "--attack-param", "autoattack.attacks=apgd-t+square",
            "--attack-param", "autoattack.steps=5", "--attack-param", "autoattack.n_queries=50"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    doc = json.loads((tmp_path / "full" / "metrics.json").read_text())
    data = doc["sections"][0]["data"]
    assert set(data["robust"]) == {"linf:0.05", "linf:0.1"}
    assert data["robust"]["linf:0.1"]["accuracy"] <= data["robust"]["linf:0.05"]["accuracy"]
    assert "flags" in data and [a["threat"] for a in data["attacks"]] == ["linf:0.05", "linf:0.1"]
    # a run killed midway: keep the clean records and part of the first sweep point (with a torn
    # last line), then run the same command again
    log = tmp_path / "full" / "records.jsonl"
    recs = log.read_text().splitlines()
    assert len(recs) == 3 * 48
    want = (tmp_path / "full" / "metrics.json").read_bytes()
    (tmp_path / "full" / "metrics.json").unlink()
    log.write_text("\n".join(recs[:48 + 20]) + "\n" + recs[48 + 20][:30])
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    assert (tmp_path / "full" / "metrics.json").read_bytes() == want
    assert len(log.read_text().splitlines()) == 3 * 48
