"""Minimum-norm attacks: the smallest perturbation that changes the prediction, per example.

Each attack searches without a radius and reports, per example, the norm of the smallest
adversarial perturbation it found (`AttackResult.norms`; inf where none was found, 0 for
examples misclassified at the clean input). The threat model gives the norm it measures in and
the radius within which an example counts as broken (`Attack.run` keeps only adversarial
examples inside it, or clips them with ``project=True``). One run therefore gives robust
accuracy at every radius: ``accuracy(eps) = mean(norm > eps)`` over clean-correct examples.

- ``fmn-linf``, ``fmn-l2``, ``fmn-l1``, ``fmn-l0``: Fast Minimum-Norm (Pintor et al., NeurIPS 2021):
  a gradient step on the logit difference, normalized, then projection onto an eps-ball whose
  radius shrinks by (1 - gamma) while adversarial and grows by (1 + gamma) (or jumps to the
  linearized boundary, before the first success) otherwise; step size and gamma on cosine
  schedules (alpha 1 -> 0.01, gamma 0.05 -> 0.001), as adv-lib's ``fmn``; one change: the
  gradient is restricted to the coordinates the [0, 1] box lets a step move (adv-lib's boundary
  estimate counts pixels stuck at 0 or 1, and on images with many saturated pixels, such as
  digits, stalls below the boundary).
- ``ddn``: Decoupled Direction and Norm (Rony et al., CVPR 2019), L2: a normalized CE gradient
  step with cosine-annealed size 1 -> 0.01, then rescaling to a radius that shrinks or grows by
  gamma = 0.05, as adv-lib's ``ddn``.
- ``cw-l2``: Carlini-Wagner L2 (S&P 2017): Adam (lr 0.01) in tanh space on
  ``||delta||_2^2 + c * max(z_y - max_{j != y} z_j + kappa, 0)``, binary search over c
  (``binary_steps`` 9, initial ``c`` 1 as torchattacks; adv-lib starts at 1e-2 but runs 10,000
  iterations per step, Bastion 100).
- ``deepfool``: DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2 or L-inf (from the threat
  model): step to the nearest linearized boundary among the ``candidates`` top classes, with
  ``overshoot`` 0.02.

All run in the input's dtype (float32 or float64) on the model's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackConfig, AttackResult, register_attack
from bastion.errors import ConfigError
from bastion.threat import lp_norm, project_l1_box


@dataclass(frozen=True)
class MinNormConfig(AttackConfig):
    """``steps``: iterations (per binary-search step for cw-l2). ``gamma``: radius change per
    step (fmn, ddn). ``alpha``: initial step size (fmn). ``c``: initial constant and
    ``binary_steps`` (cw-l2); ``lr``: Adam's learning rate (cw-l2); ``kappa``: confidence
    (cw-l2). ``overshoot`` and ``candidates`` (deepfool)."""

    gamma: float = 0.05
    alpha: float = 1.0
    c: float = 1.0
    binary_steps: int = 9
    lr: float = 0.01
    kappa: float = 0.0
    overshoot: float = 0.02
    candidates: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma < 1:
            raise ConfigError(f"minimum-norm attack gamma must be in (0, 1), got {self.gamma}")
        if self.binary_steps < 1 or self.candidates < 2:
            raise ConfigError("cw-l2 binary_steps must be >= 1 and deepfool candidates >= 2")


def logit_difference(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Positive while the goal is not met: z_y - max_{j != y} z_j, or max_{j != t} z_j - z_t."""
    cls = y if target is None else target
    own = logits.gather(1, cls.view(-1, 1))[:, 0]
    other = logits.masked_fill(F.one_hot(cls, logits.shape[1]).bool(), float("-inf")).amax(1)
    return own - other if target is None else other - own


def _bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (x.dim() - 1))


