"""The certificate of a mixed classifier (adaptive smoothing, spec section 4), as evaluator probes.

Let ``y`` be the robust base's prediction at x, ``mu = (1 - alpha) / alpha`` and ``m`` the
margin ``p^h_y - max_{i != y} p^h_i`` of the robust base's probabilities. If ``alpha >= 1/2`` and
the margin stays ``>= mu`` over the ball, the mixed prediction is ``y`` on the whole ball
(``g``'s probability gap is >= -1). For a mixing network use the lower end ``alpha_lo`` of the
alpha range (alpha(x) is not itself certified); below 1/2 nothing is certified.

- Lipschitz form (`LipschitzCertifyProbe`): every ``p^h_y - p^h_i`` L-Lipschitz in l2 ->
  ``r = max(0, (alpha m - (1 - alpha)) / (alpha L))``. `linear_pairwise_lipschitz` gives an exact
  upper bound for a linear softmax base: ``L = s_h ||W diag(1/std)||_2 sqrt(2)/2`` (the softmax
  Jacobian has norm <= 1/2 and ``||e_y - e_i|| = sqrt(2)``).
- Randomized-smoothing form (`MixedSmoothingCertifier`, a certifier for `certify.runner.CertifyProbe`):
  ``h`` = Gaussian smoothing (noise sigma) of a base, ``p_A`` its Clopper-Pearson lower bound,
  ``p_B <= 1 - p_A``: ``r = sigma/2 (Phi^-1(p_A / (1 + mu)) - Phi^-1((p_B + mu) / (1 + mu)))``,
  Cohen's radius at alpha = 1; abstain (-1) where the bracket is not positive.

Records are `CertifyRecord`s (``pred`` = -1 where the condition fails, ``sigma`` = 0 for the
Lipschitz form), so certified accuracy at radii comes out of the ``certify`` fold and renderer.
`radius_pgd` is the soundness check: l2 PGD with a per-example radius (e.g. 0.999 r(x)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.objectives import loss_function
from bastion.errors import ConfigError
from bastion.records import CertifyRecord, Record
from certify.smoothing import Certificate, Smooth

import certify.folds  # noqa: F401  (registers the certify fold and renderer)  # isort: skip


def lipschitz_radius(margin: torch.Tensor, alpha: float, lipschitz: float) -> torch.Tensor:
    """``(alpha m - (1 - alpha)) / (alpha L)`` per example (B,); negative = not certified (clip at 0
    for the radius). Never positive for alpha < 1/2."""
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if not lipschitz > 0:
        raise ConfigError(f"the Lipschitz constant must be > 0, got {lipschitz}")
    if alpha < 0.5 or alpha == 0:
        return torch.full_like(margin, -1.0)
    return (alpha * margin - (1 - alpha)) / (alpha * lipschitz)


def smoothing_radius(p_a: float, p_b: float, alpha: float, sigma: float) -> float:
    """``sigma/2 (Phi^-1(p_A/(1+mu)) - Phi^-1((p_B+mu)/(1+mu)))``, mu = (1 - alpha)/alpha; <= 0: none."""
    from scipy.stats import norm

    if alpha < 0.5:
        return -1.0
    mu = (1 - alpha) / alpha
    lo, hi = p_a / (1 + mu), (p_b + mu) / (1 + mu)
    if lo <= 0 or hi >= 1:
        return -1.0
    return 0.5 * sigma * float(norm.ppf(lo) - norm.ppf(hi))


def linear_pairwise_lipschitz(model: nn.Module, temperature: float = 1.0) -> float:
    """Exact l2 Lipschitz bound of every ``p_y - p_i`` of ``softmax(temperature * model(x))`` for a
    registry ``mlp`` without hidden layers (normalize -> flatten -> linear)."""
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ReLU, nn.BatchNorm2d))]
    if len(lin) != 1 or others:
        raise ConfigError("linear_pairwise_lipschitz needs a linear softmax model (mlp with hidden=[])")
    w = lin[0].weight.detach().double()
    norm = getattr(model, "normalize", None)
    if norm is not None:
        c = norm.std.numel()
        per_pixel = w.shape[1] // c
        inv = (1.0 / norm.std.detach().double().flatten()).repeat_interleave(per_pixel)
        w = w * inv[None, :]
    return float(temperature) * float(torch.linalg.matrix_norm(w, ord=2)) * math.sqrt(2) / 2


class LipschitzCertifyProbe:
    """Certify a `MixedClassifier` whose robust base has pairwise Lipschitz constant ``lipschitz``
    (of its tempered probabilities). alpha: the certified weight (default: the model's floor,
    its fixed alpha or alpha_lo). One `CertifyRecord` per example."""

    def __init__(self, lipschitz: float, *, alpha: float | None = None, name: str = "lipschitz",
                 max_radius: float = 1.0):
        self.lipschitz = float(lipschitz)
        self.alpha = alpha
        self.name = name
        self.max_radius = float(max_radius)

    def describe(self) -> dict[str, Any]:
        return {"kind": "certify", "task": "certify", "name": self.name, "sigma": 0.0, "mode": "exact",
                "model": f"mixed (Lipschitz form, L={self.lipschitz:.4g}, alpha={self.alpha})", "n0": None,
                "n": None, "alpha": 0.0, "batch": None, "max_radius": self.max_radius, "autocast": None,
                "radii": [round(self.max_radius * i / 8, 6) for i in range(9)]}   # radii here are << 1

    def run(self, model, x, y, indices, generator) -> list[Record]:
        alpha = float(self.alpha if self.alpha is not None else model.alpha_floor())
        with torch.no_grad():
            p = F.softmax(model.temperatures[1] * model.robust(x), dim=1)
            top2 = p.topk(2, dim=1)
            margin = top2.values[:, 0] - top2.values[:, 1]
            r = lipschitz_radius(margin, alpha, self.lipschitz)
        pred = torch.where(r >= 0, top2.indices[:, 0], torch.full_like(top2.indices[:, 0], -1))
        return [CertifyRecord(index=int(i), probe=self.name, sigma=0.0, label=int(t), pred=int(c),
                              correct=int(c) == int(t), radius=max(0.0, float(rr)), p_lower=float(m)).to_record()
                for i, t, c, rr, m in zip(indices.tolist(), y.tolist(), pred.tolist(), r.tolist(), margin.tolist())]


class MixedSmoothingCertifier:
    """A certifier (``certify_many`` as `certify.smoothing.Smooth`) for a mixed classifier whose
    robust base is the Gaussian smoothing ``smooth`` and whose weight is at least ``alpha``:
    Cohen's counts, the mixed radius of `smoothing_radius` with p_B <= 1 - p_A."""

    def __init__(self, smooth: Smooth, alpha: float):
        if not 0 <= alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        self.smooth = smooth
        self.alpha = float(alpha)

    @property
    def base(self) -> nn.Module:
        return self.smooth.base

    def certify_many(self, xs: torch.Tensor, indices: Sequence[Any], n0: int, n: int, alpha: float,
                     batch: int = 1000, sequential: Any = None) -> list[Certificate]:
        out = []
        for c in self.smooth.certify_many(xs, indices, n0, n, alpha, batch, sequential=None):
            if c.prediction < 0:
                out.append(c)
                continue
            r = smoothing_radius(c.p_lower, 1 - c.p_lower, self.alpha, self.smooth.sigma)
            c.radius, c.prediction = (r, c.prediction) if r >= 0 else (0.0, -1)
            out.append(c)
        return out

    def predict_many(self, *args: Any, **kw: Any):
        raise ConfigError("the mixed smoothing certifier certifies only (task certify)")


