"""The adaptive attack suite for mixed classifiers (adaptive smoothing, spec sections 6 and 8).

A mixed model ``log((1 - alpha(x)) p_g + alpha(x) p_h)`` can hide its weakness behind the mixing
network: a plain attack on the output must fool the classifier while alpha stays high. The
suite attacks the whole pipeline (bases, features, mixing net, BN in eval mode, alpha range) in
fp32, each attack only on the examples still robust (`attacks.AttackProbe`), so robust accuracy
is the per-example worst case and each record's ``broken_by`` names the attack that set it:

1. ``apgd-ce``, ``apgd-t``: AutoAttack's white-box part on the output log-probabilities;
2. ``mix-apgd-ce-w<w>`` for several w and ``mix-apgd-t-w0.5``: the composite objective
   ``(1 - w) L + w BCE(gamma, 1)`` (`attacks.adaptive.MixingObjective`), which drives alpha down
   towards the non-robust base while attacking the classifier;
3. ``alpha-first``: first push alpha down alone (w = 1), then attack the classifier from there
   inside the same ball (composite margin loss, w = 0.5, so alpha stays low);
4. ``transfer-accurate`` and ``transfer-alpha<a>``: adversaries crafted on the accurate base and
   on a fixed-alpha mixture of the same bases (APGD on the margin, every step), checked on the
   model;
5. ``square`` (torchattacks Square, gradient-free: if it beats the gradient attacks, suspect
   masking) and ``autoattack`` (pyautoattack standard) when that package is installed.

`weak_suite` is what one would run on an ordinary model (PGD on CE and margin); reports show its
number beside the full suite's so the gap is visible, and never report it alone.

    probe = adaptive_probe("linf:0.3", steps=100)
    evaluate(mixed, test, [CleanProbe(), probe], run_dir, config)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacks.adaptive import MixingObjective
from attacks.base import Attack, AttackConfig, AttackError, AttackResult, create_attack
from attacks.evaluation import AttackProbe
from attacks.native import _bshape, _direction, _Outcome, evaluate_objective
from attacks.objectives import LossObjective, ObjectiveOutput
from bastion.threat import ThreatModel


def _named(attack: Attack, name: str) -> Attack:
    attack.name = name
    return attack


class _AllSteps:
    """An objective whose success never holds: the engine keeps every example for every step and
    returns the highest-loss point (for surrogate models and the alpha stage)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, model, x, y, target):
        out = self.inner(model, x, y, target)
        return ObjectiveOutput(out.loss, out.logits, torch.zeros_like(y, dtype=torch.bool))

    def describe(self) -> str:
        return f"all-steps({getattr(self.inner, 'describe', lambda: '?')()})"


# ---------------------------------------------------------------------------------------------
# Alpha-first two-stage attack
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlphaFirstConfig(AttackConfig):
    """alpha_steps: stage-1 steps on BCE(gamma, 1) alone; steps: stage-2 steps on the composite
    ``base`` loss with weight ``weight`` from the stage-1 point (same ball around x)."""

    alpha_steps: int = 50
    weight: float = 0.5
    base: str = "margin"


class AlphaFirst(Attack):
    """Two stages in one ball: drive alpha down (pure mixing term), then attack the classifier from
    there with the composite loss; step sizes 2.5 * eps / steps (signed for linf, normalized for l2)."""

    config_class = AlphaFirstConfig
    cost_rank = 45
    supports_targeted = False

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        threat = cfg.threat
        steps = int(cfg.steps or 100)
        stage1 = _AllSteps(MixingObjective(weight=1.0, base="ce"))
        stage2 = MixingObjective(weight=cfg.weight, base=cfg.base)
        loss0, succ0, _ = evaluate_objective(stage2, model, x, y, None, None, 1, need_grad=False)
        out = _Outcome(x, loss0, succ0)
        idx = out.remaining()
        if idx.numel() == 0:
            return out.result()
        x0, yy = x[idx], y[idx]
        xc = threat.random_start(x0, generator) if cfg.random_start else x0.clone()
        a1 = 2.5 * threat.eps / max(1, cfg.alpha_steps)
        for _ in range(cfg.alpha_steps):
            _, _, g = evaluate_objective(stage1, model, xc, yy, None, None, 1, need_grad=True)
            with torch.no_grad():
                xc = threat.project(x0, xc + a1 * _direction(threat, g))
        a2 = float(cfg.step_size) if cfg.step_size is not None else 2.5 * threat.eps / steps
        best = out.best[idx]
        xb = xc.clone()
        for k in range(steps + 1):
            need = k < steps
            loss, succ, g = evaluate_objective(stage2, model, xc, yy, None, None, 1, need)
            better = loss > best
            best = torch.where(better, loss, best)
            xb = torch.where(better.view(_bshape(xc)), xc, xb)
            if bool(succ.any()):
                out.hit(idx, succ, xc, cfg.alpha_steps + k)
                keep = ~succ
                idx, xc, x0, yy, best, xb = idx[keep], xc[keep], x0[keep], yy[keep], best[keep], xb[keep]
                g = g[keep] if g is not None else None
                if idx.numel() == 0:
                    break
            if not need:
                break
            with torch.no_grad():
                xc = threat.project(x0, xc + a2 * _direction(threat, g))
        out.keep_best(idx, best, xb)
        return out.result()


