"""Native Square (L-inf, L2): inside the ball, AutoAttack's schedule, the same search as pyautoattack's
Square (identical points when both draw the same random numbers), as strong on the same model
(averaged over seeds: the random search varies a lot per seed)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from attacks import create_attack
from attacks.square import _randint, _signs, eta, p_selection
from bastion.data import load_dataset
from bastion.errors import ConfigError
from bastion.models import create_model
from bastion.threat import ThreatModel
from bastion.train import StandardObjective, TrainConfig, fit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    m = create_model("mlp", 10, 1, 8, hidden=(64,))
    cfg = TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=1e-2, weight_decay=0.0,
                      schedule="constant", seed=0)
    return fit(m, load_dataset("digits", "train"), StandardObjective(), cfg, quiet=True).model.eval()


def test_schedule_is_autoattacks():
    assert [p_selection(0.8, i, 5000) for i in (0, 10, 11, 50, 51, 9000)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512]
    assert p_selection(0.8, 100, 1000, rescale=True) == 0.8 / 16


def test_square_bounded_and_as_strong_as_pyautoattack(mlp):
    from pyautoattack import AutoAttack

    te = load_dataset("digits", "test")
    x, y = te.images[:150], te.labels[:150]
    threat = ThreatModel.parse("linf:0.1")
    ours, theirs = [], []
    for seed in range(4):
        res = create_attack("square", threat, n_queries=150, seed=seed).run(mlp, x, y)
        threat.check(x, res.x_adv)
        assert torch.equal(res.success, mlp(res.x_adv).argmax(1) != y)
        ours.append((mlp(res.x_adv).argmax(1) == y).float().mean().item())
        aa = AutoAttack(mlp, attacks=["square"], version="custom", eps=0.1, seed=seed)
        aa.square.n_queries = 150
        with torch.random.fork_rng():
            xa, _ = aa.run_standard_evaluation(x, y)
        theirs.append((mlp(xa).argmax(1) == y).float().mean().item())
    mo, mt = sum(ours) / 4, sum(theirs) / 4
    assert mo <= mt + 0.03, (ours, theirs)
    stronger = create_attack("square", threat, n_queries=150, shared_signs=False).run(mlp, x, y)
    assert (mlp(stronger.x_adv).argmax(1) == y).float().mean().item() <= mo


def test_square_refuses_other_norms():
    with pytest.raises(ConfigError, match="linf and l2"):
        create_attack("square", "l1:0.5")
    assert create_attack("square", "linf:0.1").gradient_free


def test_l2_bump_is_autoattacks():
    e = eta(5)
    assert abs(float(e.pow(2).sum()) - 1) < 1e-12
    assert bool((e[:2] > 0).all()) and bool((e[2:] < 0).all())
    assert float(e[1, 2]) == float(e[:2].max()) and float(e[3, 2]) == float(e[2:].min())  # centred peaks


def _scripted_pyautoattack(norm: str, eps: float, n_queries: int, model, g: torch.Generator):
    """pyautoattack's SquareAttack drawing its random numbers from ``g`` in the order native Square does."""
    import pyautoattack.square as pas

    sq = pas.SquareAttack(model, norm=norm, eps=eps, n_queries=n_queries, resc_schedule=False)
    sq.random_int = lambda low=0, high=1, shape=(1,): torch.tensor([low + _randint(high - low, g)])
    sq.random_choice = lambda shape: _signs(tuple(shape), g, torch.zeros(1))
    fake = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fake.rand = lambda *a, **k: torch.tensor([float(_randint(2, g))])  # eta's transpose coin
    return sq, pas, fake