def _worst_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The largest perturbation norm the [0, 1] box allows around x."""
    return lp_norm(torch.maximum(x, 1 - x), norm)


def _goal(pred: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return pred != y if target is None else pred == target


class MinimumNormAttack(Attack):
    config_class = MinNormConfig
    minimum_norm = True
    bounded = False
    cost_rank = 60
    norms: tuple[str, ...] = ("linf", "l2", "l1", "l0")

    def __init__(self, config: MinNormConfig, name: str | None = None):
        super().__init__(config, name)
        if config.threat.norm not in self.norms:
            raise ConfigError(f"attack {self.name!r} measures {', '.join(self.norms)} norms, "
                              f"not the {config.threat.norm} threat model {config.threat}")


# ---------------------------------------------------------------------------------------------
# FMN
# ---------------------------------------------------------------------------------------------

def _project_delta(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """delta onto the per-example eps-ball (and the box x + delta in [0, 1])."""
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, _bview(eps, x)), -_bview(eps, x))
    elif norm == "l2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * _bview(torch.clamp(eps / n, max=1.0), x)
    elif norm == "l1":
        return project_l1_box(x, delta, eps)
    else:
        k = eps.floor()
        flat = delta.flatten(1)
        order = flat.abs().argsort(dim=1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(flat.shape[1], device=x.device).expand_as(order))
        keep = ranks < k.view(-1, 1)
        delta = (flat * keep).view_as(delta)
    return (x + delta).clamp(0, 1) - x


def fmn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, n_iter: int, target: torch.Tensor | None,
        alpha_init: float = 1.0, gamma_init: float = 0.05, gamma_final: float = 0.001) -> torch.Tensor:
    """Fast Minimum-Norm attack (see module docstring); returns the best adversarial point per
    example (``x`` where none was found)."""
    dual = {"linf": "l1", "l2": "l2", "l1": "linf", "l0": "l2"}[norm]
    alpha_final = alpha_init / 100
    delta = torch.zeros_like(x, requires_grad=True)
    best_norm = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    best_adv = x.clone()
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    eps = torch.full_like(best_norm, float("inf"))
    worst = _worst_norm(x, norm)
    for i in range(n_iter):
        cosine = (1 + math.cos(math.pi * i / n_iter)) / 2
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        d_norm = lp_norm(delta.detach(), norm)
        logits = model(x + delta)
        diff = logit_difference(logits, y, target)
        (grad,) = torch.autograd.grad(diff.sum(), delta)
        with torch.no_grad():
            # the part of the gradient the box lets us follow (a step -grad cannot leave [0, 1]):
            # without it the boundary estimate counts pixels stuck at 0 or 1 and stalls
            xa = x + delta.detach()
            grad = torch.where(((xa <= 0) & (grad > 0)) | ((xa >= 1) & (grad < 0)), torch.zeros_like(grad), grad)
            adv = _goal(logits.argmax(1), y, target)
            both = adv & (d_norm < best_norm)
            found |= adv
            best_norm = torch.where(both, d_norm, best_norm)
            best_adv = torch.where(_bview(both, x), (x + delta).detach(), best_adv)
            if norm == "l0":
                grow = torch.maximum(eps + 1, (eps * (1 + gamma)).floor())
                shrink = torch.minimum(torch.minimum(eps - 1, (eps * (1 - gamma)).floor()), best_norm)
                eps = torch.where(adv, shrink, torch.where(found, grow, d_norm + 1)).clamp_min(0)
            else:
                to_boundary = diff.detach().abs() / lp_norm(grad, dual).clamp_min(1e-12)
                eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best_norm),
                                  torch.where(found, eps * (1 + gamma), d_norm + to_boundary))
            eps = torch.minimum(eps, worst)
            grad = grad / _bview(grad.flatten(1).norm(dim=1).clamp_min(1e-12), x)
            step = alpha_final + (alpha_init - alpha_final) * cosine
            new = delta.detach() - step * grad
            delta = _project_delta(new, x, eps, norm).requires_grad_(True)
    return best_adv


class FMN(MinimumNormAttack):
    """Fast Minimum-Norm attack (Pintor et al. 2021) in the threat model's norm (linf, l2, l1, l0)."""

    def __init__(self, config: MinNormConfig, name: str | None = None):
        super().__init__(config, name)
        suffix = self.name.rsplit("-", 1)[-1]
        if self.name.startswith("fmn-") and suffix != config.threat.norm:
            raise ConfigError(f"attack {self.name!r} needs an {suffix} threat model, got {config.threat}; "
                              f"use fmn-{config.threat.norm}")

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        n_iter = int(cfg.steps or 100)
        target = y_target if cfg.targeted else None
        best = None
        for _ in range(int(cfg.restarts or 1)):
            adv = fmn(model, x, y, self.threat.norm, n_iter, target, alpha_init=float(cfg.alpha),
                      gamma_init=float(cfg.gamma))
            best = adv if best is None else _smaller(model, x, y, target, best, adv, self.threat.norm)
        return _result(model, x, y, target, best)


