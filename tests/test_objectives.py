"""The objective registry: declared parameters, one-line errors, plugins found by entry point, and the
PGD-AT objective on the attack layer's PGD."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bastion.train as train
from bastion.errors import ConfigError
from bastion.models import create_model
from bastion.train import (
    StepContext,
    co_monitor_eps,
    create_objective,
    list_objectives,
    objective_doc,
    objective_params,
)

ALL = ("standard", "pgd", "gaussian", "fgsm", "fgsm_rs", "n_fgsm", "nfgsm", "rs_aaer", "n_aaer", "aaer")


def _run_fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_plugins_are_found_without_importing_them_first():
    out = _run_fresh(
        "import sys\n"
        "import bastion, bastion.train, bastion.checkpoints, bastion.evaluate\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'defenses'))\n"
        "from bastion.train import create_objective\n"
        "o = create_objective('aaer', eps=0.1)\n"
        "print(o.name, 'defenses.single_step' in sys.modules)\n")
    lines = out.splitlines()
    assert lines[0] == "[]"  # bastion imports no defenses module statically
    assert lines[1] == "aaer True"


def test_entry_points_and_fallback_map(monkeypatch):
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group=train.ENTRY_POINT_GROUP)}
    assert declared.get("pgd") == "defenses.pgd_at" and declared.get("aaer") == "defenses.single_step"
    assert set(train._FALLBACK_PLUGINS) == set(declared)  # the fallback mirrors pyproject.toml
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    assert set(train._plugins()) == set(declared)


def test_list_params_and_docs():
    assert set(ALL) <= set(list_objectives())
    assert objective_params("standard") == []
    assert objective_params("pgd")[:4] == [("eps", "8/255"), ("norm", "linf"), ("steps", 10), ("alpha", None)]
    assert objective_params("gaussian") == [("sigma", 0.25)]
    assert {"lambda3", "variant", "preset", "eps"} <= {k for k, _ in objective_params("aaer")}
    assert "lambda3" not in {k for k, _ in objective_params("fgsm_rs")}
    for name in ALL:
        assert objective_doc(name) and "\n" not in objective_doc(name)


@pytest.mark.parametrize("name,params,msg", [
    ("nope", {}, "unknown objective 'nope'; available: aaer, "),
    ("gaussian", {"eps": 0.1}, "objective 'gaussian' takes no parameter 'eps'; it takes: sigma"),
    ("gaussian", {"sigma": float("nan")}, "sigma .* must be a finite number"),
    ("gaussian", {"sigma": 0}, "sigma .* must be > 0"),
    ("gaussian", {"sigma": "abc"}, "sigma .* must be a finite number"),
    ("pgd", {"steps": "abc"}, "objective 'pgd': steps must be an integer, got 'abc'"),
    ("pgd", {"steps": 0}, "steps must be >= 1"),
    ("pgd", {"sigma": 0.25}, "'pgd' takes no parameter 'sigma'; it takes: eps, norm, steps, alpha"),
    ("pgd", {"eps": "nan"}, "eps must be a finite number"),
    ("pgd", {"eps": 0}, "eps must be > 0"),
    ("pgd", {"alpha": float("inf")}, "alpha must be a finite number"),
    ("pgd", {"norm": "l3"}, "objective 'pgd': "),
    ("pgd", {"attack_in_eval_mode": "maybe"}, "attack_in_eval_mode must be true or false"),
    ("standard", {"eps": 0.1}, "'standard' takes no parameter 'eps'; it takes: no parameters"),
    ("fgsm", {"steps": 7}, "'fgsm' takes no parameter 'steps'"),
    ("aaer", {"eps": 0.1, "foo": "bar"}, "'aaer' takes no parameter 'foo'"),
    ("aaer", {"eps": 0.1, "lambda3": float("nan")}, "lambda3 must be a finite number"),
    ("n_aaer", {"eps": 0.1, "lambda1": -1}, "lambda1 must be >= 0"),
    ("fgsm", {"eps": 0.1, "warmup_epochs": "x"}, "warmup_epochs must be a finite number"),
    ("fgsm_rs", {"eps": "8/0"}, "eps must be a finite number"),
])
def test_bad_names_keys_and_values_are_one_line_config_errors(name, params, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        create_objective(name, **params)
    assert "\n" not in str(err.value)


def test_co_monitor_attribute():
    assert co_monitor_eps(create_objective("aaer", eps="8/255")) == pytest.approx(8 / 255)
    assert co_monitor_eps(create_objective("fgsm", eps=0.1)) == pytest.approx(0.1)
    for name in ("standard", "pgd", "gaussian"):
        assert co_monitor_eps(create_objective(name)) is None


def test_pgd_leaves_the_foundation():
    assert not hasattr(train, "PGDObjective") and not hasattr(train, "pgd_linf_attack")
    o = create_objective("pgd", eps=0.2, steps=7, alpha=0.05)
    assert o.config() == {"objective": "pgd", "threat": "linf:0.2", "steps": 7, "alpha": 0.05}
    assert create_objective("pgd", eps="8/255", steps=4).alpha == pytest.approx(2.5 * (8 / 255) / 4)
    assert str(create_objective("pgd", threat="l2:0.5").threat) == "l2:0.5"


class _ModeSpy(nn.Module):
    """A BatchNorm model that records its training flag at every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model("small_cnn", 4, 1, 8, width=4, batchnorm=True)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.net.training)
        return self.net(x)


def _ctx(seed=0):
    return StepContext(0, 0, 1, 1, torch.Generator().manual_seed(seed))


def test_pgd_objective_adversary(synthetic_train):
    x, y = synthetic_train.images[:32], synthetic_train.labels[:32]
    o = create_objective("pgd", eps=0.1, steps=5)
    m = _ModeSpy().train()
    x_adv = o.adversary(m, x, y, _ctx().generator)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # every step ran on the training-mode model (batch statistics); modes and flags restored
    assert len(m.modes) >= 5 and all(m.modes) and m.training and m.net.training
    assert all(p.requires_grad for p in m.parameters())
    # seeded by the step's generator: same generator state, same adversary; another seed differs
    again = o.adversary(m, x, y, _ctx().generator)
    assert torch.equal(x_adv, again)
    assert not torch.equal(x_adv, o.adversary(m, x, y, _ctx(1).generator))
    with torch.no_grad():
        m.eval()
        assert F.cross_entropy(m(x_adv), y) > F.cross_entropy(m(x), y)
    # attack_in_eval_mode: the attack sees the eval-mode model, training resumes in train mode
    m.train()
    m.modes.clear()
    res = create_objective("pgd", eps=0.1, steps=2, attack_in_eval_mode=True)(m, x, y, _ctx())
    assert m.modes[:-1] and not any(m.modes[:-1]) and m.modes[-1] is True
    assert math.isfinite(float(res.loss.detach())) and res.logits.shape == (32, 4)
    res.loss.backward()  # the loss carries gradient to the parameters
    assert m.net.net[0].weight.grad is not None
