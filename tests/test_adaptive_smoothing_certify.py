"""The mixed classifier's certificate (spec section 4): formulas, the exact Lipschitz bound of a linear
softmax base, CertifyRecords through the common evaluator, and soundness: l2 PGD inside 0.999 r(x)
flips no certified prediction for several alpha (while 3 r(x) sometimes does)."""

import math

import pytest
import torch
import torch.nn.functional as F

import defenses.mixing_training  # noqa: F401  (registers spectral_ce)
from bastion.data import load_dataset
from bastion.errors import ConfigError
from bastion.evaluate import CleanProbe, evaluate, section_data
from bastion.models import create_model
from bastion.records import RunDir, parse_record
from bastion.runner import RunOptions
from bastion.train import TrainConfig, create_objective, fit
from certify.adaptive import (
    LipschitzCertifyProbe,
    MixedSmoothingCertifier,
    linear_pairwise_lipschitz,
    lipschitz_radius,
    radius_pgd,
    smoothing_radius,
)
from defenses.adaptive_smoothing import MixedClassifier


def test_lipschitz_radius_formula():
    m = torch.tensor([0.9, 0.5, 0.1, 0.0])
    r = lipschitz_radius(m, 0.8, 2.0)
    want = (0.8 * m - 0.2) / (0.8 * 2.0)
    assert torch.allclose(r, want)
    assert (lipschitz_radius(m, 0.45, 2.0) < 0).all()  # alpha < 1/2: nothing certified
    assert torch.allclose(lipschitz_radius(m, 1.0, 2.0), m / 2.0)


def test_smoothing_radius_reduces_to_cohen_and_grows_with_alpha():
    from scipy.stats import norm

    pa, pb, s = 0.9, 0.1, 0.5
    assert smoothing_radius(pa, pb, 1.0, s) == pytest.approx(0.5 * s * (norm.ppf(pa) - norm.ppf(pb)))
    rs = [smoothing_radius(pa, pb, a, s) for a in (0.6, 0.8, 0.95, 1.0)]
    assert rs == sorted(rs)
    assert smoothing_radius(pa, pb, 0.4, s) < 0


def test_linear_bound_is_an_upper_bound_and_near_tight():
    torch.manual_seed(0)
    lin = create_model("mlp", 10, 1, 8, hidden=[], mean=[0.3], std=[0.4])
    L = linear_pairwise_lipschitz(lin, temperature=1.5)
    x = torch.rand(64, 1, 8, 8, requires_grad=True)
    p = F.softmax(1.5 * lin(x), dim=1)
    worst = 0.0
    for i, j in [(0, 1), (2, 5), (3, 9)]:
        (gr,) = torch.autograd.grad((p[:, i] - p[:, j]).sum(), x, retain_graph=True)
        worst = max(worst, float(gr.flatten(1).norm(dim=1).max()))
    assert worst <= L + 1e-6
    with pytest.raises(ConfigError):
        linear_pairwise_lipschitz(create_model("small_cnn", 10, 1, 8, width=4))


@pytest.fixture(scope="module")
def cert_models():
    train = load_dataset("digits", "train")
    torch.manual_seed(0)
    g = create_model("small_cnn", 10, 1, 8, width=16)
    fit(g, train, create_objective("standard"), TrainConfig(epochs=6, batch_size=64, lr=0.05), quiet=True)
    torch.manual_seed(0)
    lin = create_model("mlp", 10, 1, 8, hidden=[])
    fit(lin, train, create_objective("spectral_ce", penalty=0.05),
        TrainConfig(epochs=15, batch_size=64, optimizer="adam", lr=1e-2, weight_decay=0.0), quiet=True)
    return g.eval(), lin.eval()


def test_certificate_is_never_violated(tmp_path, cert_models):
    g, lin = cert_models
    data = load_dataset("digits", "test").every(2, 120)
    L = linear_pairwise_lipschitz(lin)
    alphas = (0.6, 0.8, 0.95)
    probes = [LipschitzCertifyProbe(L, alpha=a, name=f"lip-a{a:g}", max_radius=1.0) for a in alphas]
    doc = evaluate(MixedClassifier(g, lin, alpha=0.5), data, [CleanProbe()] + probes, tmp_path / "run", {"c": 1},
                   opts=RunOptions(batch_size=60), write_reports=True)
    cert = section_data(doc, "certification")
    assert [s["name"] for s in cert["settings"]] == [p.name for p in probes]
    accs = [s["certified_accuracy"][0] for s in cert["settings"]]
    assert accs == sorted(accs) and accs[-1] > 0.5  # a larger alpha certifies more
    recs = [parse_record(r) for r in RunDir(tmp_path / "run").records.unique() if r["kind"] == "certify"]
    pos = {int(i): k for k, i in enumerate(data.indices.tolist())}
    flips_far = 0
    checked = 0
    for p in probes:
        mine = [r for r in recs if r.probe == p.name and r.radius > 0]
        sel = torch.tensor([pos[r.index] for r in mine])
        x, y = data.images[sel], torch.tensor([r.pred for r in mine])
        radii = torch.tensor([r.radius for r in mine])
        model = MixedClassifier(g, lin, alpha=p.alpha).eval()
        with torch.no_grad():
            assert (model(x).argmax(1) == y).all()
        near = radius_pgd(model, x, y, 0.999 * radii, steps=50, restarts=2, generator=torch.Generator().manual_seed(1))
        assert int(near.sum()) == 0, f"certificate violated at alpha={p.alpha}"
        far = radius_pgd(model, x, y, 3 * radii, steps=50, restarts=1, generator=torch.Generator().manual_seed(2))
        flips_far += int(far.sum())
        checked += len(mine)
    assert checked > 100 and flips_far > 0  # sound, and not vacuous


def test_smoothing_certifier_through_run_certification(tmp_path, cert_models):
    from certify.runner import CertifyOptions, Setting, run_certification
    from certify.smoothing import Smooth

    g, lin = cert_models
    data = load_dataset("digits", "test").every(45, 10)
    smooth = Smooth(lin, 10, 0.25, seed=0)
    settings = [Setting(f"mixed-rs-a{a:g}", lin, 0.25, 10) for a in (1.0, 0.8)]
    certifiers = {s.name: MixedSmoothingCertifier(smooth, float(s.name.split("-a")[1])) for s in settings}
    doc = run_certification(settings, data, tmp_path / "rs", CertifyOptions(n0=20, n=200, batch=200, max_radius=0.5),
                            quiet=True, write_reports=False, certifiers=certifiers)
    st = {s["name"]: s for s in section_data(doc, "certification")["settings"]}
    assert st["mixed-rs-a1"]["acr"] >= st["mixed-rs-a0.8"]["acr"]
    assert not math.isnan(st["mixed-rs-a0.8"]["acr"])
