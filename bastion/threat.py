"""Threat models: an Lp ball of radius eps around x, intersected with the [0, 1] image box.

Epsilons are in [0, 1] pixel units; strings such as ``linf:8/255``, ``l2:0.5`` or ``l1:12`` are
parsed. Norms: ``linf``, ``l2``, ``l1`` (as AutoAttack's L1 threat model) and ``l0`` (eps = the
number of input features, i.e. pixel channels, that may change; used by minimum-norm attacks).
All norms are taken over the flattened input of each example.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from bastion.errors import ThreatModelError, ThreatModelViolation

NORMS = ("linf", "l2", "l1", "l0")
_NORM_ALIASES = {"linf": "linf", "l_inf": "linf", "inf": "linf", "l2": "l2", "2": "l2", "l1": "l1", "1": "l1",
                 "l0": "l0", "0": "l0"}


def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.dim() - 1)


def project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: float | torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Exact Euclidean projection of ``delta`` onto {d : ||d||_1 <= eps, x + d in [0, 1]} (per example).

    The problem is separable up to one multiplier: d_i = clip(soft(v_i, lam), -x_i, 1 - x_i)
    with the smallest lam >= 0 making ||d||_1 <= eps; ||d(lam)||_1 is non-increasing in lam, so
    lam is found by bisection (``iters`` halvings of [0, max |v|], then the feasible end)."""
    lo_b, hi_b = -x, 1 - x
    v = torch.minimum(torch.maximum(delta, lo_b), hi_b)
    flat = v.flatten(1)
    n = flat.shape[0]
    eps_t = torch.as_tensor(eps, dtype=v.dtype, device=v.device).expand(n) if not torch.is_tensor(eps) \
        else eps.to(v.dtype).expand(n)
    over = flat.abs().sum(1) > eps_t
    if not bool(over.any()):
        return v
    raw = delta.flatten(1)[over]
    a = raw.abs()
    cap = torch.where(raw > 0, hi_b.flatten(1)[over], -lo_b.flatten(1)[over])  # how far each entry may move
    e = eps_t[over].view(-1, 1)
    lam_lo = torch.zeros_like(e)
    lam_hi = a.amax(1, keepdim=True)
    for _ in range(iters):
        mid = (lam_lo + lam_hi) / 2
        too_big = torch.minimum((a - mid).clamp_min(0), cap).sum(1, keepdim=True) > e
        lam_lo = torch.where(too_big, mid, lam_lo)
        lam_hi = torch.where(too_big, lam_hi, mid)
    shrunk = raw.sign() * torch.minimum((a - lam_hi).clamp_min(0), cap)
    out = flat.clone()
    out[over] = shrunk
    return out.view_as(v)


