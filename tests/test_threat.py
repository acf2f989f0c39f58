"""bastion.threat: parsing, projection (property-tested), random starts and the validity check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.errors import ThreatModelError, ThreatModelViolation
from bastion.threat import ThreatModel, format_eps, parse_eps


@pytest.mark.parametrize("text,norm,eps", [("linf:8/255", "linf", 8 / 255), ("l2:0.5", "l2", 0.5),
                                           ("Linf:0.03", "linf", 0.03), ("l_inf:1/2", "linf", 0.5),
                                           (" l2 : 1e-1 ", "l2", 0.1), ("linf:0", "linf", 0.0),
                                           ("l2:1.0/4", "l2", 0.25)])
def test_parse(text, norm, eps):
    t = ThreatModel.parse(text)
    assert t.norm == norm and t.eps == pytest.approx(eps, abs=1e-15)
    assert ThreatModel.parse(t) is t
    assert ThreatModel.parse(str(t)) == t


def test_str_and_format():
    assert str(ThreatModel.parse("linf:8/255")) == "linf:8/255"
    assert str(ThreatModel("l2", 0.5)) == "l2:0.5"
    assert format_eps(0.0) == "0" and format_eps(2 / 255) == "2/255"
    assert parse_eps("8/255") == 8 / 255 and parse_eps(0.25) == 0.25
    assert ThreatModel("linf", "4/255").with_eps("8/255").eps == 8 / 255


@pytest.mark.parametrize("bad", ["linf", "linf:", ":8/255", "l3:0.1", "linf:abc", "linf:-0.1", "linf:1/0",
                                 "linf:nan", "linf:inf", "linf:8/255:1", "", "linf:8 / 255", "l2:1e400"])
def test_bad_strings(bad):
    with pytest.raises(ThreatModelError):
        ThreatModel.parse(bad)


def test_bad_values():
    with pytest.raises(ThreatModelError):
        ThreatModel("linf", float("nan"))
    with pytest.raises(ThreatModelError):
        ThreatModel("linf", True)
    with pytest.raises(ThreatModelError, match="unknown norm"):
        ThreatModel("l3", 0.1)


_shapes = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(shape=_shapes, norm=st.sampled_from(["linf", "l2", "l1"]), eps=st.floats(0, 2),
       seed=st.integers(0, 2 ** 31), scale=st.floats(0, 4))
def test_projection_property(shape, norm, eps, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x_adv = x + scale * torch.randn(shape, generator=g)
    t = ThreatModel(norm, eps)
    p = t.project(x, x_adv)
    assert p.shape == x.shape
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert float(t.distance(x, p).max()) <= eps + 1e-6
    t.check(x, p)  # a projected point is always valid
    assert torch.allclose(t.project(x, p), p, atol=1e-6)  # idempotent
    # a point already inside the ball and the box is left alone
    inside = t.project(x, x + 0.5 * (p - x))
    assert torch.allclose(inside, x + 0.5 * (p - x), atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_inside_and_seeded(norm):
    t = ThreatModel(norm, 0.3)
    x = torch.rand(16, 3, 4, 4)
    a = t.random_start(x, torch.Generator().manual_seed(1))
    b = t.random_start(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)
    t.check(x, a)


def test_check_violations():
    t = ThreatModel.parse("linf:8/255")
    x = torch.full((3, 1, 2, 2), 0.5)
    t.check(x, x + 8 / 255)
    t.check(x, x + 8 / 255 + 5e-7)  # within the 1e-6 tolerance
    with pytest.raises(ThreatModelViolation, match="batch position 1 has linf distance"):
        t.check(x, torch.cat([x[:1], x[1:2] + 8 / 255 + 2e-6, x[2:]]))
    bad = x.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(ThreatModelViolation, match=r"NaN/inf values at batch positions \[2\]"):
        t.check(x, bad)
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ThreatModelViolation, match="NaN/inf"):
        t.check(x, bad)
    edge = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ThreatModelViolation, match=r"leaves \[0, 1\]"):
        t.check(edge, edge - 0.01)
    with pytest.raises(ThreatModelViolation, match="shape"):
        t.check(x, x[:2])
    l2 = ThreatModel("l2", 0.5)
    d = torch.zeros_like(x)
    d[:, 0, 0, 0] = 0.3
    d[:, 0, 1, 1] = 0.4  # norm exactly 0.5
    l2.check(x, x + d)
    with pytest.raises(ThreatModelViolation, match="l2 distance"):
        l2.check(x, x + 1.01 * d)


@settings(max_examples=60, deadline=None)
@given(shape=_shapes, eps=st.floats(0, 6), seed=st.integers(0, 2 ** 31), scale=st.floats(0, 4))
def test_l1_projection_is_the_exact_projection(shape, eps, seed, scale):
    """Inside the ball and box, idempotent, and no feasible point of a random sample is closer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x_adv = x + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    t = ThreatModel("l1", eps)
    p = t.project(x, x_adv)
    t.check(x, p)
    assert torch.allclose(t.project(x, p), p, atol=1e-9)
    for _ in range(20):  # random feasible points are never closer to x_adv than the projection
        q = t.project(x, x + torch.randn(shape, generator=g, dtype=torch.float64))
        assert bool(((q - x_adv).flatten(1).norm(dim=1) >= (p - x_adv).flatten(1).norm(dim=1) - 1e-9).all())


def test_l1_and_l0_threat_models():
    t = ThreatModel.parse("l1:12")
    assert (t.norm, t.eps, str(t)) == ("l1", 12.0, "l1:12")
    x = torch.rand(4, 1, 8, 8)
    a = t.random_start(x, torch.Generator().manual_seed(0))
    t.check(x, a)
    assert float(t.distance(x, a).max()) > 0
    with pytest.raises(ThreatModelViolation, match="l1 distance"):
        t.check(x, (x + 0.5).clamp(0, 1))
    z = ThreatModel.parse("l0:5")
    p = z.project(x, torch.rand(4, 1, 8, 8))
    z.check(x, p)
    assert z.distance(x, p).max() <= 5
    with pytest.raises(ThreatModelViolation, match="l0 distance"):
        z.check(x, torch.rand(4, 1, 8, 8))