@pytest.mark.parametrize("threat", ["l2:0.3", "linf:0.03"])
def test_square_is_pyautoattacks_search(threat):
    """Same random numbers -> the same points as pyautoattack's attack_single_run (15x15 RGB:
    L2 windows of side 3 at init, 13 -> 3 during the search)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 15 * 15, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(24, 3, 15, 15)
    y = model(x).argmax(1)
    norm, eps = ("L2" if threat.startswith("l2") else "Linf"), float(threat.split(":")[1])
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 2 ** 62, (1,), generator=g)  # the draw Attack.run makes to seed the forked global RNG
    sq, pas, fake = _scripted_pyautoattack(norm, eps, 300, model, g)
    sq.init_hyperparam(x)
    real, pas.torch = pas.torch, fake
    try:
        _, theirs = sq.attack_single_run(x, y)
    finally:
        pas.torch = real
    res = create_attack("square", threat, n_queries=300).run(model, x, y, generator=torch.Generator().manual_seed(3))
    ThreatModel.parse(threat).check(x, res.x_adv)
    assert 0 < int(res.success.sum()) < len(y)
    # float rounding of the renormalized L2 perturbation accumulates over the queries (~1e-5)
    assert torch.allclose(res.x_adv, theirs, atol=1e-4)
    assert torch.equal(res.success, model(theirs).argmax(1) != y)


def test_square_l2_as_strong_as_pyautoattack(mlp):
    from pyautoattack import AutoAttack

    te = load_dataset("digits", "test")
    x, y = te.images[:150], te.labels[:150]
    threat = ThreatModel.parse("l2:1.0")
    ours, theirs = [], []
    for seed in range(3):
        res = create_attack("square", threat, n_queries=150, seed=seed).run(mlp, x, y)
        threat.check(x, res.x_adv)
        assert torch.equal(res.success, mlp(res.x_adv).argmax(1) != y)
        ours.append((mlp(res.x_adv).argmax(1) == y).float().mean().item())
        aa = AutoAttack(mlp, attacks=["square"], version="custom", norm="L2", eps=1.0, seed=seed)
        aa.square.n_queries = 150
        with torch.random.fork_rng():
            xa, _ = aa.run_standard_evaluation(x, y)
        theirs.append((mlp(xa).argmax(1) == y).float().mean().item())
    assert abs(sum(ours) - sum(theirs)) / 3 <= 0.04, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_square_l2_conformance(mlp, dtype):
    """L2 Square: inside the ball, seeded, dtype kept, claimed successes are misclassifications."""
    te = load_dataset("digits", "test")
    x, y = te.images[:32].to(dtype), te.labels[:32]
    model = mlp.to(dtype)
    try:
        atk = create_attack("square", "l2:1.5", n_queries=40)
        a, b = atk.run(model, x, y), atk.run(model, x, y)
        assert torch.equal(a.x_adv, b.x_adv) and a.x_adv.dtype == dtype
        ThreatModel.parse("l2:1.5").check(x, a.x_adv)
        assert torch.equal(a.success, model(a.x_adv).argmax(1) != y) and bool(a.success.any())
    finally:
        mlp.to(torch.float32)


def test_batched_window_draws_are_the_sequential_ones():
    """Square draws a query's window corners in one call on a CPU generator: the same numbers as
    one `_randint` call per corner coordinate (what pyautoattack's order and the GPU path use)."""
    from attacks.square import _positions

    for h, s in ((8, 3), (15, 13), (32, 1), (5, 5)):
        g1, g2 = torch.Generator().manual_seed(h), torch.Generator().manual_seed(h)
        for _ in range(20):
            assert _positions(h, h, s, 4, g1) == [_randint(h - s, g2) for _ in range(4)]
            assert torch.equal(torch.randint(0, 2, (3, 1, 1, 1), generator=g1),
                               torch.randint(0, 2, (3, 1, 1, 1), generator=g2))


@pytest.mark.parametrize("shared", [True, False])
def test_linf_proposal_is_the_clipped_signed_step(shared):
    """An L-inf proposal writes (clean + eps * sign).clamp(0, 1) into its window, bit for bit."""
    from attacks.square import _linf_faces, _propose_linf

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 9, generator=g)
    x[x < 0.2] = 0.0
    best = (x + 0.03 * torch.randn(6, 3, 9, 9, generator=g)).clamp(0, 1)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for s in (1, 4, 9):
        cand = _propose_linf(best, _linf_faces(x, 0.1), s, shared, g1)
        vh, vw = _randint(9 - s, g2), _randint(9 - s, g2)
        ref = best.clone()
        sl = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        ref[sl] = (x[sl] + 0.1 * _signs((1 if shared else 6, 3, 1, 1), g2, x)).clamp(0, 1)
        assert torch.equal(cand, ref)
