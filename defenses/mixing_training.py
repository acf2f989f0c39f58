"""Training the mixing network of a `MixedClassifier` (spec section 5) as an objective of `fit`.

    obj = create_objective("adaptive_mixing", eps=0.3, attacks=["ce", "margin"]).use_pool(train.images)
    fit(mixed, train, obj, TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-5, ...))

Per batch ``(x, y)``:

1. adversarial copies against the CURRENT end-to-end model in eval mode with the training
   constants (b_train, no alpha range): one copy per entry of ``attacks`` (``ce``, ``margin``, or
   ``dlr-t<j>``: targeted DLR towards the j-th highest other class of the clean mixed output),
   each a randomized composite PGD maximising ``(1 - w_i) L(f(x'), y) + w_i BCE(gamma(x'), 1)``
   with per-example ``eps_i = eps * U(eps_scale)``, ``w_i ~ U(0, w_max)``, step
   ``step_factor * eps_i / n_iter``, momentum ``~ U(0, momentum_max)`` and ``n_iter =
   round(chi^2(steps_df))`` per copy (>= 1);
2. the buffer: the clean batch plus ``extra_clean`` x as many clean images drawn from the pool
   (target t = 0) and the adversarial copies (t = 1, even where the attack failed), shuffled and
   split into ``splits`` minibatches, so that every minibatch, and its BatchNorm statistics, mixes
   clean and adversarial inputs;
3. per example ``c_bce BCE(gamma, t) + c_ce CE(f(x), y) + c_prod BCE * CE`` times the clean / adv
   weight; the step's loss is the mean over the buffer (the minibatches' losses are accumulated:
   one optimizer step per batch, as gradient accumulation over the whole buffer).

The bases stay frozen (no gradient ever reaches them; `MixedClassifier` turns ``requires_grad``
off and keeps them in eval mode), so their parameters are bit-identical after training.
The adversary runs on the attack layer's PGD engine with per-example radii, steps and momentum
(`attacks.native.training_adversary`); evaluation uses the full adaptive suite (`attacks.mixing`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.native import training_adversary
from attacks.objectives import ObjectiveOutput, loss_function
from bastion.errors import ConfigError
from bastion.threat import ThreatModel
from bastion.train import ObjectiveParams, StepContext, StepResult, param_float, param_int, register_objective
from defenses.adaptive_smoothing import MixedClassifier

_COPY = re.compile(r"^(ce|margin|dlr-t([1-9][0-9]*))$")


@dataclass(frozen=True)
class MixingParams(ObjectiveParams):
    """Adaptive smoothing: train the mixing network on clean + composite-adversarial buffers.

    eps: attack radius in [0, 1] pixel units (``8/255`` accepted); norm: linf or l2.
    attacks: one adversarial copy per entry (ce, margin, dlr-t<j>). eps_scale: [lo, hi] of the
    per-example radius factor. w_max: BCE weight w ~ U(0, w_max). steps_df: iterations per copy
    ~ round(chi^2(steps_df)). step_factor: step = step_factor * eps_i / iterations. momentum_max:
    momentum ~ U(0, momentum_max). extra_clean: clean images from the pool per batch image.
    splits: minibatches of the buffer. c_bce, c_ce, c_prod: loss weights. clean_weight /
    adv_weight: per-example loss weights."""

    eps: Any = "8/255"
    norm: str = "linf"
    attacks: Any = ("ce", "margin")
    eps_scale: Any = (0.4, 1.1)
    w_max: Any = 0.4
    steps_df: Any = 10
    step_factor: Any = 5.0
    momentum_max: Any = 0.9
    extra_clean: Any = 1
    splits: Any = 4
    c_bce: Any = 1.0
    c_ce: Any = 0.5
    c_prod: Any = 0.1
    clean_weight: Any = 1.0
    adv_weight: Any = 1.0

    def __post_init__(self) -> None:
        self._set("eps", param_float(self.eps, "eps", low=0, low_open=True))
        if str(self.norm).lower() not in ("linf", "l2"):
            raise ConfigError(f"norm must be linf or l2, got {self.norm!r}")
        self._set("norm", str(self.norm).lower())
        atks = [self.attacks] if isinstance(self.attacks, str) else list(self.attacks)
        bad = [a for a in atks if not _COPY.match(str(a))]
        if not atks or bad:
            raise ConfigError(f"attacks must be a non-empty list of ce, margin, dlr-t<j>; got {self.attacks!r}")
        self._set("attacks", tuple(str(a) for a in atks))
        lo, hi = (param_float(v, "eps_scale", low=0, low_open=True) for v in self.eps_scale)
        if lo > hi:
            raise ConfigError(f"eps_scale must be [lo, hi] with lo <= hi, got {list(self.eps_scale)}")
        self._set("eps_scale", (lo, hi))
        self._set("w_max", param_float(self.w_max, "w_max", low=0, high=1))
        self._set("steps_df", param_int(self.steps_df, "steps_df", low=1))
        self._set("step_factor", param_float(self.step_factor, "step_factor", low=0, low_open=True))
        m = param_float(self.momentum_max, "momentum_max", low=0)
        if m >= 1:
            raise ConfigError(f"momentum_max must be < 1, got {m}")
        self._set("momentum_max", m)
        self._set("extra_clean", param_int(self.extra_clean, "extra_clean", low=0))
        self._set("splits", param_int(self.splits, "splits", low=1))
        for k in ("c_bce", "c_ce", "c_prod", "clean_weight", "adv_weight"):
            self._set(k, param_float(getattr(self, k), k, low=0))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device).to(device)


class _CompositeAllSteps:
    """``(1 - w_i) L(f(x'), y[, t]) + w_i softplus(-gamma(x'))`` to maximise, never a success (every
    example takes every step: training wants a diverse adversary, not the first crossing)."""

    def __init__(self, loss: str, weight: torch.Tensor):
        self.fn = loss_function(loss)
        self.weight = weight

    def __call__(self, model, x, y, target):
        logp, gamma = model.forward_with_mixing(x)
        w = self.weight  # (B,): examples are never dropped (no success)
        obj = (1 - w) * self.fn(logp, y, target) + w * F.softplus(-gamma)
        return ObjectiveOutput(obj, logp, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))


def randomized_composite_pgd(model: MixedClassifier, x: torch.Tensor, y: torch.Tensor, loss: str,
                             target: torch.Tensor | None, eps: torch.Tensor, weight: torch.Tensor, steps: int,
                             step_factor: float, momentum: float, norm: str, generator: torch.Generator
                             ) -> torch.Tensor:
    """Composite PGD with momentum inside per-example balls of radius ``eps`` (B,) and [0, 1], on the
    attack layer's one PGD engine (`attacks.native.training_adversary`). Returns detached x'."""
    threat = ThreatModel(norm, float(eps.max()))
    return training_adversary(model, x, y, _CompositeAllSteps(loss, weight), threat, steps, step_factor * eps / steps,
                              generator, target=target, eps=eps, momentum=momentum)


class MixingObjectiveTrainer:
    """The ``adaptive_mixing`` objective (see the module docstring). ``use_pool(images)`` gives the
    clean images the extra clean copies are drawn from (the training set)."""

    name = "adaptive_mixing"
    co_monitor_eps = None

    def __init__(self, params: MixingParams | None = None):
        self.params = params or MixingParams()
        self.pool: torch.Tensor | None = None

    def use_pool(self, images: torch.Tensor) -> MixingObjectiveTrainer:
        """Clean images (N, C, H, W) in [0, 1] for the extra clean part of each buffer."""
        self.pool = images
        return self

    def _adversarial(self, model: MixedClassifier, x: torch.Tensor, y: torch.Tensor,
                     g: torch.Generator) -> list[torch.Tensor]:
        p = self.params
        n = x.shape[0]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with model.train_constants():
                order = None
                if any(a.startswith("dlr-t") for a in p.attacks):
                    with torch.no_grad():
                        logits = model(x)
                    order = logits.argsort(dim=1, descending=True)
                copies = []
                for a in p.attacks:
                    eps = p.eps * _uniform(n, *p.eps_scale, g, x.device)
                    w = _uniform(n, 0.0, p.w_max, g, x.device)
                    chi2 = float((torch.randn(p.steps_df, generator=g, device=g.device) ** 2).sum())
                    steps = max(1, round(chi2))
                    mom = float(_uniform(1, 0.0, p.momentum_max, g, x.device))
                    if a.startswith("dlr-t"):
                        j = int(a[5:])
                        k = order.shape[1]  # type: ignore[union-attr]
                        target = torch.where(order[:, 0] == y, order[:, min(j, k - 1)], order[:, 0])  # type: ignore
                        target = torch.where(target == y, order[:, 1], target)  # type: ignore[index]
                        loss = "dlr" if k >= 4 else "margin"
                    else:
                        target, loss = None, a
                    copies.append(randomized_composite_pgd(model, x, y, loss, target, eps, w, steps, p.step_factor,
                                                           mom, p.norm, g))
        finally:
            for m, t in modes:
                m.training = t
        return copies

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        if not isinstance(model, MixedClassifier) or not model.adaptive:
            raise ConfigError("the adaptive_mixing objective trains a MixedClassifier with a mixing network")
        p = self.params
        g = ctx.generator
        n = x.shape[0]
        adv = self._adversarial(model, x, y, g)
        xs, ys = [x], [y]
        if p.extra_clean:
            if self.pool is None:
                raise ConfigError("adaptive_mixing with extra_clean > 0 needs objective.use_pool(train_images)")
            pick = torch.randint(0, self.pool.shape[0], (p.extra_clean * n,), generator=g, device=g.device).cpu()
            xs.append(self.pool[pick].to(x.device))
            ys.append(torch.full((p.extra_clean * n,), -1, dtype=y.dtype, device=y.device))  # CE not used for them
        n_clean = sum(t.shape[0] for t in xs)
        xs += adv
        ys += [y] * len(adv)
        xb, yb = torch.cat(xs), torch.cat(ys)
        t = torch.cat([torch.zeros(n_clean, device=x.device), torch.ones(xb.shape[0] - n_clean, device=x.device)])
        wts = torch.where(t > 0, torch.tensor(p.adv_weight, device=x.device),
                          torch.tensor(p.clean_weight, device=x.device))
        perm = torch.randperm(xb.shape[0], generator=g, device=g.device).to(x.device)
        total = xb.new_zeros(())
        stats = {"bce": 0.0, "alpha_clean": 0.0, "alpha_adv": 0.0}
        for part in perm.chunk(p.splits):
            logp, gamma = model.forward_with_mixing(xb[part])
            bce = F.binary_cross_entropy_with_logits(gamma, t[part], reduction="none")
            has_y = yb[part] >= 0
            ce = torch.where(has_y, F.nll_loss(logp, yb[part].clamp_min(0), reduction="none"), torch.zeros_like(bce))
            per = p.c_bce * bce + p.c_ce * ce + p.c_prod * bce * ce
            total = total + (wts[part] * per).sum()
            with torch.no_grad():
                a = torch.sigmoid(gamma)
                stats["bce"] += float(bce.sum())
                stats["alpha_clean"] += float(a[t[part] == 0].sum())
                stats["alpha_adv"] += float(a[t[part] == 1].sum())
        m = xb.shape[0]
        stats = {"bce": stats["bce"] / m, "alpha_clean": stats["alpha_clean"] / n_clean,
                 "alpha_adv": stats["alpha_adv"] / max(1, m - n_clean)}
        return StepResult(total / m, None, stats)

    def config(self) -> dict[str, Any]:
        d = self.params.to_dict()
        d["attacks"] = list(d["attacks"])
        d["eps_scale"] = list(d["eps_scale"])
        return {"objective": self.name, **d}


register_objective("adaptive_mixing", MixingParams, MixingObjectiveTrainer)


def freeze_check(model: MixedClassifier) -> dict[str, torch.Tensor]:
    """A copy of the bases' state (to compare bit for bit after training)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("mixer.")}


def bases_unchanged(model: MixedClassifier, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return all(torch.equal(now[k], v) for k, v in before.items())


@dataclass(frozen=True)
class SpectralParams(ObjectiveParams):
    """Cross-entropy plus ``penalty`` x the spectral norm of a linear model's weight (the robust
    base of the certificate check: its pairwise Lipschitz bound is exact by construction)."""

    penalty: Any = 0.1

    def __post_init__(self) -> None:
        self._set("penalty", param_float(self.penalty, "penalty", low=0))


class SpectralObjective:
    name = "spectral_ce"
    co_monitor_eps = None

    def __init__(self, params: SpectralParams | None = None):
        self.params = params or SpectralParams()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        logits = model(x)
        lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if len(lin) != 1:
            raise ConfigError("spectral_ce trains a linear model (mlp with hidden=[])")
        sn = torch.linalg.matrix_norm(lin[0].weight, ord=2)
        loss = F.cross_entropy(logits, y) + self.params.penalty * sn
        return StepResult(loss, logits, {"spectral_norm": float(sn.detach())})

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, "penalty": self.params.penalty}


register_objective("spectral_ce", SpectralParams, SpectralObjective)