# ---------------------------------------------------------------------------------------------
# Transfer attacks from a surrogate built out of the attacked mixed model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransferConfig(AttackConfig):
    """source: ``accurate`` (the accurate base g), ``robust`` (h) or ``alpha:<a>`` (the same bases
    mixed with fixed alpha a). The surrogate is attacked with APGD on ``loss`` for every step."""

    source: str = "accurate"
    loss: str = "margin"


class TransferAttack(Attack):
    """Craft adversaries on a surrogate taken from the attacked `MixedClassifier`, keep those
    that fool the model itself."""

    config_class = TransferConfig
    cost_rank = 35
    supports_targeted = False

    def _surrogate(self, model: nn.Module) -> nn.Module:
        src = self.config.source
        if src in ("accurate", "robust"):
            sub = getattr(model, src, None)
            if sub is None:
                raise AttackError(f"transfer source {src!r} needs a mixed classifier, got {type(model).__name__}")
            return sub
        if src.startswith("alpha:") and hasattr(model, "with_fixed_alpha"):
            return model.with_fixed_alpha(float(src[6:]), mixing="probability").eval()
        raise AttackError(f"unknown transfer source {src!r} for {type(model).__name__}: use accurate, robust or "
                          f"alpha:<a> on a mixed classifier")

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        sur = self._surrogate(model)
        inner = create_attack("apgd-ce", cfg.threat, steps=int(cfg.steps or 100), restarts=cfg.restarts,
                              random_start=cfg.random_start, objective=_AllSteps(LossObjective(cfg.loss)))
        x_adv = inner.run(sur, x, y, generator=generator).x_adv
        cfg.threat.check(x, x_adv)
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        success = pred != y
        x_out = torch.where(success.view(_bshape(x)), x_adv, x)
        return AttackResult(x_out, success, torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device))


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------

def autoattack_available() -> bool:
    return importlib.util.find_spec("pyautoattack") is not None


def adaptive_suite(threat: ThreatModel | str, *, steps: int = 100, weights: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
                   n_target_classes: int = 9, transfer_alpha: float = 0.95, square_queries: int = 1000,
                   autoattack: bool | None = None, seed: int = 0) -> list[Attack]:
    """The full adaptive suite (module docstring), in run order. ``autoattack`` None: include
    pyautoattack's standard version when it is installed."""
    t = ThreatModel.parse(threat) if isinstance(threat, str) else threat
    suite: list[Attack] = [
        create_attack("apgd-ce", t, steps=steps, seed=seed),
        create_attack("apgd-t", t, steps=steps, n_target_classes=n_target_classes, seed=seed),
    ]
    for w in weights:
        suite.append(_named(create_attack("apgd-ce", t, steps=steps, seed=seed, objective=MixingObjective(w, "ce")),
                            f"mix-apgd-ce-w{w:g}"))
    suite.append(_named(create_attack("apgd-t", t, steps=steps, n_target_classes=n_target_classes, seed=seed,
                                      objective=MixingObjective(0.5, "dlr")), "mix-apgd-t-w0.5"))
    suite.append(_named(AlphaFirst(AlphaFirstConfig(threat=t, steps=steps, alpha_steps=max(10, steps // 2),
                                                    seed=seed)), "alpha-first"))
    suite.append(_named(TransferAttack(TransferConfig(threat=t, steps=steps, source="accurate", seed=seed)),
                        "transfer-accurate"))
    suite.append(_named(TransferAttack(TransferConfig(threat=t, steps=steps, source=f"alpha:{transfer_alpha:g}",
                                                      seed=seed)), f"transfer-alpha{transfer_alpha:g}"))
    suite.append(_named(create_attack("torchattacks:Square", t, n_queries=square_queries, seed=seed), "square"))
    if autoattack if autoattack is not None else autoattack_available():
        suite.append(create_attack("autoattack", t, seed=seed))
    return suite


def weak_suite(threat: ThreatModel | str, *, steps: int = 50, seed: int = 0) -> list[Attack]:
    """What one runs on an ordinary model: PGD on CE and on the margin (not adaptive)."""
    t = ThreatModel.parse(threat) if isinstance(threat, str) else threat
    return [create_attack("pgd", t, steps=steps, seed=seed), create_attack("pgd-margin", t, steps=steps, seed=seed)]


def adaptive_probe(threat: ThreatModel | str, *, name: str | None = None, **suite_args: Any) -> AttackProbe:
    """An `AttackProbe` running `adaptive_suite` (the default evaluation of any mixed model)."""
    t = ThreatModel.parse(threat) if isinstance(threat, str) else threat
    return AttackProbe(t, adaptive_suite(t, **suite_args), name=name or f"adaptive@{t}")


def weak_probe(threat: ThreatModel | str, *, name: str | None = None, **suite_args: Any) -> AttackProbe:
    """An `AttackProbe` running `weak_suite`, to show beside the adaptive one (never alone)."""
    t = ThreatModel.parse(threat) if isinstance(threat, str) else threat
    return AttackProbe(t, weak_suite(t, **suite_args), name=name or f"weak@{t}")
