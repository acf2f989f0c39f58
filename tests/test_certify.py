"""Randomized smoothing: statistics against SciPy, logs, noise, the empirical guarantee (exact and
sequential), PREDICT, Gaussian-augmentation training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as st
from torch import nn

from certify.logs import (
    CERTIFY_HEADER,
    TsvLog,
    certify_line,
    format_radius,
    format_time,
    parse_time,
    predict_line,
    read_log,
)
from certify.smoothing import NOISE_BLOCK, Sequential, Smooth
from certify.stats import (
    ABSTAIN,
    certify_decision,
    cp_lower,
    cp_upper,
    max_radius,
    predict_decision,
    predict_pvalue,
    radius,
)

# --- a table of counts, with reference values computed here from SciPy ---------------------------

COUNTS = [(0, 1), (1, 1), (0, 100), (1, 100), (50, 100), (51, 100), (67, 100), (100, 100), (500, 1000),
          (800, 1000), (999, 1000), (1000, 1000), (5000, 10000), (9990, 10000), (10000, 10000),
          (50489, 100000), (50490, 100000), (70000, 100000), (99999, 100000), (100000, 100000)]
ALPHAS = [0.001, 0.01, 0.05]
SIGMAS = [0.12, 0.25, 0.5, 1.0]


def _ref_lower(k: int, n: int, a: float) -> float:
    return 0.0 if k == 0 else float(st.beta.ppf(a, k, n - k + 1))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_clopper_pearson_matches_scipy_table(alpha):
    for k, n in COUNTS:
        lo = cp_lower(k, n, alpha)
        assert lo == pytest.approx(_ref_lower(k, n, alpha), abs=1e-9)
        # the same number three other ways: two-sided exact interval at 1 - 2 alpha, and the
        # defining tail equation P(Bin(n, p_lower) >= k) = alpha
        ci = st.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
        assert lo == pytest.approx(ci.low, abs=1e-9)
        if 0 < k:
            assert st.binom.sf(k - 1, n, lo) == pytest.approx(alpha, rel=1e-6)
        # NOT the two-sided interval at 1 - alpha (the frequent bug): that one is lower
        if 0 < k < n:
            wrong = st.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact").low
            assert wrong < lo
        up = cp_upper(k, n, alpha)
        assert up == pytest.approx(1.0 if k == n else st.beta.ppf(1 - alpha, k + 1, n - k), abs=1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_radius_and_abstention_match_scipy_table(alpha):
    for k, n in COUNTS:
        lo = _ref_lower(k, n, alpha)
        for sigma in SIGMAS:
            pred, rad, pl = certify_decision(3, k, n, alpha, sigma)
            assert pl == pytest.approx(lo, abs=1e-9)
            if lo < 0.5:
                assert (pred, rad) == (ABSTAIN, 0.0)
            else:
                assert pred == 3
                assert rad == pytest.approx(sigma * st.norm.ppf(lo), abs=1e-9)
                assert isinstance(rad, float)


def test_boundary_cases_from_the_spec():
    # pA_lower == 0.5 exactly is not an abstention (radius 0)
    import certify.stats as cs

    orig = cs.cp_lower
    try:
        cs.cp_lower = lambda *a: 0.5
        assert cs.certify_decision(1, 5, 10, 0.1, 0.25)[:2] == (1, 0.0)
        cs.cp_lower = lambda *a: math.nextafter(0.5, 0)
        assert cs.certify_decision(1, 5, 10, 0.1, 0.25)[:2] == (ABSTAIN, 0.0)
    finally:
        cs.cp_lower = orig
    assert radius(0.5, 0.5) == 0.0
    # n = 1e5, alpha = 0.001: abstains unless nA >= 50,490
    assert certify_decision(0, 50489, 100000, 0.001, 0.25)[0] == ABSTAIN
    assert certify_decision(0, 50490, 100000, 0.001, 0.25)[0] == 0
    # the largest reportable radius
    for n, ratio in [(100_000, 3.811), (10_000, 3.199), (1_000, 2.463), (100, 1.500)]:
        assert max_radius(1.0, n, 0.001) == pytest.approx(ratio, abs=5e-4)
        assert max_radius(0.5, n, 0.001) == pytest.approx(certify_decision(0, n, n, 0.001, 0.5)[1], abs=1e-12)


def test_predict_matches_scipy_binomtest():
    rng = np.random.default_rng(0)
    for alpha in ALPHAS:
        for _ in range(60):
            n = int(rng.choice([10, 100, 1000, 10000]))
            k = int(rng.integers(3, 12))
            counts = rng.multinomial(n, rng.dirichlet(np.full(k, 0.3)))
            order = sorted(range(k), key=lambda c: (-counts[c], c))
            n1, n2 = int(counts[order[0]]), int(counts[order[1]])
            p = st.binomtest(n1, n1 + n2, 0.5).pvalue
            pred, pv = predict_decision(counts, alpha)
            assert pv == pytest.approx(p, abs=1e-9)
            assert pred == (ABSTAIN if p > alpha else order[0])
    # spec facts (alpha = 0.001): n = 10 never returns a class; n1 + n2 = 100 needs n1 >= 67
    assert predict_decision([10, 0, 0], 0.001)[0] == ABSTAIN
    assert predict_decision([67, 33], 0.001)[0] == 0 and predict_decision([66, 34], 0.001)[0] == ABSTAIN
    # ties between the top two go to the smaller class index and can never be significant
    assert predict_decision([0, 40, 40], 0.5)[0] == ABSTAIN
    assert predict_pvalue(0, 0) == 1.0


# --- logs ----------------------------------------------------------------------------------------

def test_radius_and_time_formats():
    for r, s in [(0.0, "0.0"), (0.378123, "0.378"), (0.0451234, "0.0451"), (3.8106, "3.81"), (0.99951, "1.0")]:
        assert format_radius(r) == s
    assert format_time(15.4) == "0:00:15.400000"
    assert parse_time("0:00:15.400000") == pytest.approx(15.4)
    assert parse_time("15.4") == pytest.approx(15.4)
    assert parse_time("1 day, 2:03:04.5") == pytest.approx(86400 + 7384.5)
    assert certify_line(7, 3, 3, 0.378123, 1.5) == "7\t3\t3\t0.378\t1\t0:00:01.500000"
    assert certify_line(7, 3, -1, 0.0, 1.5).split("\t")[2:5] == ["-1", "0.0", "0"]
    assert predict_line(7, 3, 2, 0.25) == "7\t3\t2\t0\t0:00:00.250000"


def test_tsv_log_flushes_rows_and_reads_published_formats(tmp_path):
    p = tmp_path / "log.tsv"
    log = TsvLog(p, CERTIFY_HEADER)
    log.append(certify_line(0, 1, 1, 0.5, 2.0))
    assert p.read_text().splitlines() == [CERTIFY_HEADER, "0\t1\t1\t0.5\t1\t0:00:02"]
    with open(p, "a") as f:
        f.write("20\t3\t-1\t0.0\t0\t15.4\n21\t3\t3")   # plain seconds, then a torn line
    TsvLog(p, CERTIFY_HEADER)
    rows = read_log(p)
    assert [r["idx"] for r in rows] == [0, 20] and rows[1]["time"] == pytest.approx(15.4)
    assert rows[0]["time"] == pytest.approx(2.0)


# --- noise and sampling --------------------------------------------------------------------------

def _model():
    from bastion.models import create_model

    torch.manual_seed(0)
    return create_model("mlp", num_classes=4, in_channels=1, image_size=8, hidden=(32,)).eval()


def test_counts_do_not_depend_on_batching_or_grouping():
    model = _model()
    s = Smooth(model, 4, 0.5, seed=3)
    xs = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = s.certify_many(xs, [10, 11, 12], 50, 1234, 0.01, batch=1000)
    b = s.certify_many(xs[1:2], [11], 50, 1234, 0.01, batch=37)            # alone, odd batch size
    c = s.certify_many(xs.flip(0), [12, 11, 10], 50, 1234, 0.01, batch=250)
    assert (a[1].n_a, a[1].c_a, a[1].radius) == (b[0].n_a, b[0].c_a, b[0].radius)
    assert [(r.n_a, r.c_a) for r in a] == [(r.n_a, r.c_a) for r in c[::-1]]
    counts = s.sample_counts(xs[0], 1234, batch=99, index=10, stage="estimate")
    assert counts.sum() == 1234 and counts[a[0].c_a] == a[0].n_a
    sel = s.sample_counts(xs[0], 50, batch=1000, index=10, stage="select")
    assert sel.sum() == 50 and sel.argmax() == a[0].c_a
    # calls without an index get a fresh noise key each time
    assert s._fresh_key() != s._fresh_key()
    # selection and estimation noise (and different examples) come from different seeds
    g1 = s.sampler
    assert g1.block_seed(10, "select", 0) != g1.block_seed(10, "estimate", 0)
    assert g1.block_seed(10, "estimate", 0) != g1.block_seed(11, "estimate", 0)


def test_noise_is_gaussian_with_sigma_and_added_in_pixel_space():
    captured = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            captured.append(x.clone())
            return torch.zeros(x.shape[0], 2)

    x = torch.full((1, 2, 4, 4), 0.3)
    Smooth(Spy(), 2, 0.25, seed=0).sample_counts(x, 2000, batch=512, index=0)
    z = (torch.cat(captured) - 0.3).flatten().double()
    assert z.numel() == 2000 * 32
    assert abs(float(z.mean())) < 0.005 and float(z.std()) == pytest.approx(0.25, rel=0.01)
    assert st.kstest((z / 0.25).numpy()[:20000], "norm").pvalue > 1e-3


def test_smooth_certify_and_predict_api():
    model = _model()
    s = Smooth(model, 4, 0.25)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(2))
    pred, rad = s.certify(x, 100, 2000, 0.001, 500, index=5)
    again = s.certify(x, 100, 2000, 0.001, 500, index=5)
    assert (pred, rad) == again
    assert pred == ABSTAIN and rad == 0.0 or rad >= 0.0
    p = s.predict(x, 1000, 0.001, 500, index=5)
    assert p in (ABSTAIN, 0, 1, 2, 3)
    with pytest.raises(Exception, match="alpha"):
        s.certify(x, 100, 1000, 1.5, 100)
    with pytest.raises(Exception, match="classes"):
        Smooth(model, 7, 0.25).certify(x, 10, 100, 0.1, 100)


# --- the guarantee, empirically -------------------------------------------------------------------

class Threshold(nn.Module):
    """f(z) = 0 if z < t else 1 on a single pixel: P(f(x + eps) = 0) = Phi((t - x) / sigma), known."""

    def __init__(self, t: float):
        super().__init__()
        self.register_buffer("t", torch.tensor(float(t)))

    def forward(self, x):
        z = x.reshape(x.shape[0], -1)[:, :1]
        return torch.cat([self.t - z, z - self.t], dim=1)


def _wrong(certs, p_true: dict[int, float], sigma: float) -> float:
    bad = 0
    for c in certs:
        if c.prediction == ABSTAIN:
            continue
        # wrong: the certified class is not g(x), or the radius is larger than the true one
        if c.p_lower > p_true[c.prediction] or c.radius > sigma * st.norm.ppf(p_true[c.prediction]) + 1e-12:
            bad += 1
    return bad / len(certs)


@pytest.mark.parametrize("mode", ["exact", "sequential"])
def test_wrong_certificate_rate_is_at_most_alpha(mode):
    sigma, alpha, trials = 0.5, 0.05, 3000
    p_a = 0.83
    model = Threshold(sigma * st.norm.ppf(p_a))
    s = Smooth(model, 2, sigma, seed=11)
    xs = torch.zeros(trials, 1, 1, 1)
    seq = Sequential(stop_radius=0.3, start=100, radii=(0.0, 0.1, 0.2, 0.3)) if mode == "sequential" else None
    certs = s.certify_many(xs, list(range(trials)), 100, 1600, alpha, batch=100_000, sequential=seq)
    rate = _wrong(certs, {0: p_a, 1: 1 - p_a}, sigma)
    # at or below alpha up to sampling error of the 3000 trials (one-sided binomial test at 1e-3)
    k = round(rate * trials)
    assert st.binom.sf(k - 1, trials, alpha) > 1e-3, f"{mode}: wrong-certificate rate {rate:.4f} > alpha {alpha}"
    certified = [c for c in certs if c.prediction == 0]
    assert len(certified) > 0.9 * trials
    # the test has power: the naive plug-in estimate nA/n would be "wrong" about half the time
    naive = np.mean([c.n_a / c.n > p_a for c in certs])
    assert naive > 0.3
    if mode == "sequential":
        assert np.mean([c.samples for c in certs]) < 0.6 * (100 + 1600)
        assert {c.stopped for c in certs} >= {"settled"}


def test_sequential_schedule_and_alpha_split():
    seq = Sequential(stop_radius=0.5, start=1000)
    sizes = seq.schedule(100_000)
    assert sizes == [1000, 2000, 4000, 8000, 16000, 32000, 64000, 100000]
    al = seq.alphas(0.001, len(sizes))
    assert math.isclose(sum(al), 0.001) and al[-1] == 0.0005
    assert Sequential(0.5, start=150).schedule(1000, NOISE_BLOCK) == [200, 400, 800, 1000]
    assert Sequential(0.5).alphas(0.01, 1) == [0.01]


def test_sequential_agrees_with_exact_when_it_runs_to_the_end():
    # pA in the middle: never settled at a huge stop radius, never futile -> same counts as exact
    sigma = 0.5
    model = Threshold(sigma * st.norm.ppf(0.7))
    s = Smooth(model, 2, sigma, seed=1)
    xs = torch.zeros(20, 1, 1, 1)
    ex = s.certify_many(xs, list(range(20)), 100, 3200, 0.001, batch=1000)
    sq = s.certify_many(xs, list(range(20)), 100, 3200, 0.001, batch=1000, sequential=Sequential(10.0, start=100))
    for a, b in zip(ex, sq):
        assert (a.c_a, a.n_a, a.n) == (b.c_a, b.n_a, b.n) and b.looks == 6
        assert b.p_lower <= a.p_lower + 1e-12 or b.stopped == "final"


# --- Gaussian augmentation -------------------------------------------------------------------------

def test_gaussian_objective_adds_fresh_noise_before_normalization(synthetic_train):
    import defenses.gaussian  # noqa: F401
    from bastion.train import StepContext, TrainConfig, create_objective, fit

    obj = create_objective("gaussian", sigma=0.25)
    assert obj.config() == {"objective": "gaussian", "sigma": 0.25}
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 4)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.lin(x.flatten(1))

    g = torch.Generator().manual_seed(0)
    ctx = StepContext(0, 0, 1, 1, g)
    x, y = synthetic_train.images[:64], synthetic_train.labels[:64]
    obj(Spy(), x, y, ctx)
    obj(Spy(), x, y, ctx)
    d1, d2 = seen[0] - x, seen[1] - x
    assert float(d1.std()) == pytest.approx(0.25, rel=0.05) and not torch.equal(d1, d2)
    with pytest.raises(Exception, match="sigma"):
        create_objective("gaussian", sigma=0)
    model = _model()
    res = fit(model, synthetic_train, obj, TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=0), quiet=True)
    assert len(res.history) == 2 and res.history[-1]["train_loss"] > 0