def _smaller(model, x, y, target, a, b, norm) -> torch.Tensor:
    """Per example, the adversarial one of a, b with the smaller norm."""
    with torch.no_grad():
        ok_a, ok_b = _goal(model(a).argmax(1), y, target), _goal(model(b).argmax(1), y, target)
    na = torch.where(ok_a, lp_norm(a - x, norm), torch.full_like(ok_a, float("inf"), dtype=x.dtype))
    nb = torch.where(ok_b, lp_norm(b - x, norm), torch.full_like(ok_b, float("inf"), dtype=x.dtype))
    return torch.where(_bview(nb < na, x), b, a)


def _result(model, x, y, target, x_adv) -> AttackResult:
    with torch.no_grad():
        ok = _goal(model(x_adv).argmax(1), y, target)
    x_adv = torch.where(_bview(ok, x), x_adv, x)
    return AttackResult(x_adv.detach(), ok, torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device))


# ---------------------------------------------------------------------------------------------
# DDN
# ---------------------------------------------------------------------------------------------

class DDN(MinimumNormAttack):
    """Decoupled Direction and Norm (Rony et al. 2019), L2."""

    norms = ("l2",)

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        n_iter = int(cfg.steps or 100)
        target = y_target if cfg.targeted else None
        gamma = float(cfg.gamma)
        worst = _worst_norm(x, "l2")
        radius = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        best_norm = worst.clone()
        best = x.clone()
        delta = torch.zeros_like(x, requires_grad=True)
        for i in range(n_iter):
            lr = 0.01 + (1 - 0.01) * (1 + math.cos(math.pi * (i + 1) / n_iter)) / 2
            n_now = delta.detach().flatten(1).norm(dim=1)
            logits = model(x + delta)
            ce = F.cross_entropy(logits, y if target is None else target, reduction="none")
            loss = ce if target is None else -ce  # ascend
            (g,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                adv = _goal(logits.argmax(1), y, target)
                both = adv & (n_now < best_norm)
                best_norm = torch.where(both, n_now, best_norm)
                best = torch.where(_bview(both, x), (x + delta).detach(), best)
                gn = g.flatten(1).norm(dim=1)
                zero = gn == 0
                if bool(zero.any()):
                    g[zero] = torch.randn(g[zero].shape, generator=generator, device=g.device, dtype=g.dtype)
                    gn = g.flatten(1).norm(dim=1)
                d = delta.detach() + lr * g / _bview(gn.clamp_min(1e-12), x)
                radius = torch.minimum(radius * (1 - (2 * adv.to(x.dtype) - 1) * gamma), worst)
                d = d * _bview(radius / d.flatten(1).norm(dim=1).clamp_min(1e-12), x)
                d = (x + d).clamp(0, 1) - x
            delta = d.requires_grad_(True)
        with torch.no_grad():
            adv = _goal(model(x + delta).argmax(1), y, target)
            last = adv & (delta.flatten(1).norm(dim=1) < best_norm)
            best = torch.where(_bview(last, x), (x + delta).detach(), best)
        return _result(model, x, y, target, best)


# ---------------------------------------------------------------------------------------------
# Carlini-Wagner L2
# ---------------------------------------------------------------------------------------------

class CarliniWagnerL2(MinimumNormAttack):
    """Carlini-Wagner L2 (2017) with a binary search over the constant c."""

    norms = ("l2",)
    cost_rank = 70

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        n_iter = int(cfg.steps or 100)
        target = y_target if cfg.targeted else None
        n = x.shape[0]
        c = torch.full((n,), float(cfg.c), dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, 1e10)
        best_norm = torch.full_like(c, float("inf"))
        best = x.clone()
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        for _ in range(int(cfg.binary_steps)):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=float(cfg.lr))
            hit = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(n_iter):
                xa = (torch.tanh(w) + 1) / 2
                logits = model(xa)
                l2sq = (xa - x).flatten(1).pow(2).sum(1)
                f = (logit_difference(logits, y, target) + float(cfg.kappa)).clamp_min(0)
                loss = (l2sq + c * f).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    adv = _goal(logits.argmax(1), y, target)
                    nrm = l2sq.detach().sqrt()
                    better = adv & (nrm < best_norm)
                    best_norm = torch.where(better, nrm, best_norm)
                    best = torch.where(_bview(better, x), xa.detach(), best)
                    hit |= adv
            upper = torch.where(hit, torch.minimum(upper, c), upper)
            lower = torch.where(hit, lower, torch.maximum(lower, c))
            c = torch.where(upper < 1e9, (lower + upper) / 2, c * 10)
        return _result(model, x, y, target, best)


