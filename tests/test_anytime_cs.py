"""The decline rule's one-sided confidence sequence (`certify.anytime.UpperMixtureCS`): monotone in p
(so its upper end is well defined), valid at every sample count, and tighter than the two-sided one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st

from bastion.errors import ConfigError
from certify.anytime import BetaMixtureCS, ThresholdTests, UpperMixtureCS
from certify.stats import cp_lower


@pytest.mark.parametrize("s, t", [(0, 10), (5, 10), (990, 1000), (99_800, 100_000), (100, 100), (1, 1000)])
def test_log_e_is_nondecreasing_in_p(s, t):
    p = np.linspace(0.01, 0.999999, 5000)
    le = UpperMixtureCS().log_e(np.full_like(p, s), np.full_like(p, t), p)
    fin = np.isfinite(le)
    assert not np.any(fin[:-1] & ~fin[1:])            # once finite, it stays finite
    assert np.all(np.diff(le[fin]) >= -1e-9)


def test_upper_end_solves_the_boundary_and_brackets_the_estimate():
    cs = UpperMixtureCS()
    s = np.array([0, 50, 990, 99_800, 100])
    t = np.array([100, 100, 1000, 100_000, 100])
    lo, up = cs.bounds(s, t, 0.05)
    assert np.all(lo == 0) and np.all(s / t <= up) and up[-1] == 1.0
    inner = s < t
    assert np.allclose(cs.log_e(s[inner], t[inner], up[inner]), math.log(20), atol=1e-6)
    # a fixed-n one-sided bound is tighter (validity at every t costs), the two-sided sequence looser
    k, n = 99_800, 100_000
    cp_upper = 1 - cp_lower(n - k, n, 0.05)
    two_sided = BetaMixtureCS().bounds([k], [n], 0.05)[1][0]
    assert cp_upper < up[3] < two_sided
    # the same mixture as the down test of `ThresholdTests` where every ratio is possible (p > 0.95)
    assert cs.log_e(990, 1000, 0.999) == pytest.approx(float(ThresholdTests().log_e(10, 1000, 0.999, up=False)))
    with pytest.raises(ValueError):
        cs.bounds([5], [4], 0.05)
    for bad in (dict(zero=1.5), dict(ratios=(1.5,)), dict(ratios=())):
        with pytest.raises(ConfigError, match="ratios in"):
            UpperMixtureCS(**bad)


@pytest.mark.parametrize("p_a", [0.6, 0.99, 0.9995])
def test_upper_end_covers_pa_at_every_look(p_a):
    """P(exists a look with U_t < pA) <= alpha (Ville), on an oracle with 40 looks up to 20,000 samples."""
    rng = np.random.default_rng(int(p_a * 1e4))
    seeds, alpha, n = 300, 0.1, 20_000
    looks = np.unique(np.geomspace(50, n, 40).astype(int))
    s = np.cumsum(rng.random((seeds, n)) < p_a, axis=1)[:, looks - 1]
    up = UpperMixtureCS().bounds(s.ravel(), np.tile(looks, seeds), alpha)[1].reshape(seeds, -1)
    np.minimum.accumulate(up, axis=1, out=up)           # the rule keeps the running minimum
    misses = int((up < p_a).any(axis=1).sum())
    # <= alpha up to the sampling error of the seeds (binomial upper tail at 1e-3) ...
    assert st.binom.sf(misses - 1, seeds, alpha) > 1e-3, misses
    # ... which a fixed-n bound, looked at 40 times, does not meet (the check can fail)
    t = np.tile(looks, (seeds, 1))
    naive = 1 - st.beta.ppf(alpha, t - s, s + 1)
    assert st.binom.sf(int((naive < p_a).any(axis=1).sum()) - 1, seeds, alpha) < 1e-3
