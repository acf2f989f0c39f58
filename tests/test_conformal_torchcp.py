"""Plain split conformal gives TorchCP 1.2.1's thresholds and prediction sets (THR/LAC, APS, RAPS,
randomization off) on the same logits.

TorchCP is a dev dependency (``pip install --no-deps torchcp==1.2.1``). Its top-level package
imports optional extras (torchsort for its training losses, torch_geometric for graph
predictors); when those are missing we load only ``torchcp.classification.score`` and
``.predictor`` (its own code, unmodified) without running the top-level ``__init__``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from certify.conformal import APS, HPS, RAPS, SplitConformal

# TorchCP 1.2.1 warns that its SplitPredictor's temperature argument is deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
_LOADED: list = []


def _torchcp():
    if _LOADED:
        return _LOADED[0]
    spec = importlib.util.find_spec("torchcp")
    if spec is None:
        pytest.skip("torchcp is not installed (dev dependency: pip install --no-deps torchcp==1.2.1)")
    try:
        score = importlib.import_module("torchcp.classification.score")
        pred = importlib.import_module("torchcp.classification.predictor")
    except ImportError:
        # optional extras missing: bypass the package __init__ files that import them
        for name in [m for m in sys.modules if m == "torchcp" or m.startswith("torchcp.")]:
            del sys.modules[name]
        root = spec.submodule_search_locations[0]
        for name, path in (("torchcp", root), ("torchcp.classification", root + "/classification")):
            m = types.ModuleType(name)
            m.__path__ = [path]
            sys.modules[name] = m
        score = importlib.import_module("torchcp.classification.score")
        pred = importlib.import_module("torchcp.classification.predictor")
    from importlib.metadata import version

    if version("torchcp") != "1.2.1":
        pytest.skip(f"this check pins torchcp 1.2.1, found {version('torchcp')}")
    _LOADED.append((score, pred))
    return score, pred


@pytest.mark.parametrize("n_cal", [100, 500, 564, 1000])
def test_same_thresholds_and_sets_as_torchcp(n_cal):
    score, pred = _torchcp()
    g = torch.Generator().manual_seed(n_cal)
    logits = torch.randn(n_cal + 400, 10, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    cal, test = slice(0, n_cal), slice(n_cal, None)
    pairs = [(score.LAC(), HPS()), (score.APS(randomized=False), APS(randomized=False)),
             (score.RAPS(randomized=False, penalty=0.2, kreg=3), RAPS(penalty=0.2, kreg=3, randomized=False,
                                                                      scaled=False))]
    for theirs, ours in pairs:
        tp = pred.SplitPredictor(theirs, alpha=0.1)
        tp.calculate_threshold(logits[cal], labels[cal], alpha=0.1)
        cp = SplitConformal(ours, alpha=0.1)
        cp.calibrate(logits[cal], labels[cal])
        # TorchCP adds RAPS's penalty in float32 (1e-8 differences); the order statistic is the same
        assert cp.q_hat == pytest.approx(float(tp.q_hat), rel=1e-6), type(theirs).__name__
        k = torch.searchsorted(cp.cal_scores.sort().values, torch.tensor(cp.q_hat, dtype=torch.float64), right=True)
        assert int(k) == -(-(n_cal + 1) * 9 // 10)  # both take the ceil((n+1)(1-alpha))-th smallest
        mine = cp.predict(logits[test])
        assert torch.equal(mine, tp.predict_with_logits(logits[test]).bool()), type(theirs).__name__
        # the scaled RAPS (in [0, 1] for the MC bounds) gives the same sets
        if isinstance(ours, RAPS):
            scaled = SplitConformal(RAPS(penalty=0.2, kreg=3, randomized=False, scaled=True), alpha=0.1)
            scaled.calibrate(logits[cal], labels[cal])
            assert torch.equal(scaled.predict(logits[test]), mine)
