"""Anytime mode (one-sided threshold e-processes + decide-every-radius stopping, a confidence sequence
for the decline rule) and the randomized Clopper-Pearson option of exact mode: bounds, the guarantee
against a Bernoulli oracle and through the certifier, agreement with exact mode, reproducibility, exact
mode unchanged, and the run/CLI options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as st
from torch import nn

from bastion.errors import ConfigError
from certify.anytime import Anytime, AnytimeRun, BetaMixtureCS, ThresholdTests, exact_counts_needed, simulate
from certify.smoothing import Smooth
from certify.stats import ABSTAIN, cp_lower, rcp_lower


class Threshold(nn.Module):
    """f(z) = 0 if z < t else 1 on one pixel: P(f(x + eps) = 0) = Phi((t - x) / sigma), known."""

    def __init__(self, t: float):
        super().__init__()
        self.register_buffer("t", torch.tensor(float(t)))

    def forward(self, x):
        z = x.reshape(x.shape[0], -1)[:, :1]
        return torch.cat([self.t - z, z - self.t], dim=1)


# --- the confidence sequence ----------------------------------------------------------------------

def test_mixture_bounds_bracket_the_estimate_and_solve_the_boundary():
    cs = BetaMixtureCS()
    s = np.array([0, 1, 50, 99, 100, 9990, 100000])
    t = np.array([100, 100, 100, 100, 100, 10000, 100000])
    lo, up = cs.bounds(s, t, 0.001)
    assert np.all(lo <= s / t) and np.all(s / t <= up) and np.all((0 <= lo) & (up <= 1))
    assert lo[0] == 0.0 and up[-1] == 1.0
    inner = (s > 0) & (s < t)
    # M_t(L) = 1/alpha at the interior ends
    for b in (lo[inner], up[inner]):
        assert np.allclose(cs.log_m(s[inner], t[inner], b), math.log(1000), atol=1e-6)
    # wider than the fixed-n Clopper-Pearson bound (the price of validity at every t), but not absurdly
    for k, n in [(50, 100), (9990, 10000)]:
        l_cs = cs.bounds([k], [n], 0.001)[0][0]
        assert l_cs < cp_lower(k, n, 0.001) and cp_lower(k, n, 0.001) - l_cs < 2 * (k / n - cp_lower(k, n, 0.001))
    # all successes: the q = 1 atom reaches p after ~log(2 / (edge alpha)) / log(1/p) samples
    p = 0.99865
    need = math.log(2 / (0.5 * 0.001)) / -math.log(p)
    assert cs.bounds([math.ceil(need)], [math.ceil(need)], 0.001)[0][0] >= p
    assert cs.bounds([int(0.95 * need)], [int(0.95 * need)], 0.001)[0][0] < p


@pytest.mark.parametrize("p", [0.5, 0.8413447460685429, 0.99865])
@pytest.mark.parametrize("t", [1, 37, 400])
def test_threshold_tests_have_mean_at_most_one_under_the_null(p, t):
    # E[E_t] = sum of the weights (= 1) at pA = p, and <= 1 for pA on the null side: a supermartingale's bound
    tests = ThresholdTests()
    f = np.arange(t + 1)
    for up, nulls in ((True, [p, p - 0.01 * p]), (False, [p, p + 0.5 * (1 - p)])):
        log_e = tests.log_e(f, np.full(t + 1, t), np.full(t + 1, p), up=up)
        means = [float(np.exp(np.logaddexp.reduce(st.binom.logpmf(f, t, 1 - q) + log_e))) for q in nulls]
        assert means[0] == pytest.approx(1.0, abs=1e-9) and means[1] <= 1 + 1e-9, (up, means)
    # all successes: the atom at pA = 1 alone reaches 1/alpha after log(1 / (zero alpha)) / log(1/p) samples
    need = math.ceil(math.log(1 / (0.3 * 0.001)) / -math.log(0.99865))
    assert tests.log_e(0, need, 0.99865, up=True) >= math.log(1000) > tests.log_e(0, need // 2, 0.99865, up=True)
    with pytest.raises(ConfigError):
        ThresholdTests(ratios=(1.5,))


def test_exact_counts_needed_is_exact_modes_boundary():
    thr = np.array([0.5, st.norm.cdf(2), 0.99999])
    k = exact_counts_needed(thr, 10_000, 0.001)
    for p, kk in zip(thr, k):
        if kk <= 10_000:
            assert cp_lower(int(kk), 10_000, 0.001) >= p > cp_lower(int(kk) - 1, 10_000, 0.001)
    assert k[-1] == 10_001                       # beyond sigma Phi^-1(alpha^(1/n)): never


def test_schedule_thresholds_and_options():
    rule = Anytime(radii=(0.0, 0.25, 0.5), first=150, growth=1.5)
    sizes = rule.schedule(2000, 100)
    assert sizes[0] == 200 and sizes[-1] == 2000 and all(b > a for a, b in zip(sizes, sizes[1:]))
    assert all(s % 100 == 0 for s in sizes)
    assert np.allclose(rule.thresholds(0.25), [0.5, st.norm.cdf(1), st.norm.cdf(2)])
    for bad in (dict(growth=1.0), dict(final_share=1.0), dict(precision=0.0), dict(futility="x"), dict(futility=0.5),
                dict(radii=(-1,))):
        with pytest.raises(ConfigError):
            Anytime(**bad)


# --- the guarantee against a Bernoulli oracle (the same decision code as the certifier) -----------

@pytest.mark.parametrize("p_a", [0.5, 0.8413447460685429, 0.9, 0.9772498680518208, 0.995, 0.9999])
def test_wrong_decision_rate_is_at_most_alpha_on_the_oracle(p_a):
    alpha, seeds, n, sigma = 0.05, 400, 20_000, 0.25
    rule = Anytime(radii=(0.0, 0.25, 0.5, 0.75))
    r = simulate(rule, p_a, seeds, n, alpha, sigma, np.random.default_rng(int(p_a * 1e6)))
    k = int(r.wrong.sum())
    assert st.binom.sf(k - 1, seeds, alpha) > 1e-3, f"pA {p_a}: {k}/{seeds} wrong decisions at alpha {alpha}"
    assert r.samples.max() <= n
    if p_a in (0.9, 0.995, 0.9999):                   # away from every threshold: far fewer than n
        assert r.samples.mean() < 0.35 * n


def test_stopping_rule_decides_every_threshold():
    sigma, n = 0.25, 100_000
    rule = Anytime(radii=(0.0, 0.25, 0.5, 0.75, 1.0))
    run = AnytimeRun(rule, 3, n, 0.001, sigma, 100)
    # all successes: 0.75 (Phi(3)) certified after a few thousand; 1.0 (Phi(4)) unreachable at n = 1e5
    run.observe(np.array([0, 1, 2]), np.array([7000, 3000, 10]), np.array([7000, 7000, 100]))
    # 0.75 certified, 1.0 out of exact mode's reach at n (declined, not a bet): settled
    assert run.stopped[0] == "settled" and run.lower[0] == pytest.approx(st.norm.cdf(3)) and run.radius[0] == 0.75
    assert run.certified[0].tolist() == [True] * 4 + [False] and run.declined[0, 4]
    assert run.stopped[1] == "settled" and run.provably_not[1].all() and run.radius[1] == -1   # pA < 1/2: abstain
    assert run.stopped[2] == "settled" and run.provably_not[2].all()
    # 16,600 / 20,000 (0.83) vs Phi(1) = 0.841: not provably below, but exact mode at 1e5 would (w.h.p.)
    # not reach 0.841 -> declined (a bet on the remaining samples); Phi(2) and above: provably not
    run = AnytimeRun(rule, 1, n, 0.001, sigma, 100)
    run.observe(np.array([0]), np.array([16_600]), np.array([20_000]))
    assert run.certified[0, 0] and run.declined[0, 1] and run.provably_not[0, 2:].all()
    assert run.stopped[0] == "futile" and run.radius[0] == 0.0
    run = AnytimeRun(Anytime(radii=(0.0,)), 1, 1000, 0.001, sigma, 100)
    run.observe(np.array([0]), np.array([600]), np.array([1000]))
    assert run.stopped[0] == "final"


def test_declines_rarely_disagree_with_exact_mode_on_the_same_stream():
    # pA just above Phi(2): exact mode at n certifies r = 0.5 about half the time; a decline that
    # disagrees with it has probability <= 2 * futility (proof obligation 3)
    sigma, n, alpha, seeds = 0.25, 20_000, 0.001, 400
    p_a = 0.97725 + 3.09 * math.sqrt(0.97725 * 0.02275 / n)
    for fut in (0.0, 0.02):
        r = simulate(Anytime(radii=(0.0, 0.25, 0.5), futility=fut), p_a, seeds, n, alpha, sigma,
                     np.random.default_rng(7))
        lost = (r.declined & r.exact).any(axis=1).sum()
        assert st.binom.sf(lost - 1, seeds, 2 * fut) > 1e-3 if fut else lost == 0
        assert not (r.certified & ~r.exact).any()           # a test that passes at the cap, CP passes too


def test_precision_pins_the_radius_between_two_grid_points():
    sigma, n, alpha = 0.5, 20_000, 0.001
    rule = Anytime(radii=(0.0, 0.5), precision=0.1)
    assert np.allclose(rule.radius_grid(sigma, n, alpha)[:7], [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    r = simulate(rule, 0.87, 100, n, alpha, sigma, np.random.default_rng(3))
    true_r = sigma * st.norm.ppf(0.87)
    run_r = rule.radius_grid(sigma, n, alpha)
    got = run_r[r.certified.sum(axis=1) - 1]
    assert np.all(got <= true_r) and np.mean(got >= true_r - 0.1 - 1e-9) > 0.9


# --- through the certifier -----------------------------------------------------------------------

def _wrong(certs, p_a: float, sigma: float) -> int:
    true_r = sigma * st.norm.ppf(p_a)
    return sum(c.prediction != ABSTAIN and (c.prediction != 0 or c.radius > true_r + 1e-12) for c in certs)


def test_anytime_certifier_guarantee_samples_and_reproducibility():
    sigma, alpha, trials, p_a = 0.5, 0.05, 1500, 0.83
    s = Smooth(Threshold(sigma * st.norm.ppf(p_a)), 2, sigma, seed=5)
    xs = torch.zeros(trials, 1, 1, 1)
    rule = Anytime(radii=(0.0, 0.25))
    certs = s.certify_many(xs, list(range(trials)), 100, 4000, alpha, batch=50_000, anytime=rule)
    k = _wrong(certs, p_a, sigma)
    assert st.binom.sf(k - 1, trials, alpha) > 1e-3, f"{k}/{trials} wrong certificates"
    assert sum(c.prediction == 0 for c in certs) > 0.95 * trials
    # 0.83 is well above Phi(0.25 / 0.5) = 0.69: decided long before the cap
    assert np.mean([c.samples for c in certs]) < 0.25 * 4100
    assert {c.stopped for c in certs} == {"settled"}
    for c in certs:
        assert c.samples == c.n0 + c.n and c.looks >= 1 and c.n % 100 == 0
    again = s.certify_many(xs[:7], list(range(7)), 100, 4000, alpha, batch=333, anytime=rule)
    assert [(c.n_a, c.n, c.radius, c.stopped) for c in again] == [(c.n_a, c.n, c.radius, c.stopped)
                                                                  for c in certs[:7]]


def test_anytime_at_the_cap_sees_exact_modes_counts():
    # pA exactly at a threshold: undecidable, so examples run to the cap on exact mode's noise
    sigma = 0.5
    s = Smooth(Threshold(sigma * st.norm.ppf(0.7)), 2, sigma, seed=2)
    xs = torch.zeros(6, 1, 1, 1)
    radii = (0.0, sigma * st.norm.ppf(0.7))
    ex = s.certify_many(xs, list(range(6)), 100, 1000, 0.001, batch=700)
    at = s.certify_many(xs, list(range(6)), 100, 1000, 0.001, batch=700,
                        anytime=Anytime(radii=radii, futility=0.0))
    for a, b in zip(ex, at):
        if b.stopped == "final":
            assert (a.c_a, a.n_a, a.n) == (b.c_a, b.n_a, b.n)
        assert b.p_lower <= a.p_lower + 1e-12 or b.stopped != "final"
    assert any(b.stopped == "final" for b in at)


# --- randomized Clopper-Pearson (exact mode) --------------------------------------------------------

def test_randomized_clopper_pearson_is_exact_never_looser_and_seeded():
    rng = np.random.default_rng(0)
    n, alpha = 40, 0.05
    p, draws = 0.9, 4000
    x, u = rng.binomial(n, p, draws), rng.random(draws)
    lo = np.array([rcp_lower(a, n, alpha, b) for a, b in zip(x, u)])
    cp = np.array([cp_lower(a, n, alpha) for a in x])
    assert np.all(lo >= cp - 1e-12) and np.all(lo <= 1)
    sd = math.sqrt(alpha * (1 - alpha) / draws)
    assert abs((lo > p).mean() - alpha) < 4 * sd               # exact coverage ...
    assert (cp > p).mean() < alpha - 4 * sd                     # ... where Clopper-Pearson is conservative
    assert rcp_lower(7, 10, 0.05, 1.0) == pytest.approx(cp_lower(7, 10, 0.05))
    assert rcp_lower(7, 10, 0.05, 0.0) == pytest.approx(cp_lower(8, 10, 0.05))
    assert rcp_lower(10, 10, 0.05, 0.0) < 1.0
    model = Threshold(0.5 * st.norm.ppf(0.9))
    s = Smooth(model, 2, 0.5, seed=3)
    xs = torch.zeros(5, 1, 1, 1)
    a = s.certify_many(xs, list(range(5)), 100, 1000, 0.001, bound="randomized")
    b = s.certify_many(xs, list(range(5)), 100, 1000, 0.001, bound="randomized", batch=123)
    c = s.certify_many(xs, list(range(5)), 100, 1000, 0.001)
    assert [x.p_lower for x in a] == [x.p_lower for x in b]                      # seeded per example
    assert [x.n_a for x in a] == [x.n_a for x in c]                              # same noise as exact
    assert all(x.p_lower >= y.p_lower - 1e-12 for x, y in zip(a, c))
    with pytest.raises(Exception, match="exact mode"):
        s.certify_many(xs, list(range(5)), 100, 1000, 0.001, bound="randomized", anytime=Anytime())
    with pytest.raises(Exception, match="bound"):
        s.certify_many(xs, list(range(5)), 100, 1000, 0.001, bound="wilson")


# --- run options -------------------------------------------------------------------------------------

def test_certify_options_and_an_anytime_run(tmp_path):
    from bastion.data import load_dataset
    from certify.runner import CertifyOptions, Setting, run_certification

    assert CertifyOptions(anytime=True).mode == "anytime" and CertifyOptions().mode == "exact"
    for bad in (dict(anytime=True, sequential=True), dict(bound="randomized", anytime=True),
                dict(bound="x"), dict(precision=0.1)):
        with pytest.raises(ConfigError):
            CertifyOptions(**bad)
    data = load_dataset("synthetic", "test", seed=0, num_examples_total=16)
    model = Threshold(0.25 * st.norm.ppf(0.95))
    opts = CertifyOptions(n0=50, n=3000, alpha=0.01, batch=500, anytime=True, max_radius=0.5, shard_size=8)
    doc = run_certification([Setting("s", model, 0.25, 2)], data, tmp_path / "any", opts, quiet=True,
                            write_reports=False)
    from bastion.records import RunDir, parse_record

    recs = [parse_record(r) for r in RunDir(tmp_path / "any").records.unique()]
    assert len(recs) == len(data) and all(r.samples == r.n0 + r.n and r.samples <= 3050 for r in recs)
    assert sum(r.samples for r in recs) < 0.5 * len(data) * 3050
    assert doc["sections"][0]["data"]["mode"] == "anytime"
