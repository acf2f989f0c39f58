"""Threat models: an Lp ball of radius eps around x, intersected with the [0, 1] image box.

Epsilons are in [0, 1] pixel units; strings such as ``linf:8/255`` or ``l2:0.5`` are parsed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from bastion.errors import ThreatModelError, ThreatModelViolation

NORMS = ("linf", "l2")
_NORM_ALIASES = {"linf": "linf", "l_inf": "linf", "inf": "linf", "l2": "l2", "2": "l2"}


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


@dataclass(frozen=True)
class ThreatModel:
    """An Lp threat model. ``norm`` is ``"linf"`` or ``"l2"``; ``eps`` in [0, 1] pixel units."""

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
        d = (x_adv - x).flatten(1)
        if self.norm == "linf":
            return d.abs().amax(dim=1)
        return d.norm(p=2, dim=1)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` intersected with [0, 1]."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / n).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniform point of the ball (linf) or a random direction of random radius (l2), in [0, 1]."""
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * self.eps
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
        if worst > self.eps + atol:
            idx = int(dist.argmax())
            raise ThreatModelViolation(
                f"adversarial example at batch position {idx} has {self.norm} distance {worst:.8g} "
                f"> eps {self.eps:.8g} ({self}); the attack left its threat model")
