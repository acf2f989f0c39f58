"""MMD estimators against closed forms, unbiasedness, the deep kernel, J training, and the EPS
detector's invariance to the order of its reference set (no diffusers needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detection.detector import EPSDetector, threshold_at_fpr
from detection.mmd import (
    DeepKernel,
    KernelTrainConfig,
    gaussian_gram,
    j_statistic,
    median_bandwidth,
    mmd2_biased,
    mmd2_unbiased,
    mmd2_variance,
    train_deep_kernel,
)

E = math.exp


def grams(x, y, bw=1.0):
    return gaussian_gram(x, x, bw), gaussian_gram(y, y, bw), gaussian_gram(x, y, bw)


def test_estimators_match_hand_computed_closed_forms():
    # X = {0, 1}, Y = {2, 3}, k(a, b) = exp(-(a - b)^2): Kxx = Kyy = [[1, e^-1], [e^-1, 1]],
    # Kxy = [[e^-4, e^-9], [e^-1, e^-4]]
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    kxx, kyy, kxy = grams(x, y)
    assert torch.allclose(kxy, torch.tensor([[E(-4), E(-9)], [E(-1), E(-4)]], dtype=torch.float64))
    # unbiased: (2e^-1 + 2e^-1 - 2 (e^-9 + e^-1)) / 2
    assert float(mmd2_unbiased(kxx, kyy, kxy)) == pytest.approx(E(-1) - E(-9), rel=1e-12)
    # biased: (2 + 2e^-1)/4 * 2 - 2 (2e^-4 + e^-9 + e^-1)/4
    assert float(mmd2_biased(kxx, kyy, kxy)) == pytest.approx(1 + E(-1) / 2 - E(-4) - E(-9) / 2, rel=1e-12)
    # H has equal row sums r, so V1 = r^2/4 = V2^2 and the variance is exactly 0
    assert float(mmd2_variance(kxx, kyy, kxy)) == pytest.approx(0.0, abs=1e-12)


def test_variance_and_j_match_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.7
    kxx, kyy, kxy = grams(x, y, 2.0)
    n = 5
    h = [[float(kxx[i, j] + kyy[i, j] - kxy[i, j] - kxy[j, i]) for j in range(n)] for i in range(n)]
    v1 = sum((sum(h[i]) / n) ** 2 for i in range(n)) / n
    v2 = sum(map(sum, h)) / n ** 2
    var = 4 * (v1 - v2 ** 2)
    u = sum(h[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert float(mmd2_variance(kxx, kyy, kxy)) == pytest.approx(var, rel=1e-10)
    assert float(mmd2_unbiased(kxx, kyy, kxy)) == pytest.approx(u, rel=1e-10)
    assert float(j_statistic(kxx, kyy, kxy)) == pytest.approx(u / math.sqrt(var + 1e-8), rel=1e-8)


def population_mmd2(mu_x, mu_y, sx, sy, b):
    """MMD^2 of N(mu_x, sx^2) vs N(mu_y, sy^2) under k = exp(-(a-b)^2 / b):
    E k = (1 + 2v/b)^-1/2 exp(-d^2 / (b + 2v)) for a difference N(d, v)."""
    ek = lambda d, v: (1 + 2 * v / b) ** -0.5 * math.exp(-d * d / (b + 2 * v))  # noqa: E731
    return ek(0, 2 * sx * sx) + ek(0, 2 * sy * sy) - 2 * ek(mu_x - mu_y, sx * sx + sy * sy)


def test_unbiased_estimator_is_unbiased_and_biased_one_is_not():
    g = torch.Generator().manual_seed(1)
    reps, n, b = 4000, 8, 1.0
    truth = population_mmd2(0.0, 0.5, 1.0, 1.0, b)
    x = torch.randn(reps, n, 1, generator=g, dtype=torch.float64)
    y = torch.randn(reps, n, 1, generator=g, dtype=torch.float64) + 0.5
    ku, kb = [], []
    for i in range(reps):
        kxx, kyy, kxy = grams(x[i], y[i], b)
        ku.append(float(mmd2_unbiased(kxx, kyy, kxy)))
        kb.append(float(mmd2_biased(kxx, kyy, kxy)))
    se = np.std(ku) / math.sqrt(reps)
    assert abs(np.mean(ku) - truth) < 4 * se
    assert np.mean(kb) - truth > 10 * se  # the V-statistic's diagonal inflates it at small n
    # same distribution: mean zero
    z = torch.randn(reps, n, 1, generator=g, dtype=torch.float64)
    null = [float(mmd2_unbiased(*grams(x[i], z[i], b))) for i in range(reps)]
    assert abs(np.mean(null)) < 4 * np.std(null) / math.sqrt(reps)


@torch.no_grad()
def test_deep_kernel_closed_form_and_unit_diagonal():
    k = DeepKernel(1, 4, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        k.e_raw.fill_(0.0)     # e = 1/2
        k.s_raw.fill_(2.0)     # s = 4
        k.s0_raw.fill_(3.0)    # s0 = 9
    fa, fb = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    xa, xb = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    # [(1 - e) exp(-9/9) + e] * exp(-4/4)
    want = (0.5 * E(-1) + 0.5) * E(-1)
    assert float(k.gram_parts(fa, xa, fb, xb)) == pytest.approx(want, rel=1e-12)
    k.feature_only = True
    assert float(k.gram_parts(fa, xa, fb, xb)) == pytest.approx(E(-1), rel=1e-12)
    k.feature_only = False
    a = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    k.eval()
    assert torch.allclose(k.gram(a, a).diagonal(), torch.ones(6, dtype=torch.float64))


@torch.no_grad()
def test_init_follows_the_reference_code():
    k = DeepKernel(1, 8, generator=torch.Generator().manual_seed(0))
    assert float(k.s_raw) ** 2 == pytest.approx(2 * 8 * 8 * 100, rel=1e-5)
    assert float(k.s0_raw) ** 2 == pytest.approx(15, rel=1e-5)
    assert float(torch.sigmoid(k.e_raw)) < 0.01
    assert k.phi(torch.zeros(3, 1, 8, 8)).shape == (3, 300)


def test_training_raises_j_on_separable_sets():
    g = torch.Generator().manual_seed(0)
    nat = torch.randn(64, 1, 8, 8, generator=g)
    adv = [torch.randn(64, 1, 8, 8, generator=g) * 1.3 + 0.3, torch.randn(64, 1, 8, 8, generator=g) * 1.3 - 0.3]
    torch.manual_seed(0)
    k = DeepKernel(1, 8, m=0.05, generator=g)
    hist = train_deep_kernel(k, nat, adv, KernelTrainConfig(epochs=15, batch=32, lr=5e-3, seed=0))
    assert hist[-1] > hist[0]
    assert not k.training


def fitted(kind: str) -> tuple[EPSDetector, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    nat = torch.randn(40, 1, 8, 8, generator=g)
    adv = [nat + 0.5 * torch.randn(40, 1, 8, 8, generator=g)]
    det = EPSDetector(extractor=None, kind=kind, reference_size=30,
                      kernel=KernelTrainConfig(epochs=2, batch=16, seed=0), kernel_init={"m": 0.05})
    det.fit_features(nat, adv)
    return det, torch.randn(10, 1, 8, 8, generator=g)


@pytest.mark.parametrize("kind", ["deep", "gaussian"])
def test_detector_score_is_invariant_to_reference_order(kind):
    det, y = fitted(kind)
    s1 = det.score_features(y).detach()
    det.set_reference(det.reference[torch.randperm(det.reference.shape[0], generator=torch.Generator().manual_seed(9))])
    s2 = det.score_features(y).detach()
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-6)
    # the score is the biased MMD^2 between R and {y}
    ref = det.reference
    if kind == "gaussian":
        kxx, kyy, kxy = grams(ref.flatten(1), y[:1].flatten(1), det.bandwidth)
        assert float(s1[0]) == pytest.approx(float(mmd2_biased(kxx, kyy, kxy)), rel=1e-4, abs=1e-6)


def test_gaussian_bandwidth_is_the_median_squared_distance():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert median_bandwidth(x) == pytest.approx(4.0)  # distances^2: 1, 9, 4


def test_threshold_matches_tpr_at_fpr_rule():
    from bastion.metrics import tpr_at_fpr

    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=200), rng.normal(1.0, size=200)
    for fpr in (0.01, 0.05, 0.1):
        t = threshold_at_fpr(neg, fpr)
        assert np.mean(neg > t) <= fpr
        assert np.mean(pos > t) == pytest.approx(tpr_at_fpr(neg, pos, fpr))
