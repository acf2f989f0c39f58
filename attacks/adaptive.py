"""Composite (adaptive) objectives for defenses that a plain loss on the logits would miss.

Each is an `Objective` plugged into the same native engines (``objective=`` of pgd, apgd-ce,
apgd-t, ...), never a copy of them:

- `DetectorObjective`: attack a classifier and a detector at once: maximise
  ``(1 - w) * L(classifier) - w * score(detector)`` (``base`` L: ce, margin, dlr) or Bryniarski's
  ``selective`` objective; success needs a misclassification AND a detector score at most
  ``threshold`` (when given). `detector_aware_attacks` builds the named suite (`DETECTOR_ATTACKS`;
  `STRONG_DETECTOR_SUITE`: APGD on the margin sum, then APGD-selective) that an honest evaluation
  runs, each attack on the examples still robust.
- `MixingObjective`: for mixed classifiers whose output depends on a mixing weight
  ``alpha = sigmoid(gamma(x))`` (adaptive smoothing): maximise
  ``(1 - w) * L(f(x)) + w * BCE(gamma(x), 1)``; the second term drives alpha down, towards the
  non-robust base, so the attack reaches through the mixing network.
- `bpda(model, forward, backward=None)`: a model wrapper (not an objective) for defenses with a
  non-differentiable input transformation: gradients through ``backward`` (straight-through when
  None), outputs unchanged; the remedy for the ``zero_gradient`` / ``black_box_win`` flags.
- `SmoothedObjective`: SmoothAdv (Salman et al. 2019): cross-entropy of the soft smoothed
  classifier, ``-log mean_m softmax(f(x + sigma * n_m))_y`` over m Gaussian draws; the
  prediction attacked is the argmax of that averaged softmax.

    from attacks.adaptive import DetectorObjective
    atk = create_attack("apgd-ce", threat, objective=DetectorObjective(detector, weight=0.5, threshold=t))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import AttackError, register_attack
from attacks.native import PGD, NativeConfig
from attacks.objectives import ObjectiveOutput, loss_function
from bastion.errors import ConfigError


def _as_scores(s: torch.Tensor, n: int) -> torch.Tensor:
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.shape != (n,):
        raise AttackError(f"the detector must return one score per example, shape ({n},); got {tuple(s.shape)}")
    return s


class DetectorObjective:
    """Fool ``classifier`` (the attacked model) while keeping ``detector(x)`` low.

    detector: module or callable mapping [0, 1] images to one score per example (higher = more
    suspicious). weight: w in [0, 1]. threshold: an adversary only counts when its score is
    <= threshold (None: the detector is only pushed down, not required to stay quiet).
    base: the classifier loss (``ce``, ``margin``, ``dlr``).

    mode ``sum`` (default): maximise ``(1 - w) * L - w * score``. Mode ``selective`` (Bryniarski et
    al. 2022, "Evading adversarial example detectors"): an example still classified correctly
    follows the classifier's margin only; once misclassified it follows ``exp(-(score - threshold))``
    only (always above the margin regime's values, so the engine's best point prefers fooled
    points with low scores); ``weight`` is then unused."""

    MODES = ("sum", "selective")

    def __init__(self, detector: nn.Module | Callable[[torch.Tensor], torch.Tensor], weight: float = 0.5,
                 threshold: float | None = None, base: str = "ce", mode: str = "sum"):
        if not 0 <= weight <= 1:
            raise ConfigError(f"detector objective weight must be in [0, 1], got {weight}")
        if mode not in self.MODES:
            raise ConfigError(f"detector objective mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.detector = detector
        self.weight = float(weight)
        self.threshold = threshold
        self.base = base
        self.mode = mode
        self._fn = loss_function(base)

    def __call__(self, model, x, y, target):
        logits = model(x)
        score = _as_scores(self.detector(x), x.shape[0])
        if self.mode == "selective":
            margin = loss_function("margin")(logits, y, target)  # > 0 iff the goal is met
            z = score - (self.threshold if self.threshold is not None else 0.0)
            loss = torch.where(margin.detach() > 0, torch.exp(-z.clamp(min=-20.0)), margin.clamp(max=0.0))
        else:
            loss = (1 - self.weight) * self._fn(logits, y, target) - self.weight * score
        valid = None if self.threshold is None else score.detach() <= self.threshold
        return ObjectiveOutput(loss, logits, valid)

    def describe(self) -> str:
        w = "" if self.mode == "selective" else f", weight={self.weight}"
        return f"detector(base={self.base}{w}, threshold={self.threshold}, mode={self.mode})"


# The detector-aware attacks an honest evaluation runs, each on the examples still robust
# (worst case per example). On digits against Mahalanobis (Linf 0.1, 100 steps) the CE sum at
# w 0.5 left 88.67% detection-aware robust accuracy, the margin sum 52.00%, APGD-selective 50.00%
# (python -m experiments.leaderboard.adaptive_check).
DETECTOR_ATTACKS: dict[str, tuple[str, str, str]] = {  # name -> (native engine, mode, base)
    "apgd-margin": ("apgd-ce", "sum", "margin"),
    "apgd-selective": ("apgd-ce", "selective", "ce"),
    "pgd-selective": ("pgd", "selective", "ce"),
    "pgd-ce-sum": ("pgd", "sum", "ce"),
}
STRONG_DETECTOR_SUITE = ("apgd-margin", "apgd-selective")


def detector_aware_attacks(detector: nn.Module | Callable[[torch.Tensor], torch.Tensor], threshold: float | None,
                           threat: Any, names: tuple[str, ...] | list[str] = STRONG_DETECTOR_SUITE, *, steps: int,
                           weight: float = 0.5, **params: Any) -> list[tuple[str, Any]]:
    """``[(name, attack)]``: the named detector-aware attacks of `DETECTOR_ATTACKS`, each a native
    engine with a `DetectorObjective` on ``detector`` (a standardized differentiable score, e.g.
    ``det.differentiable()``) whose success needs a score <= ``threshold`` (standardized units).
    ``weight`` goes to the sum modes; ``params`` (``seed`` ...) to every engine. Run them in
    order, each on the examples the earlier ones did not break (`attacks.adaptive` users:
    ``bastion detect``'s ``worst`` mode, the leaderboard's detector entries)."""
    from attacks import create_attack

    unknown = [n for n in names if n not in DETECTOR_ATTACKS]
    if unknown or not names:
        raise ConfigError(f"unknown detector-aware attack(s) {unknown}: use {', '.join(DETECTOR_ATTACKS)}")
    out = []
    for name in names:
        engine, mode, base = DETECTOR_ATTACKS[name]
        obj = DetectorObjective(detector, weight=weight, threshold=threshold, base=base, mode=mode)
        out.append((name, create_attack(engine, threat, steps=steps, objective=obj, **params)))
    return out


class MixingObjective:
    """Reach through a mixing weight: ``(1 - w) * L(f(x)) + w * BCE(gamma(x), 1)``.

    The attacked model must expose its mixing logit: ``outputs(model, x) -> (logits, gamma)``
    (default: ``model.forward_with_mixing(x)``, which mixed classifiers in defenses/ provide;
    ``logits`` may be log-probabilities, ``gamma`` the pre-sigmoid mixing score, alpha =
    sigmoid(gamma) the weight of the robust base)."""

    def __init__(self, weight: float = 0.5, base: str = "ce",
                 outputs: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None):
        if not 0 <= weight <= 1:
            raise ConfigError(f"mixing objective weight must be in [0, 1], got {weight}")
        self.weight = float(weight)
        self.base = base
        self._fn = loss_function(base)
        self.outputs = outputs

    def _outputs(self, model, x):
        if self.outputs is not None:
            return self.outputs(model, x)
        fn = getattr(model, "forward_with_mixing", None)
        if fn is None:
            raise AttackError(f"{type(model).__name__} has no forward_with_mixing(x) -> (logits, gamma); "
                              "pass outputs=fn to MixingObjective")
        return fn(x)

    def __call__(self, model, x, y, target):
        logits, gamma = self._outputs(model, x)
        gamma = _as_scores(gamma, x.shape[0])
        # BCE(gamma, 1) = -log sigmoid(gamma) = softplus(-gamma): larger when alpha is smaller
        loss = (1 - self.weight) * self._fn(logits, y, target) + self.weight * F.softplus(-gamma)
        return ObjectiveOutput(loss, logits)

    def describe(self) -> str:
        return f"mixing(base={self.base}, weight={self.weight})"


class SmoothedObjective:
    """SmoothAdv: CE of the soft smoothed classifier ``mean_m softmax(f(x + sigma n_m))``.

    num_noise: m draws per example and step (drawn from the attack's forked RNG, fresh each
    step). batch: examples x draws per forward pass (memory bound)."""

    def __init__(self, sigma: float, num_noise: int = 16, batch: int = 4096):
        if sigma <= 0 or num_noise < 1:
            raise ConfigError("smoothed objective needs sigma > 0 and num_noise >= 1")
        self.sigma = float(sigma)
        self.num_noise = int(num_noise)
        self.batch = int(batch)

    def __call__(self, model, x, y, target):
        from certify.smoothing import SoftSmoothed  # the one soft smoothed classifier

        logp = SoftSmoothed(model, self.sigma, self.num_noise, self.batch)(x)
        cls = y if target is None else target
        nll = F.nll_loss(logp, cls, reduction="none")
        return ObjectiveOutput(nll if target is None else -nll, logp)

    def describe(self) -> str:
        return f"smoothed(sigma={self.sigma}, num_noise={self.num_noise})"


@dataclass(frozen=True)
class SmoothAdvConfig(NativeConfig):
    """PGD settings plus the smoothing noise ``sigma`` and draws per step ``num_noise``."""

    sigma: float = 0.25
    num_noise: int = 16


class SmoothAdv(PGD):
    """SmoothAdv PGD (Salman et al. 2019) on the smoothed soft classifier of the attacked base
    model; l2 by default in practice, zero start, step 2 * eps / steps."""

    config_class = SmoothAdvConfig
    cost_rank = 60
    step_factor = 2.0

    def objective(self) -> Any:
        if self.config.objective is not None:
            return self.config.objective
        return SmoothedObjective(self.config.sigma, self.config.num_noise)


register_attack("smoothadv", SmoothAdv, steps=20, random_start=False)


# ---------------------------------------------------------------------------------------------
# BPDA / straight-through (Athalye et al. 2018, "Obfuscated gradients give a false sense of security")
# ---------------------------------------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    """forward(x) in the forward pass, the gradient of backward(x) in the backward pass."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        ctx.bwd = bwd
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fwd(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.bwd is None:  # identity
            return g, None, None
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.bwd(xx), xx, g)
        return gx, None, None


class BPDA(nn.Module):
    """``model(forward(x))`` whose gradient treats ``forward`` as ``backward`` (identity by
    default): Backward Pass Differentiable Approximation. Output equals the defended model's;
    only gradients change, so attacks built on it are scored on the real model. A random
    ``forward`` (random resizing, noise) composes with EOT: use ``eot_iter`` > 1 (eot-pgd, eot-apgd)."""

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                 backward: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.fwd = forward
        self.bwd = backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.model(_StraightThrough.apply(x, self.fwd, self.bwd))
        return self.model(self.fwd(x))


def bpda(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
         backward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BPDA:
    """Wrap a classifier behind a non-differentiable input transformation for gradient attacks.

    model: the classifier after the transformation; forward: the transformation the defended
    model applies (quantization, JPEG, denoising, thermometer encoding ...); backward: a
    differentiable approximation of it used for gradients only (None: the identity, i.e.
    straight-through). ``bpda(classifier, quantize)`` is the defended model ``classifier(quantize(x))``
    with usable gradients::

        atk = create_attack("pgd", "linf:0.1", steps=50)
        x_adv = atk(bpda(classifier, quantize), x, y)      # then evaluate on the defended model
    """
    return BPDA(model, forward, backward)
