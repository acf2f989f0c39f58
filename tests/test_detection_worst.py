"""The ``worst`` adaptive mode of the detect probe (APGD on the margin sum, then APGD-selective on
the examples still robust) against the older CE-sum mode on a tiny classifier + detector; the
shared suite of `attacks.adaptive.detector_aware_attacks` (the leaderboard builds its suite from
it); the detect settings' new default. No diffusers needed; a few seconds."""

from __future__ import annotations

import pytest
import torch

from attacks.adaptive import DETECTOR_ATTACKS, STRONG_DETECTOR_SUITE, DetectorObjective, detector_aware_attacks
from bastion.errors import ConfigError
from bastion.evaluate import evaluate, section_data
from bastion.runner import RunOptions
from detection.evaluation import DetectProbe


@pytest.fixture(scope="module")
def setup(toy_detection):
    model, _, test, det = toy_detection
    return model, test, det


def _broken(records, threshold: float) -> int:
    """Examples the attack broke: clean-correct, misclassified and under the detector's threshold."""
    return sum(bool(r["clean_correct"] and not r["correct"] and r["score"] <= threshold) for r in records)


def test_worst_mode_is_at_least_as_strong_as_the_ce_sum(setup, tmp_path):
    model, test, det = setup
    kw = {"attack": "pgd", "threat": "linf:0.3", "attack_params": {"steps": 10}, "target": "toy", "weight": 0.5}
    sum_probe, worst_probe = DetectProbe([det], **kw, mode="sum"), DetectProbe([det], **kw, mode="worst")
    assert worst_probe.name == "detect/adaptive[toy,worst]@linf:0.3"
    assert worst_probe.attack_name == "+".join(STRONG_DETECTOR_SUITE)
    x, y, idx = test.images, test.labels, test.indices
    rs = sum_probe.run(model, x, y, idx, torch.Generator().manual_seed(0))
    rw = worst_probe.run(model, x, y, idx, torch.Generator().manual_seed(0))
    n_sum, n_worst = _broken(rs, det.threshold), _broken(rw, det.threshold)
    assert n_worst >= n_sum and n_worst >= 10, (n_sum, n_worst)  # here: 0 by the CE sum, 20 by the suite
    # the suite's first attack alone cannot beat the worst case over the suite
    first = DetectProbe([det], **kw | {"attack": "apgd-ce"}, mode="sum", base="margin", name="first")
    assert _broken(first.run(model, x, y, idx, torch.Generator().manual_seed(0)), det.threshold) <= n_worst

    # through the evaluator: the worst row pairs with the threat's oblivious attack
    probes = [DetectProbe([det]), DetectProbe([det], attack="pgd", threat="linf:0.3", attack_params={"steps": 5}),
              sum_probe, worst_probe]
    doc = evaluate(model, test, probes, tmp_path / "run", {"t": 1}, opts=RunOptions(batch_size=16, quiet=True))
    sbs = {r["adaptive_mode"]: r for r in section_data(doc, "detection")["side_by_side"]}
    assert set(sbs) == {"sum", "worst"} and sbs["worst"]["auroc_oblivious"] is not None
    assert sbs["worst"]["da_robust_accuracy_adaptive"] <= sbs["sum"]["da_robust_accuracy_adaptive"]
    d = section_data(doc, "detection")
    (w,) = d["worst_case"]
    assert w["threat"] == "linf:0.3" and len(w["probes"]) == 3
    rows = [r for r in d["rows"] if r["detector"] == "toy"]
    assert w["detection_aware_robust_accuracy"] <= min(r["detection_aware_robust_accuracy"] for r in rows)


def test_shared_suite_and_leaderboard_use_it(setup):
    from experiments.leaderboard.detector import ADAPTIVE, attack_suite

    _, _, det = setup
    mod = det.differentiable()
    suite = detector_aware_attacks(mod, mod.standardize(det.threshold), "linf:0.1", steps=3, weight=0.3)
    assert [n for n, _ in suite] == list(STRONG_DETECTOR_SUITE)
    obj = suite[0][1].config.objective
    assert isinstance(obj, DetectorObjective) and (obj.mode, obj.base, obj.weight) == ("sum", "margin", 0.3)
    with pytest.raises(ConfigError, match="unknown detector-aware"):
        detector_aware_attacks(mod, 0.0, "linf:0.1", ("nope",), steps=3)
    from bastion.threat import ThreatModel

    lb = attack_suite(ThreatModel.parse("linf:0.1"), det, det.threshold, "fast", 3, 0, 0.5)
    assert tuple(n for n, _ in lb[2:]) == ADAPTIVE
    assert [a.config.objective.describe() for _, a in lb[2:]] == [
        DetectorObjective(mod, 0.5, mod.standardize(det.threshold), base=DETECTOR_ATTACKS[n][2],
                          mode=DETECTOR_ATTACKS[n][1]).describe() for n in ("apgd-margin", "apgd-selective",
                                                                              "pgd-selective")]


def test_detect_settings_default_to_worst_and_keep_old_modes():
    import argparse

    from detection.pipeline import DetectSettings
    from experiments.cli import common_parser
    from experiments.commands import detect

    s = DetectSettings()
    assert s.adaptive_modes == ("worst",) and "adaptive_steps" not in s.to_config()
    assert "adaptive_modes" not in DetectSettings(adaptive_modes=("sum",)).to_config()  # old runs resume
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    detect.register(sub, common_parser())
    args = p.parse_args(["detect", "--adaptive-modes", "sum", "selective", "--adaptive-steps", "20"])
    s = detect.settings_from_args(args)
    assert s.adaptive_modes == ("sum", "selective") and s.to_config()["adaptive_steps"] == 20
    with pytest.raises(ConfigError, match="adaptive mode"):
        DetectSettings(adaptive_modes=("bogus",))
