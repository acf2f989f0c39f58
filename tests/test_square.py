"""Native Square (L-inf): inside the ball, AutoAttack's schedule, as strong as pyautoattack's
Square on the same model (averaged over seeds: the random search varies a lot per seed)."""

from __future__ import annotations

import pytest
import torch

from attacks import create_attack
from attacks.square import p_selection
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
    with pytest.raises(ConfigError, match="linf"):
        create_attack("square", "l2:0.5")
    assert create_attack("square", "linf:0.1").gradient_free