def project_l0(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of each example's ``delta`` (an L0 ball of radius k)."""
    flat = delta.flatten(1)
    k = int(k)
    if k >= flat.shape[1]:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    keep = flat.abs().topk(k, dim=1).indices
    out = torch.zeros_like(flat)
    out.scatter_(1, keep, flat.gather(1, keep))
    return out.view_as(delta)


def parse_eps(text: str | float | int) -> float:
    """Parse an epsilon such as ``8/255``, ``0.03`` or ``0.5`` into a float (pixel units)."""
    if isinstance(text, bool):
        raise ThreatModelError(f"epsilon must be a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        if not re.fullmatch(r"[0-9.eE+-]+(/[0-9.eE+-]+)?", s):
            raise ThreatModelError(f"cannot parse epsilon {text!r}: use a number such as 0.03 "
                                   f"or a fraction 8/255")
        try:
            if "/" in s:
                num, den = s.split("/")
                value = float(Fraction(num) / Fraction(den)) if "." not in s else float(num) / float(den)
            else:
                value = float(s)
        except ZeroDivisionError:
            raise ThreatModelError(f"cannot parse epsilon {text!r}: the denominator is zero") from None
        except ValueError as exc:
            raise ThreatModelError(f"cannot parse epsilon {text!r}: {exc}") from None
    if not math.isfinite(value) or value < 0:
        raise ThreatModelError(f"epsilon must be a finite number >= 0, got {text!r}")
    return value


def format_eps(eps: float) -> str:
    """Write eps as a short decimal when it has one (0.2, 0.5), else as ``k/255`` when it is one."""
    if len(repr(float(eps))) <= 7:
        return f"{eps:g}"
    k = eps * 255
    if abs(k - round(k)) < 1e-9 and round(k) != 0:
        return f"{round(k)}/255"
    return f"{eps:g}"


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ``norm`` (linf, l2, l1, l0) of ``delta`` (N, ...); shape (N,)."""
    d = delta.flatten(1)
    if norm == "linf":
        return d.abs().amax(dim=1)
    if norm == "l2":
        return d.norm(p=2, dim=1)
    if norm == "l1":
        return d.abs().sum(dim=1)
    if norm == "l0":
        return (d != 0).sum(dim=1).to(d.dtype if d.is_floating_point() else torch.float32)
    raise ThreatModelError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")


@dataclass(frozen=True)
class ThreatModel:
    """An Lp threat model. ``norm`` is ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"``; ``eps`` in [0, 1]
    pixel units (for l0: a count of input features)."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        norm = _NORM_ALIASES.get(str(self.norm).lower())
        if norm is None:
            raise ThreatModelError(f"unknown norm {self.norm!r}: use one of {', '.join(NORMS)}")
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", parse_eps(self.eps))

    @classmethod
    def parse(cls, text: str) -> ThreatModel:
        """Parse ``"linf:8/255"`` or ``"l2:0.5"``."""
        if isinstance(text, ThreatModel):
            return text
        parts = str(text).split(":")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ThreatModelError(
                f"bad threat model {text!r}: expected NORM:EPS such as 'linf:8/255' or 'l2:0.5'")
        return cls(parts[0].strip(), parts[1].strip())

    def __str__(self) -> str:
        return f"{self.norm}:{format_eps(self.eps)}"

    def with_eps(self, eps: float | str) -> ThreatModel:
        return ThreatModel(self.norm, eps)

    # -- geometry -----------------------------------------------------------------------------
    def distance(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-example norm of ``x_adv - x``; shape (N,)."""
        return lp_norm(x_adv - x, self.norm)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` intersected with [0, 1]."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        elif self.norm == "l1":
            return (x + project_l1_box(x, delta, self.eps)).clamp(0.0, 1.0)
        elif self.norm == "l0":
            return (x + project_l0((x + delta).clamp(0.0, 1.0) - x, int(self.eps))).clamp(0.0, 1.0)
        else:
            n = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / n).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniform point of the ball (linf) or a random direction of random radius (l2, l1: the
        direction from a Laplace draw, then projected; l0: ``eps`` random features set at random), in [0, 1]."""
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * self.eps
        elif self.norm == "l0":
            return self.project(x, torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        elif self.norm == "l1":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            sign = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < 0.5
            lap = -torch.log1p(-u.clamp(max=1 - 1e-7)) * (2 * sign.to(x.dtype) - 1)  # a Laplace draw
            lap = lap / lap.flatten(1).abs().sum(1).clamp_min(1e-12).view(_bshape(x))
            r = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
            return self.project(x, x + lap * (r * self.eps).view(_bshape(x)))
        else:
            g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            r = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
            delta = g * (r * self.eps).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def check(self, x: torch.Tensor, x_adv: torch.Tensor, atol: float = 1e-6) -> None:
        """Raise `ThreatModelViolation` unless every ``x_adv`` is finite, in [0, 1], within eps of x."""
        if x_adv.shape != x.shape:
            raise ThreatModelViolation(f"adversarial batch has shape {tuple(x_adv.shape)}, "
                                       f"expected {tuple(x.shape)}")
        if not torch.isfinite(x_adv).all():
            bad = (~torch.isfinite(x_adv)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ThreatModelViolation(f"adversarial batch has NaN/inf values at batch positions {bad[:10]}")
        lo, hi = float(x_adv.min()), float(x_adv.max())
        if lo < -atol or hi > 1 + atol:
            raise ThreatModelViolation(f"adversarial batch leaves [0, 1]: min {lo:.6g}, max {hi:.6g}")
        dist = self.distance(x.to(x_adv.dtype), x_adv)
        worst = float(dist.max()) if dist.numel() else 0.0
        tol = 0.0 if self.norm == "l0" else max(atol, 1e-7 * x[0].numel()) if self.norm == "l1" else atol
        if worst > self.eps + tol:
            idx = int(dist.argmax())
            raise ThreatModelViolation(
                f"adversarial example at batch position {idx} has {self.norm} distance {worst:.8g} "
                f"> eps {self.eps:.8g} ({self}); the attack left its threat model")
