"""The adaptive attack suite for mixed classifiers: composition, a run through the common evaluator
(worst case per example, broken_by names the attack), the alpha-first and transfer attacks, and
probability mixing at least as robust as logit mixing on digits."""

import pytest
import torch

import defenses.pgd_at  # noqa: F401
from attacks import create_attack
from attacks.base import AttackError
from attacks.mixing import (
    AlphaFirst,
    AlphaFirstConfig,
    TransferAttack,
    TransferConfig,
    adaptive_probe,
    adaptive_suite,
    weak_probe,
)
from bastion.data import load_dataset
from bastion.evaluate import CleanProbe, evaluate, section_data
from bastion.models import create_model
from bastion.runner import RunOptions
from bastion.threat import ThreatModel
from bastion.train import TrainConfig, create_objective, fit
from defenses.adaptive_smoothing import MixedClassifier, mixer_for

TAPS = {"accurate": ["net.1", "net.4"], "robust": ["net.1", "net.4"]}


@pytest.fixture(scope="module")
def digits_bases():
    train = load_dataset("digits", "train")
    cfg = TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0)
    torch.manual_seed(0)
    g = create_model("small_cnn", 10, 1, 8, width=16)
    fit(g, train, create_objective("standard"), cfg, quiet=True)
    torch.manual_seed(1)
    h = create_model("small_cnn", 10, 1, 8, width=16)
    fit(h, train, create_objective("pgd", eps=0.2, steps=5), cfg, quiet=True)
    return g.eval(), h.eval()


def _tiny_mixed():
    torch.manual_seed(0)
    g, h = create_model("small_cnn", 10, 1, 8, width=8), create_model("small_cnn", 10, 1, 8, width=8)
    return MixedClassifier(g, h, mixer=mixer_for(g, h, TAPS, (1, 8, 8), (8, 16), 0), taps=TAPS).eval()


def test_suite_composition():
    names = [a.name for a in adaptive_suite("linf:0.1", steps=5, autoattack=False)]
    assert names[:2] == ["apgd-ce", "apgd-t"]
    assert {"mix-apgd-ce-w0.3", "mix-apgd-ce-w0.9", "mix-apgd-t-w0.5", "alpha-first", "transfer-accurate",
            "transfer-alpha0.95", "square"} <= set(names)
    assert len(set(names)) == len(names)


def test_suite_through_the_evaluator(tmp_path):
    model = _tiny_mixed()
    data = load_dataset("digits", "test").every(1, 24)
    full = adaptive_probe("linf:0.1", steps=4, weights=(0.5,), n_target_classes=2, square_queries=10,
                          autoattack=False)
    weak = weak_probe("linf:0.1", steps=4)
    doc = evaluate(model, data, [CleanProbe(), full, weak], tmp_path / "run", {"t": 1},
                   opts=RunOptions(batch_size=12), write_reports=True)
    rob = section_data(doc, "robustness")
    block = rob["robust"]["linf:0.1"]
    assert block["accuracy"] <= block["per_attack"][weak.suite] + 1e-12
    assert block["accuracy"] <= block["per_attack"][full.suite] + 1e-12
    names = {a.name for a in full.attacks} | {a.name for a in weak.attacks}
    assert set(block["broken_by"]) <= names
    assert (tmp_path / "run" / "report.md").is_file()


def test_alpha_first_and_transfer_stay_in_the_ball():
    model = _tiny_mixed()
    x = torch.rand(6, 1, 8, 8)
    y = torch.arange(6)
    t = ThreatModel.parse("linf:0.1")
    for atk in (AlphaFirst(AlphaFirstConfig(threat=t, steps=3, alpha_steps=3)),
                TransferAttack(TransferConfig(threat=t, steps=3, source="accurate")),
                TransferAttack(TransferConfig(threat=t, steps=3, source="alpha:0.9"))):
        res = atk.run(model, x, y)
        t.check(x, res.x_adv)
        assert res.x_adv.shape == x.shape


def test_alpha_first_stage_one_lowers_alpha():
    model = _tiny_mixed()
    x = torch.rand(16, 1, 8, 8)
    t = ThreatModel.parse("linf:0.3")
    from attacks.adaptive import MixingObjective
    from attacks.mixing import _AllSteps

    atk = create_attack("pgd", t, steps=10, objective=_AllSteps(MixingObjective(1.0)))
    x1 = atk(model, x, torch.zeros(16, dtype=torch.long))
    assert model.mixing_weight(x1).mean() < model.mixing_weight(x).mean()


def test_transfer_needs_a_mixed_model():
    atk = TransferAttack(TransferConfig(threat=ThreatModel.parse("linf:0.1"), steps=2))
    with pytest.raises(AttackError):
        atk.run(create_model("small_cnn", 10, 1, 8, width=4), torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_probability_mixing_at_least_as_robust_as_logit_mixing(tmp_path, digits_bases):
    g, h = digits_bases
    data = load_dataset("digits", "test").every(3, 150)
    acc = {}
    for mixing in ("probability", "logit"):
        model = MixedClassifier(g, h, alpha=0.7, mixing=mixing)
        probe = adaptive_probe("linf:0.2", steps=20, weights=(0.5,), n_target_classes=3, square_queries=50,
                               autoattack=False)
        doc = evaluate(model, data, [CleanProbe(), probe], tmp_path / mixing, {"m": mixing},
                       opts=RunOptions(batch_size=150), write_reports=False)
        acc[mixing] = section_data(doc, "robustness")["robust"]["linf:0.2"]["accuracy"]
    assert acc["probability"] >= acc["logit"], acc
