"""bastion.metrics on hand-made records and hand tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bastion.metrics import (
    auroc,
    average_certified_radius,
    certified_accuracy,
    classification_metrics,
    coverage_and_size,
    disparity,
    per_class_accuracy,
    radius_grid,
    tpr_at_fpr,
)


def _clean(i, label, correct):
    return {"index": i, "probe": "clean", "kind": "clean", "label": label, "pred": label if correct else -1,
            "correct": correct}


def _rob(i, attack, correct, threat="linf:8/255"):
    return {"index": i, "probe": f"{attack}@{threat}", "kind": "robust", "threat": threat, "attack": attack,
            "correct": correct}


def test_robust_accuracy_is_per_example_worst_case():
    # 6 examples, classes 0/1/2 with two each; clean-wrong: #5
    recs = [_clean(0, 0, True), _clean(1, 0, True), _clean(2, 1, True), _clean(3, 1, True), _clean(4, 2, True),
            _clean(5, 2, False)]
    # pgd breaks 1, apgd breaks 2, both break 3; 0 and 4 survive both; 5 is "robust" to pgd but clean-wrong
    recs += [_rob(0, "pgd", True), _rob(1, "pgd", False), _rob(2, "pgd", True), _rob(3, "pgd", False),
             _rob(4, "pgd", True), _rob(5, "pgd", True)]
    recs += [_rob(0, "apgd", True), _rob(1, "apgd", True), _rob(2, "apgd", False), _rob(3, "apgd", False),
             _rob(4, "apgd", True), _rob(5, "apgd", True)]
    recs += [_rob(0, "pgd", False, threat="l2:0.5")]  # another threat model: kept separate
    m = classification_metrics(recs, ["a", "b", "c"])
    assert m["clean"]["accuracy"] == pytest.approx(5 / 6) and m["clean"]["n"] == 6
    assert m["clean"]["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.5}
    r = m["robust"]["linf:8/255"]
    assert r["accuracy"] == pytest.approx(2 / 6)   # only #0 and #4
    # each attack alone would report more: worst case < min over attacks
    assert r["per_attack"] == {"pgd": pytest.approx(3 / 6), "apgd": pytest.approx(3 / 6)}
    assert r["broken_by"] == {"pgd": 2, "apgd": 1}
    assert r["per_class"] == {"a": 0.5, "b": 0.0, "c": 0.5}
    assert r["disparity"]["max_minus_min"] == pytest.approx(0.5)
    assert r["disparity"]["std"] == pytest.approx(np.std([0.5, 0.0, 0.5]))
    assert r["disparity"]["worst_class_accuracy"] == 0.0
    assert r["missing"] == 0
    l2 = m["robust"]["l2:0.5"]
    # only #0 was attacked under l2 (and broken); clean-correct examples never attacked are not robust
    assert l2["accuracy"] == 0.0 and l2["missing"] == 4
    assert list(m["robust"]) == ["l2:0.5", "linf:8/255"]


def test_disparity_by_hand():
    d = disparity([0.9, 0.5, None, 0.7])
    assert d["max_minus_min"] == pytest.approx(0.4)
    assert d["std"] == pytest.approx(math.sqrt(((0.2) ** 2 + (0.2) ** 2 + 0) / 3))  # population std
    assert d["worst_class_accuracy"] == 0.5
    assert disparity([None, None]) == {"max_minus_min": 0.0, "std": 0.0, "worst_class_accuracy": 0.0}
    assert per_class_accuracy([0, 0, 1, 2], [True, False, True, False], 4) == [0.5, 1.0, 0.0, None]


def test_certified_accuracy_and_acr_hand_table():
    # example: radius, correct
    table = [(0.0, False),    # abstained
             (0.1, True), (0.25, True), (0.5, False), (0.75, True), (float("nan"), False)]
    radii = [r for r, _ in table]
    correct = [c for _, c in table]
    grid = radius_grid(0.75, 0.25)
    assert grid.tolist() == [0.0, 0.25, 0.5, 0.75]
    ca = certified_accuracy(radii, correct, grid)
    assert ca.tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert average_certified_radius(radii, correct) == pytest.approx((0.1 + 0.25 + 0.75) / 6)
    assert average_certified_radius([-1.0, 0.5], [True, True]) == pytest.approx(0.25)
    assert average_certified_radius([], []) == 0.0
    assert certified_accuracy([], [], grid).tolist() == [0, 0, 0, 0]
    assert len(radius_grid(0.5, 0.01)) == 51 and radius_grid(0.5, 0.01)[-1] == 0.5


def test_auroc_and_tpr_at_fpr():
    assert auroc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0
    assert auroc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([0.1, 0.4], [0.2, 0.5]) == pytest.approx(0.75)
    neg = np.arange(100) / 100.0  # 0.00 .. 0.99
    pos = np.array([0.5, 0.955, 0.97, 1.2])
    # FPR 5%: threshold is the 6th largest negative (0.94); 5 negatives are above it
    assert tpr_at_fpr(neg, pos, 0.05) == pytest.approx(3 / 4)
    assert tpr_at_fpr(neg, pos, 0.0) == pytest.approx(1 / 4)
    assert tpr_at_fpr(neg, pos, 1.0) == 1.0
    assert tpr_at_fpr([], pos) == 0.0


def test_coverage_and_size():
    out = coverage_and_size([[0, 1], [2], [], [1, 2, 3]], [1, 0, 2, 3])
    assert out == {"coverage": 0.5, "mean_set_size": 1.5}
