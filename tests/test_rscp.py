"""RSCP / RSCP+ bounds and thresholds, the smoothed score, PTT and the RCT objective
(certify.rscp), against values computed independently (the spec's numbers, scipy, by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from bastion.errors import ConfigError
from certify.conformal import APS, HPS
from certify.rscp import (
    PTTScore,
    SmoothedScore,
    bernstein_width,
    hoeffding_width,
    prepare_rct,
    ptt_reference,
    rscp_bound,
    rscp_plus_bound,
    shifted_limit,
)


def test_hoeffding_and_bernstein_widths_match_the_spec():
    assert hoeffding_width(256, 1e-3) == pytest.approx(0.116154, abs=5e-7)
    for n, w in ((64, 0.232), (1024, 0.058), (4096, 0.029)):
        assert hoeffding_width(n, 1e-3) == pytest.approx(w, abs=6e-4)
    assert float(bernstein_width(0.0, 256, 1e-3)) == pytest.approx(0.0696, abs=5e-5)
    v = 0.04
    assert float(bernstein_width(v, 256, 1e-3)) == pytest.approx(
        math.sqrt(2 * v * math.log(2000) / 256) + 7 * math.log(2000) / (3 * 255), rel=1e-12)
    with pytest.raises(ConfigError):
        hoeffding_width(0, 1e-3)


def test_rscp_plus_threshold_and_limit_computed_independently():
    n = 348
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cal = torch.linspace(0.0, 0.5, n, dtype=torch.float64)[perm]
    k = -(-(n + 1) * 902 // 1000)            # ceil((n+1)(1 - 0.1 + 2 * 0.001)) in integers
    tau_expected = sorted(cal.tolist())[k - 1]
    tau, lim = rscp_plus_bound(cal, 0.1, 0.125, 0.25, 256, 1e-3)
    assert tau == pytest.approx(tau_expected, abs=0)
    b_h = math.sqrt(math.log(1000) / 512)
    assert lim == pytest.approx(norm.cdf(norm.ppf(tau_expected + b_h) + 0.5), rel=1e-10)
    # tau+ + b_H >= 1: the full label set (U = 1)
    tau2, lim2 = rscp_plus_bound(torch.full((100,), 0.9, dtype=torch.float64), 0.1, 0.125, 0.25, 256, 1e-3)
    assert tau2 == 0.9 and lim2 == 1.0
    # RSCP (Gendler): 1 - alpha order statistic, no b_H
    k1 = -(-(n + 1) * 9 // 10)
    t1, l1 = rscp_bound(cal, 0.1, 0.125, 0.25)
    assert t1 == sorted(cal.tolist())[k1 - 1]
    assert l1 == pytest.approx(norm.cdf(norm.ppf(t1) + 0.5), rel=1e-10)
    assert shifted_limit(0.0, 0.5) == 0.0 and shifted_limit(1.0, 0.5) == 1.0
    with pytest.raises(ConfigError):
        rscp_plus_bound(cal, 0.1, 0.125, 0.25, 256, beta=0.06)


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 4, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_smoothed_score_mean_and_variance_by_hand():
    model = _Lin().double()
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    n, sigma = 64, 0.25
    sm = SmoothedScore(model, {"hps": HPS(), "aps": APS()}, sigma, n_mc=n, batch=10_000)
    est = sm(x, torch.Generator().manual_seed(3), u)
    noise = torch.randn((5 * n, 1, 2, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        p = torch.softmax(model(x.repeat_interleave(n, 0) + sigma * noise), 1).view(5, n, 3)
    hps = 1 - p
    assert torch.allclose(est.mean["hps"], hps.mean(1)) and torch.allclose(est.var["hps"], hps.var(1))
    # APS by hand for one example and one draw: mass of labels with larger probability + u * own
    pe = p[2, 7]
    for c in range(3):
        above = sum(float(pe[j]) for j in range(3) if pe[j] > pe[c] or (pe[j] == pe[c] and j < c))
        manual = above + float(u[2]) * float(pe[c])
        assert APS().from_probs(pe.view(1, 3), u[2:3])[0, c].item() == pytest.approx(manual)
    assert torch.allclose(est.probs, p.mean(1))
    assert torch.allclose(est.bound("hps", n, 1e-3), bernstein_width(hps.var(1), n, 1e-3))


def test_smoothed_score_refuses_unbounded_scores():
    from certify.conformal import RAPS

    with pytest.raises(ConfigError):
        SmoothedScore(_Lin(), {"raps": RAPS(scaled=False)}, 0.25, 16)


def test_ptt_rank_and_sigmoid():
    ref = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    t = PTTScore(HPS(), ref, b=0.9, temperature=1 / 400)
    s = torch.tensor([0.05, 0.1, 0.25, 0.4, 0.9], dtype=torch.float64)
    assert t.rank(s).tolist() == [0.0, 0.25, 0.5, 1.0, 1.0]           # |{r_i <= s}| / m, right-continuous
    expected = [1 / (1 + math.exp(-(q - 0.9) * 400)) for q in (0.0, 0.25, 0.5, 1.0, 1.0)]
    assert t.transform(s).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert bool((t.transform(s).diff() >= 0).all())                    # monotone in the score
    assert t.name == "ptt-hps" and t.range == (0.0, 1.0)


def test_ptt_reference_is_one_draw_of_the_true_label_score():
    model = _Lin()
    x = torch.rand(20, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(5))
    ref = ptt_reference(model, HPS(), x, y, 0.25, torch.Generator().manual_seed(6))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        manual = 1 - torch.softmax(model(x + 0.25 * noise).double(), 1)[torch.arange(20), y]
    assert torch.allclose(ref, manual.sort().values)


def test_rct_objective_trains_only_the_head():
    import certify.rscp  # noqa: F401  (registers "rct")
    from bastion.data import load_dataset
    from bastion.models import create_model
    from bastion.train import TrainConfig, create_objective, fit

    with pytest.raises(ConfigError):
        create_objective("rct", temperature=0)
    with pytest.raises(ConfigError):
        create_objective("rct", bogus=1)
    data = load_dataset("synthetic", "train", num_examples_total=64)
    torch.manual_seed(0)
    model = create_model("mlp", 4, 1, 8, hidden=(16,))
    prepare_rct(model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = create_objective("rct", sigma=0.25, eps=0.125, n_train=4)
    res = fit(model, data, obj, TrainConfig(epochs=2, batch_size=32, lr=0.05), quiet=True)
    after = res.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.3.weight", "net.3.bias"}, changed   # Flatten, Linear, ReLU, Linear: the head
    assert math.isfinite(res.history[-1]["train_loss"])
    assert obj.config()["objective"] == "rct"
