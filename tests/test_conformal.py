"""Split conformal scores and thresholds (certify.conformal), checked against values computed
independently of the implementation (integer arithmetic, hand-worked examples, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bastion.errors import ConfigError
from certify.conformal import (
    APS,
    HPS,
    RAPS,
    SplitConformal,
    conformal_threshold,
    create_score,
    prediction_sets,
    quantile_index,
    set_metrics,
)


def _k_int(n: int, alpha_milli: int, beta_milli: int = 0) -> int:
    """ceil((n + 1)(1 - alpha + 2 beta)) with alpha, beta in thousandths: pure integer arithmetic."""
    num = (n + 1) * (1000 - alpha_milli + 2 * beta_milli)
    return -(-num // 1000)


@pytest.mark.parametrize("alpha_milli,beta_milli", [(100, 0), (50, 0), (200, 0), (100, 1), (50, 1)])
def test_quantile_index_matches_integer_arithmetic(alpha_milli, beta_milli):
    for n in range(0, 3001):
        assert quantile_index(n, alpha_milli / 1000, beta_milli / 1000) == _k_int(n, alpha_milli, beta_milli), n


def test_quantile_index_spec_examples():
    assert quantile_index(100, 0.1) == 91           # 91/101 = 0.90099 coverage
    assert quantile_index(564, 0.1) == 509          # ceil(508.5); a fraction round trip gives 510
    assert math.ceil(564 * (509 / 564)) == 510 or math.ceil(564 * (509 / 564)) == 509
    assert quantile_index(8, 0.1) == 9              # k > n: no finite threshold
    assert conformal_threshold(torch.arange(8.0), 0.1) == math.inf
    assert quantile_index(348, 0.1, 0.001) == math.ceil(349 * 0.902 - 1e-9)


def test_threshold_is_the_kth_smallest():
    s = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05, 0.95])  # n = 11
    # k = ceil(12 * 0.9) = ceil(10.8) = 11 -> the largest; alpha = 0.2: ceil(12 * 0.8) = 10 -> 0.9
    assert conformal_threshold(s, 0.1) == pytest.approx(0.95)
    assert conformal_threshold(s, 0.2) == pytest.approx(0.9)
    assert prediction_sets(torch.tensor([[0.1, 0.95, 0.96]]), 0.95).tolist() == [[True, True, False]]


def test_hps_aps_raps_by_hand():
    p = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    assert HPS().from_probs(p)[0].tolist() == pytest.approx([0.5, 0.8, 0.7])
    # ranks: 0 -> 1st, 2 -> 2nd, 1 -> 3rd; mass strictly above: 0, 0.8, 0.5
    assert APS(randomized=False).from_probs(p)[0].tolist() == pytest.approx([0.5, 1.0, 0.8])   # u = 1 (inclusive)
    assert APS().from_probs(p, torch.tensor([0.0]))[0].tolist() == pytest.approx([0.0, 0.8, 0.5])
    assert APS().from_probs(p, torch.tensor([0.5]))[0].tolist() == pytest.approx([0.25, 0.9, 0.65])
    raw = RAPS(penalty=0.2, kreg=1, randomized=False, scaled=False).from_probs(p)
    assert raw[0].tolist() == pytest.approx([0.5, 1.0 + 0.4, 0.8 + 0.2])
    scaled = RAPS(penalty=0.2, kreg=1, randomized=False, scaled=True).from_probs(p)
    assert scaled[0].tolist() == pytest.approx((raw[0] / (1 + 0.2 * 2)).tolist())
    assert float(scaled.max()) <= 1.0


def test_aps_ties_break_by_label_index():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    assert APS().from_probs(p, torch.tensor([0.0]))[0].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_randomized_aps_can_return_empty_sets_and_needs_u():
    torch.manual_seed(0)
    logits = torch.randn(400, 5) * 3
    cp = SplitConformal(APS(randomized=True), alpha=0.3, seed=1)
    cp.calibrate(logits[:200], logits[:200].argmax(1))
    sets = cp.predict(logits[200:])
    assert bool((sets.sum(1) == 0).any())  # expected behaviour of randomized APS, not a bug
    with pytest.raises(ConfigError):
        APS(randomized=True).from_probs(torch.softmax(logits, 1).double())


def test_scores_in_declared_range():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(200, 7) * 4, 1).double()
    u = torch.rand(200, dtype=torch.float64)
    for sc in (HPS(), APS(), RAPS(penalty=0.5, kreg=2)):
        s = sc.from_probs(p, u if sc.randomized else None)
        assert float(s.min()) >= sc.range[0] - 1e-12 and float(s.max()) <= sc.range[1] + 1e-12


def test_split_coverage_within_binomial_error_of_theory():
    """Continuous i.i.d. scores, n = 100, alpha = 0.1: coverage is exactly 91/101 in expectation."""
    rng = np.random.default_rng(0)
    trials, n, m = 3000, 100, 50
    covs = []
    for _ in range(trials):
        cal, test = rng.random(n), rng.random(m)
        covs.append(float(np.mean(test <= conformal_threshold(torch.from_numpy(cal), 0.1))))
    theory = 91 / 101
    # coverage given the calibration set is Beta(k, n + 1 - k); plus the test points' binomial noise
    k = 91
    var = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + theory * (1 - theory) / m
    se = math.sqrt(var / trials)
    assert abs(np.mean(covs) - theory) < 4 * se, (np.mean(covs), theory, se)


def test_split_conformal_api_covers_on_synthetic_logits():
    """Labels drawn from the model's own softmax: coverage over many splits near 1 - alpha, above
    it within error (APS randomized and not, HPS, RAPS)."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    logits = torch.randn(n, 6, generator=g) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    for score in (HPS(), APS(randomized=True), APS(randomized=False), RAPS(penalty=0.1, kreg=2)):
        covs = []
        for r in range(20):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(r))
            cal, test = perm[:500], perm[500:]
            cp = SplitConformal(score, confidence_level=0.9, seed=r)
            cp.calibrate(logits[cal], labels[cal])
            covs.append(cp.evaluate(logits[test], labels[test])["coverage_rate"])
        theory = math.ceil(501 * 0.9) / 501
        assert abs(np.mean(covs) - theory) < 0.015, (score.name, np.mean(covs))


def test_set_metrics_and_errors():
    sets = torch.tensor([[True, False], [True, True], [False, False]])
    m = set_metrics(sets, torch.tensor([0, 1, 1]))
    assert m["coverage_rate"] == pytest.approx(2 / 3) and m["average_size"] == pytest.approx(1.0)
    assert m["size_if_covered"] == pytest.approx(1.5) and m["empty_rate"] == pytest.approx(1 / 3)
    assert m["per_class_coverage"] == [1.0, 0.5]
    with pytest.raises(ConfigError):
        SplitConformal(HPS(), alpha=1.5)
    with pytest.raises(ConfigError):
        SplitConformal(HPS(), alpha=0.1, confidence_level=0.9)
    with pytest.raises(ConfigError):
        create_score("nope")
    with pytest.raises(ConfigError):
        SplitConformal(HPS()).predict(torch.zeros(2, 3))
    assert SplitConformal("hps", confidence_level=0.95).alpha == pytest.approx(0.05)