# ---------------------------------------------------------------------------------------------
# DeepFool
# ---------------------------------------------------------------------------------------------

class DeepFool(MinimumNormAttack):
    """DeepFool (Moosavi-Dezfooli et al. 2016), L2 or L-inf."""

    norms = ("l2", "linf")
    supports_targeted = False
    cost_rank = 25

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        n_iter = int(cfg.steps or 50)
        linf = self.threat.norm == "linf"
        with torch.no_grad():
            k = min(int(cfg.candidates), model(x[:1]).shape[1])
            order = model(x).argsort(dim=1, descending=True)
        cand = torch.cat([y.view(-1, 1), order[order != y.view(-1, 1)].view(x.shape[0], -1)[:, : k - 1]], dim=1)
        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(n_iter):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            xi = x_adv[idx].detach().requires_grad_(True)
            logits = model(xi)
            still = logits.argmax(1) == y[idx]
            if not bool(still.any()):
                active[idx] = False
                break
            zc = logits.gather(1, cand[idx])
            grads = []
            for j in range(k):
                (gj,) = torch.autograd.grad(zc[:, j].sum(), xi, retain_graph=j < k - 1)
                grads.append(gj)
            g = torch.stack(grads, 1)                       # (B, k, ...)
            w = g[:, 1:] - g[:, :1]
            f = (zc[:, 1:] - zc[:, :1]).detach()
            wn = w.flatten(2).abs().sum(2) if linf else w.flatten(2).norm(dim=2)
            dist = f.abs() / wn.clamp_min(1e-12)
            best = dist.argmin(1)
            wb = w[torch.arange(len(idx)), best]
            fb = f.abs()[torch.arange(len(idx)), best]
            nb = wn[torch.arange(len(idx)), best].clamp_min(1e-12)
            if linf:
                r = _bview((fb + 1e-4) / nb, xi) * torch.sign(wb)
            else:
                r = _bview((fb + 1e-4) / nb.pow(2), xi) * wb
            with torch.no_grad():
                keep = still
                upd = idx[keep]
                r_tot[upd] = r_tot[upd] + r[keep]
                x_adv[upd] = (x[upd] + (1 + float(cfg.overshoot)) * r_tot[upd]).clamp(0, 1)
                active[idx[~still]] = False
        return _result(model, x, y, None, x_adv)


register_attack("fmn-linf", FMN, doc="Fast Minimum-Norm attack, L-inf (threat model linf).", steps=100)
register_attack("fmn-l2", FMN, doc="Fast Minimum-Norm attack, L2 (threat model l2).", steps=100)
register_attack("fmn-l1", FMN, doc="Fast Minimum-Norm attack, L1 (threat model l1).", steps=100)
register_attack("fmn-l0", FMN, doc="Fast Minimum-Norm attack, L0 (threat model l0: eps counts features).",
                steps=100)
register_attack("ddn", DDN, doc="Decoupled Direction and Norm, L2 minimum-norm attack.", steps=100)
register_attack("cw-l2", CarliniWagnerL2, doc="Carlini-Wagner L2 minimum-norm attack (binary search over c).",
                steps=100, binary_steps=9)
register_attack("deepfool", DeepFool, doc="DeepFool minimum-norm attack (L2 or L-inf).", steps=50)