def radius_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radii: torch.Tensor, *, steps: int = 100,
               restarts: int = 2, losses: Sequence[str] = ("ce", "margin"), generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """l2 PGD with a per-example radius ``radii`` (B,) in pixel units: for each loss and restart,
    ``steps`` normalized-gradient steps of size 2.5 r / steps from a random start in the ball,
    projected onto the ball and [0, 1]. Returns (B,) bool: some iterate changed the prediction
    away from ``y`` (examples with radius 0 are not attacked)."""
    g = generator or torch.Generator(device=x.device).manual_seed(0)
    shape = (-1,) + (1,) * (x.dim() - 1)
    r = radii.to(x.dtype).view(shape)
    flipped = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    live = radii > 0

    def project(z: torch.Tensor) -> torch.Tensor:
        d = z - x
        n = d.flatten(1).norm(dim=1).view(shape).clamp_min(1e-12)
        return (x + d * (r / n).clamp(max=1.0)).clamp(0, 1)

    was = model.training
    model.eval()
    try:
        for loss in losses:
            fn = loss_function(loss)
            for _ in range(restarts):
                u = torch.randn(x.shape, generator=g, device=g.device).to(x.device)
                u = u / u.flatten(1).norm(dim=1).view(shape) * torch.rand(
                    x.shape[0], generator=g, device=g.device).to(x.device).view(shape)
                z = project(x + r * u)
                for _ in range(steps + 1):
                    z = z.detach().requires_grad_(True)
                    out = model(z)
                    flipped |= (out.argmax(1) != y) & live
                    (gr,) = torch.autograd.grad(fn(out, y).sum(), z)
                    with torch.no_grad():
                        step = gr / gr.flatten(1).norm(dim=1).view(shape).clamp_min(1e-12)
                        z = project(z + 2.5 * r / steps * step)
    finally:
        model.train(was)
    return flipped
