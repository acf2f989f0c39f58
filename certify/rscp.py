"""Provably robust conformal prediction: smoothed scores with Monte-Carlo bounds, RSCP, RSCP+,
PTT and RCT (Yan, Romano & Weng, ICLR 2024; spec /work/shared/specs/rscp-plus.md, sections 4-8).

- `SmoothedScore`: ``S_hat(x, k) = (1/N) sum_j S(x + delta_j, k)`` for several base scores at
  once (shared forward passes), with the per-(x, k) empirical-Bernstein half-width; noise from an
  explicit generator, added in raw [0, 1] input space, unclipped; float64 throughout.
- `hoeffding_width`, `bernstein_width`: one-sided Monte-Carlo half-widths for scores in [0, 1].
- `rscp_bound` (Gendler et al.; kept for comparison, *not provably valid*: the MC error of the
  estimate is not controlled) and `rscp_plus_bound` (calibrate at ``alpha - 2 beta``, add
  ``b_H`` to the threshold, shift by ``eps / sigma`` in Phi^-1 space) return the upper limit ``U``
  that a test score (minus its lower-bound width for RSCP+) must not exceed to enter the set.
- `PTTScore` / `ptt_reference`: the post-training transform (empirical CDF of holdout scores,
  then a steep sigmoid at ``b = 1 - alpha``), a fixed map applied before smoothing.
- RCT: the ``rct`` objective of `bastion.train.fit` (register_objective pattern): trains only the
  last linear layer of a Gaussian-noise-trained network (`prepare_rct` re-initialises it) with
  the differentiable robust conformal loss of the reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError
from bastion.train import ObjectiveParams, StepContext, StepResult, param_float, param_int, register_objective
from certify.conformal import Score, check_alpha, conformal_threshold

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Monte-Carlo half-widths and the robust thresholds
# ---------------------------------------------------------------------------------------------

def hoeffding_width(n: int, beta: float) -> float:
    """One-sided Hoeffding half-width ``sqrt(ln(1/beta) / (2n))`` for a mean of n values in [0, 1]."""
    if n < 1 or not 0 < beta < 1:
        raise ConfigError(f"Hoeffding width needs n >= 1 and beta in (0, 1), got n={n}, beta={beta}")
    return math.sqrt(math.log(1 / beta) / (2 * n))


def bernstein_width(var: Tensor | float, n: int, beta: float) -> Tensor:
    """Maurer-Pontil empirical-Bernstein one-sided half-width from the unbiased sample variance:
    ``sqrt(2 V ln(2/beta) / n) + 7 ln(2/beta) / (3 (n - 1))`` (n >= 2)."""
    if n < 2 or not 0 < beta < 1:
        raise ConfigError(f"Bernstein width needs n >= 2 and beta in (0, 1), got n={n}, beta={beta}")
    v = torch.as_tensor(var, dtype=torch.float64).clamp_min(0)
    log = math.log(2 / beta)
    return torch.sqrt(2 * v * log / n) + 7 * log / (3 * (n - 1))


def _phi(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2))


def _phi_inv(p: float) -> float:
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def shifted_limit(level: float, margin: float) -> float:
    """``Phi(Phi^-1(level) + margin)`` with the conventions Phi^-1(<= 0) = -inf, Phi^-1(>= 1) = +inf
    (so a level >= 1 gives 1 and a level <= 0 gives 0)."""
    if level >= 1:
        return 1.0
    if level <= 0:
        return 0.0
    return _phi(_phi_inv(level) + margin)


def rscp_bound(cal_scores: Tensor, alpha: float, eps: float, sigma: float) -> tuple[float, float]:
    """RSCP (Gendler et al. 2023): ``(tau, U)`` with tau the 1-alpha conformal threshold of the
    smoothed calibration scores and ``U = Phi(Phi^-1(tau) + eps/sigma)``; include k iff
    ``S_hat(x', k) <= U``. Not provably valid with Monte-Carlo estimates (spec section 5)."""
    tau = conformal_threshold(cal_scores, alpha)
    return tau, shifted_limit(tau, eps / sigma)


def rscp_plus_bound(cal_scores: Tensor, alpha: float, eps: float, sigma: float, n_mc: int,
                    beta: float = 0.001) -> tuple[float, float]:
    """RSCP+: ``(tau+, U)``; tau+ is the ``ceil((n+1)(1 - alpha + 2 beta))``-th smallest MC
    calibration score, ``U = 1`` when ``tau+ + b_H >= 1`` (full set), else
    ``Phi(Phi^-1(tau+ + b_H) + eps/sigma)``. Include k iff ``S_hat(x', k) - b_test(x', k) <= U``
    with ``b_test`` the Hoeffding or (tighter) Bernstein width at the test input."""
    check_alpha(alpha)
    if not 0 < 2 * beta < alpha:
        raise ConfigError(f"beta must be in (0, alpha/2), got beta={beta}, alpha={alpha}")
    tau = conformal_threshold(cal_scores, alpha, beta)
    level = tau + hoeffding_width(n_mc, beta)
    return tau, shifted_limit(level, eps / sigma)


# ---------------------------------------------------------------------------------------------
# The smoothed score
# ---------------------------------------------------------------------------------------------

@dataclass
class Smoothed:
    """MC estimates for one input batch: ``mean`` / ``var`` (B, K) float64 per score name, and the
    mean softmax ``probs`` (B, K) (the smoothed soft classifier; its argmax is the prediction)."""

    mean: dict[str, Tensor]
    var: dict[str, Tensor]
    probs: Tensor

    def bound(self, name: str, n_mc: int, beta: float) -> Tensor:
        """Empirical-Bernstein half-width per (example, class)."""
        return bernstein_width(self.var[name], n_mc, beta)


class SmoothedScore:
    """``S_RS`` estimated with ``n_mc`` Gaussian draws per input, for several scores at once.

    base: the classifier (logits, inputs in [0, 1], normalisation inside). scores: name -> `Score`
    with values in [0, 1]. batch: inputs x draws per forward pass. ``u`` (B,) is one uniform per
    example for randomised scores, shared by all labels and all draws (spec section 3)."""

    def __init__(self, base: nn.Module, scores: dict[str, Score], sigma: float, n_mc: int = 256, batch: int = 8192):
        if not (math.isfinite(sigma) and sigma > 0) or n_mc < 2 or batch < 1:
            raise ConfigError(f"smoothed scores need sigma > 0, n_mc >= 2 and batch >= 1 "
                              f"(got {sigma}, {n_mc}, {batch})")
        for name, s in scores.items():
            if s.range[0] < 0 or s.range[1] > 1:
                raise ConfigError(f"score {name!r} ranges over {s.range}; the Monte-Carlo bounds need scores in "
                                  f"[0, 1] (use RAPS(scaled=True))")
        self.base, self.scores, self.sigma, self.n_mc, self.batch = base, dict(scores), float(sigma), int(n_mc), batch

    @torch.no_grad()
    def __call__(self, x: Tensor, generator: torch.Generator, u: Tensor | None = None) -> Smoothed:
        """Estimates at ``x`` (B, C, H, W); noise drawn from ``generator`` (on any device)."""
        b, n = x.shape[0], self.n_mc
        per = max(1, self.batch // n)
        means, vars_, probs_out = {k: [] for k in self.scores}, {k: [] for k in self.scores}, []
        for s in range(0, b, per):
            xs = x[s:s + per]
            m = xs.shape[0]
            noise = torch.randn((m * n, *xs.shape[1:]), generator=generator, device=generator.device,
                                dtype=xs.dtype).to(xs.device)
            logits = self.base(xs.repeat_interleave(n, dim=0) + self.sigma * noise)
            p = torch.softmax(logits.double(), dim=-1).view(m, n, -1)
            probs_out.append(p.mean(dim=1))
            us = None if u is None else u[s:s + m].to(p.device, torch.float64).view(m, 1)
            for name, score in self.scores.items():
                v = score.from_probs(p, us)                       # (m, n, K)
                means[name].append(v.mean(dim=1))
                vars_[name].append(v.var(dim=1, unbiased=True))
        return Smoothed({k: torch.cat(v) for k, v in means.items()}, {k: torch.cat(v) for k, v in vars_.items()},
                        torch.cat(probs_out))


# ---------------------------------------------------------------------------------------------
# PTT
# ---------------------------------------------------------------------------------------------

class PTTScore(Score):
    """``S_PTT = expit((Q_rank(S) - b) / T)`` with ``Q_rank(s) = |{i : r_i <= s}| / m`` the
    empirical CDF of holdout reference scores ``r`` (spec section 7). Values in (0, 1); fixed
    before calibration, so validity is untouched."""

    def __init__(self, base: Score, reference: Tensor | list[float], b: float = 0.9, temperature: float = 1 / 400):
        ref = torch.as_tensor(reference, dtype=torch.float64).reshape(-1)
        if ref.numel() < 1:
            raise ConfigError("PTT needs at least one holdout reference score")
        if not temperature > 0:
            raise ConfigError(f"PTT temperature must be > 0, got {temperature}")
        self.base = base
        self.reference = ref.sort().values
        self.b, self.temperature = float(b), float(temperature)
        self.randomized = base.randomized
        self.name = f"ptt-{base.name}"
        self.range = (0.0, 1.0)

    def rank(self, s: Tensor) -> Tensor:
        ref = self.reference.to(s.device)
        return torch.searchsorted(ref, s.contiguous(), right=True).to(torch.float64) / ref.numel()

    def transform(self, s: Tensor) -> Tensor:
        return torch.special.expit((self.rank(s) - self.b) / self.temperature)

    def from_probs(self, probs: Tensor, u: Tensor | None = None) -> Tensor:
        return self.transform(self.base.from_probs(probs, u))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.describe(), "b": self.b, "temperature": self.temperature,
                "holdout": int(self.reference.numel()), "randomized": self.randomized, "range": [0.0, 1.0]}


@torch.no_grad()
def ptt_reference(base: nn.Module, score: Score, x: Tensor, y: Tensor, sigma: float,
                  generator: torch.Generator) -> Tensor:
    """Holdout reference scores ``r_i = S(x_i + delta_i, y_i)``: the base score at the true label
    at ONE Gaussian draw, a fresh ``u`` for randomised scores (spec section 7); sorted, float64."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    p = torch.softmax(base(x + sigma * noise).double(), dim=-1)
    u = score.draw_u(y.shape, generator, p.device)
    s = score.from_probs(p, u).gather(1, y.view(-1, 1).to(p.device)).squeeze(1)
    return s.sort().values.cpu()


# ---------------------------------------------------------------------------------------------
# RCT: robust conformal training (the ``rct`` objective)
# ---------------------------------------------------------------------------------------------

def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (the classification head RCT trains)."""
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            head = m
    if head is None:
        raise ConfigError(f"RCT trains the last linear layer, and {type(model).__name__} has none")
    return head


def prepare_rct(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise the last linear layer (seeded) of a Gaussian-noise-trained model, in place;
    RCT then trains only that layer (spec section 8)."""
    head = last_linear(model)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        bound = 1 / math.sqrt(head.in_features)
        head.weight.copy_(torch.empty(head.weight.shape).uniform_(-bound, bound, generator=g))
        if head.bias is not None:
            head.bias.copy_(torch.empty(head.bias.shape).uniform_(-bound, bound, generator=g))
    return model


@dataclass(frozen=True)
class RCTParams(ObjectiveParams):
    """Robust conformal training (Yan et al. 2024): only the last linear layer is trained.

    sigma: smoothing noise (the backbone's training sigma). eps: L2 radius of the robust shift
    eps/sigma. alpha: target miscoverage. n_train: noise copies per input (8). temperature: soft
    set temperature T_rct. size_weight: lambda of the size penalty. target_size: kappa.
    warmup_epochs: epochs without the robust shift."""

    sigma: Any = 0.25
    eps: Any = 0.125
    alpha: Any = 0.1
    n_train: Any = 8
    temperature: Any = 0.1
    size_weight: Any = 1.0
    target_size: Any = 1.0
    warmup_epochs: Any = 0

    def __post_init__(self) -> None:
        self._set("sigma", param_float(self.sigma, "sigma", low=0, low_open=True))
        self._set("eps", param_float(self.eps, "eps", low=0))
        self._set("alpha", param_float(self.alpha, "alpha", low=0, high=1, low_open=True))
        self._set("n_train", param_int(self.n_train, "n_train", low=1))
        self._set("temperature", param_float(self.temperature, "temperature", low=0, low_open=True))
        self._set("size_weight", param_float(self.size_weight, "size_weight", low=0))
        self._set("target_size", param_float(self.target_size, "target_size", low=0))
        self._set("warmup_epochs", param_int(self.warmup_epochs, "warmup_epochs", low=0))


class RobustConformalTraining:
    """The RCT loss on the smoothed HPS conformity ``z = Phi^-1(p_bar)`` (spec section 8).

    Per batch: ``n_train`` noisy copies per input, ``p_bar`` their mean softmax; the first half
    of the batch gives tau (the lower conformity quantile of the true labels, at 0-based index
    ``max(floor(alpha (1 + 1/n_h) n_h) - 1, 0)``, minus eps/sigma after warm-up); the second half
    gets soft sets ``c_k = sigmoid((z_k - tau) / T)`` and the loss
    ``log(mean(1 - c_y) + lambda mean(max(0, sum_k c_k - kappa)) + 1e-8)``. Deviation: tau is the
    hard order statistic of a sort (differentiable in the selected value) instead of torchsort's
    soft sort (dispersion 0.1). Only the last linear layer gets gradients (the rest is frozen on
    every step; `prepare_rct` re-initialises the head before training)."""

    name = "rct"
    co_monitor_eps = None

    def __init__(self, params: RCTParams):
        self.p = params

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> StepResult:
        p = self.p
        head = set(map(id, last_linear(model).parameters()))
        for q in model.parameters():
            q.requires_grad_(id(q) in head)
        b, n = x.shape[0], p.n_train
        noise = torch.randn((b * n, *x.shape[1:]), generator=ctx.generator, device=x.device, dtype=x.dtype)
        probs = torch.softmax(model(x.repeat_interleave(n, dim=0) + p.sigma * noise), dim=1)
        p_bar = probs.view(b, n, -1).mean(dim=1)
        z = torch.special.ndtri((p_bar + 1e-7).clamp(max=1 - 1e-7))
        h = b // 2
        if h < 1 or b - h < 1:
            raise ConfigError(f"RCT needs batches of at least 2 examples, got {b}")
        cal = z[:h].gather(1, y[:h].view(-1, 1)).squeeze(1).sort().values
        k = max(math.floor(p.alpha * (1 + 1 / h) * h) - 1, 0)
        tau = cal[k]
        if ctx.epoch >= p.warmup_epochs:
            tau = tau - p.eps / p.sigma
        soft = torch.sigmoid((z[h:] - tau) / p.temperature)
        miss = (1 - soft.gather(1, y[h:].view(-1, 1)).squeeze(1)).mean()
        size = soft.sum(dim=1)
        loss = torch.log(miss + p.size_weight * F.relu(size - p.target_size).mean() + 1e-8)
        return StepResult(loss, p_bar.detach().clamp_min(1e-12).log(),
                          {"soft_miss": float(miss.detach()), "soft_size": float(size.detach().mean())})

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, **self.p.to_dict()}


register_objective("rct", RCTParams, RobustConformalTraining)
