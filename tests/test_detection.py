"""The detect probe, fold and renderer in the common evaluator; the detector-aware adaptive attack;
the Mahalanobis detector; the detect command's options (no diffusers needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyDetector

from bastion.evaluate import evaluate, section_data
from bastion.folds import FoldContext
from bastion.records import DetectRecord, parse_record
from bastion.runner import RunOptions
from detection.evaluation import DetectProbe, detection_metrics, fold_detect, natural_halves, render_detection
from detection.mahalanobis import MahalanobisDetector, default_layers


@pytest.fixture(scope="module")
def setup(toy_detection):
    return toy_detection


def test_records_roundtrip_with_scores():
    r = DetectRecord(index=3, probe="detect/natural", label=1, pred=1, correct=True, score=0.5, adversarial=False,
                     detector="a", scores={"a": 0.5, "b": 2.0}, clean_correct=True)
    back = parse_record(r.to_record())
    assert back == r and back.scores == {"a": 0.5, "b": 2.0}


def test_metrics_by_hand():
    def rec(i, score, adv, correct, clean=True):
        return DetectRecord(index=i, probe="p", label=0, pred=0 if correct else 1, correct=correct, score=score,
                            adversarial=adv, scores={"d": score}, clean_correct=clean)

    nat = {i: rec(i, s, False, True) for i, s in enumerate([0.1, 0.2, 0.3, 0.4])}
    # adversarial scores 0.35 (fooled, undetected at threshold 0.4), 0.5 (fooled, detected), 0.05, 0.45
    adv = {0: rec(0, 0.35, True, False), 1: rec(1, 0.5, True, False), 2: rec(2, 0.05, True, True),
           3: rec(3, 0.45, True, True, clean=False)}
    m = detection_metrics(nat, adv, "d", fpr=0.0)
    assert m["threshold"] == pytest.approx(0.4)
    # pairs (neg < pos): 0.35 beats 3 of 4, 0.5 and 0.45 beat 4, 0.05 beats 0 -> 11/16
    assert m["auroc"] == pytest.approx(11 / 16)
    assert m["clean_accuracy"] == pytest.approx(0.75)
    assert m["robust_accuracy"] == pytest.approx(0.25)            # only example 2
    assert m["detection_aware_robust_accuracy"] == pytest.approx(0.5)  # 2, and 1 (caught by the detector)
    assert natural_halves(nat, "d") == pytest.approx(0.75)  # {0.1, 0.3} vs {0.2, 0.4}: 3 of 4 pairs


def test_evaluate_folds_oblivious_and_adaptive_side_by_side(setup, tmp_path):
    model, _, test, det = setup
    probes = [DetectProbe([det]),
              DetectProbe([det], attack="pgd", threat="linf:0.1", attack_params={"steps": 5}),
              DetectProbe([det], attack="pgd", threat="linf:0.1", attack_params={"steps": 5}, target="toy",
                          weight=0.5)]
    doc = evaluate(model, test, probes, tmp_path / "run", {"t": 1}, opts=RunOptions(batch_size=16, quiet=True))
    d = section_data(doc, "detection")
    assert d["num_examples"] == 48 and set(d["natural_halves_auroc"]) == {"toy"}
    obl, ada = [r for r in d["rows"] if not r["adaptive"]][0], [r for r in d["rows"] if r["adaptive"]][0]
    assert obl["auroc"] > 0.9                          # an oblivious attack leaves the data
    assert ada["mean_score_adversarial"] < obl["mean_score_adversarial"]  # the adaptive one keeps the score low
    assert ada["auroc"] < obl["auroc"]
    (row,) = d["side_by_side"]
    assert row["auroc_adaptive"] == ada["auroc"] and row["auroc_oblivious"] == obl["auroc"]
    md, figs = render_detection(doc["sections"][0])
    assert "adaptive" in md and "det.-aware" in md and len(figs) == 1
    assert (tmp_path / "run" / "report.md").is_file()
    # resume: the same call computes nothing new and folds to the same document
    again = evaluate(model, test, probes, tmp_path / "run", {"t": 1}, opts=RunOptions(batch_size=16, quiet=True))
    assert section_data(again, "detection") == d


def test_oblivious_attack_runs_every_step_unfiltered(setup):
    model, _, test, det = setup
    probe = DetectProbe([det], attack="pgd", threat="linf:0.1", attack_params={"steps": 3})
    g = torch.Generator().manual_seed(0)
    recs = probe.run(model, test.images[:8], test.labels[:8], test.indices[:8], g)
    assert len(recs) == 8 and all(r["adversarial"] for r in recs)
    res = probe._attack.run(model, test.images[:8], test.labels[:8], generator=torch.Generator().manual_seed(1))
    assert not bool(res.success.any())  # never "successful": no early exit, no filtering by success
    moved = (res.x_adv - test.images[:8]).flatten(1).abs().amax(1)
    assert bool((moved > 0.05).all())


def test_adaptive_probe_needs_a_threshold_and_a_known_target(setup):
    from bastion.errors import ConfigError

    _, train, _, _ = setup
    fresh = ToyDetector(train.images[:10], name="fresh")
    with pytest.raises(ConfigError, match="threshold"):
        DetectProbe([fresh], attack="pgd", threat="linf:0.1", target="fresh")
    with pytest.raises(ConfigError, match="not one of"):
        DetectProbe([fresh], attack="pgd", threat="linf:0.1", target="other")


def test_fold_reports_missing_natural_records():
    rec = DetectRecord(index=0, probe="x", label=0, pred=0, correct=True, score=1.0, adversarial=True)
    (sec,) = fold_detect([rec], FoldContext(class_names=["a"]))
    assert "error" in sec["data"]


def test_mahalanobis_statistics_and_detection(setup):
    model, train, test, _ = setup
    assert default_layers(model) == ["2", "5"]
    det = MahalanobisDetector(model, magnitudes=(0.0, 0.002), noise_std=0.01, seed=0)
    det.fit_statistics(train.images, train.labels)
    # class means and the tied ML covariance of layer "5" (the 16-d penultimate ReLU) by hand
    feats = det.layer_features(train.images)[0][1].double()
    mu = torch.stack([feats[train.labels == c].mean(0) for c in range(4)])
    cen = feats - mu[train.labels]
    assert torch.allclose(det.means[1].double(), mu, atol=1e-5)
    cov = cen.T @ cen / len(train)
    assert torch.allclose(det.precisions[1].double(), torch.linalg.pinv(cov), rtol=1e-3, atol=1e-3)
    from attacks import create_attack

    adv = create_attack("pgd", "linf:0.2", steps=5)(model, train.images[:100], train.labels[:100],
                                                     generator=torch.Generator().manual_seed(0))
    det.fit(train.images[:100], [adv], labels=train.labels[:100])
    assert det.magnitude in (0.0, 0.002) and det.weights.shape == (2,)
    s_nat = det.score(test.images)
    s_adv = det.score(create_attack("pgd", "linf:0.2", steps=5)(model, test.images, test.labels,
                                                                 generator=torch.Generator().manual_seed(1)))
    from bastion.metrics import auroc

    assert s_nat.shape == (48,) and auroc(s_nat, s_adv) > 0.6
    x = test.images[:4].clone().requires_grad_(True)
    det.set_threshold(s_nat, 0.05)
    det.differentiable()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_command_options_build_settings():
    import argparse

    from experiments.cli import common_parser
    from experiments.commands import detect

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    detect.register(sub, common_parser())
    args = p.parse_args(["detect", "--threats", "linf:4/255", "linf:8/255", "--adaptive-threats", "linf:8/255",
                         "--detectors", "deep", "norm", "--adaptive-targets", "eps-deep-mmd", "--kernel-eps", "4/255"])
    s = detect.settings_from_args(args)
    assert s.threats == ("linf:4/255", "linf:8/255") and s.adaptive_threats == ("linf:8/255",)
    assert s.kernel_eps == pytest.approx(4 / 255) and s.detectors == ("deep", "norm")
    from bastion.errors import ConfigError
    from detection.pipeline import DetectSettings

    with pytest.raises(ConfigError, match="not among the detectors"):
        DetectSettings(detectors=("norm",), adaptive_targets=("mahalanobis",))
    with pytest.raises(ConfigError, match="subset"):
        DetectSettings(threats=("linf:4/255",), adaptive_threats=("linf:8/255",))


def test_selective_mode_follows_the_margin_then_the_score(setup):
    from attacks.adaptive import DetectorObjective

    model, _, test, det = setup
    obj = DetectorObjective(det.differentiable(), threshold=0.0, mode="selective")
    x, y = test.images[:16], test.labels[:16]
    out = obj(model, x, y, None)
    with torch.no_grad():
        fooled = model(x).argmax(1) != y
    assert bool((out.loss[fooled] > 0).all()) and bool((out.loss[~fooled] <= 0).all())
    probe = DetectProbe([det], attack="pgd", threat="linf:0.1", attack_params={"steps": 3}, target="toy",
                        mode="selective")
    assert probe.name == "detect/pgd+adaptive[toy,selective]@linf:0.1" and probe.describe()["mode"] == "selective"
    recs = probe.run(model, x, y, test.indices[:16], torch.Generator().manual_seed(0))
    assert len(recs) == 16 and all(r["adaptive"] for r in recs)
