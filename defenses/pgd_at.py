"""PGD adversarial training (Madry et al. 2018): cross-entropy at a k-step PGD adversary.

    create_objective("pgd", eps=8/255, steps=10)            # alpha defaults to 2.5 * eps / steps
    bastion train --objective pgd --eps 8/255 --steps 10

The adversary comes from the attack layer's native PGD (`attacks.native`, the project's one PGD
engine): a uniform random start in the eps-ball, ``steps`` steps of size ``alpha`` (signed for
linf, normalized for l2), projected onto the ball and [0, 1]. Training needs the strongest
point of the whole trajectory, not the first misclassified one, so the attack runs with an
objective that never declares success: every example takes every step and the point of highest
loss is returned. Randomness comes from the step's generator (training stays bit-reproducible
and resumable). The attack sees the model in training mode unless ``attack_in_eval_mode``
(BatchNorm then uses batch statistics, as in the reference implementations); the attack layer
freezes the parameters during the attack and restores modes and flags afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks import create_attack
from attacks.objectives import ObjectiveOutput
from bastion.errors import BastionError, ConfigError
from bastion.threat import ThreatModel
from bastion.train import (
    ObjectiveParams,
    StepContext,
    StepResult,
    param_bool,
    param_float,
    param_int,
    register_objective,
)


@dataclass(frozen=True)
class PGDParams(ObjectiveParams):
    """Madry et al. PGD adversarial training: CE at a k-step PGD adversary (random start).

    eps: radius in [0, 1] pixel units (``8/255`` accepted). norm: linf or l2. steps: PGD steps
    (>= 1). alpha: step size in pixel units (default 2.5 * eps / steps). threat: ``"linf:8/255"``
    instead of eps + norm. attack_in_eval_mode: attack the model in eval mode (default: train mode)."""

    eps: Any = "8/255"
    norm: str = "linf"
    steps: Any = 10
    alpha: Any = None
    threat: Any = None
    attack_in_eval_mode: Any = False

    def __post_init__(self) -> None:
        try:
            if self.threat is not None:
                t = self.threat if isinstance(self.threat, ThreatModel) else ThreatModel.parse(str(self.threat))
            else:
                t = ThreatModel(str(self.norm).lower(), param_float(self.eps, "eps", low=0, low_open=True))
        except BastionError as exc:
            raise ConfigError(str(exc)) from None
        if not t.eps > 0:
            raise ConfigError(f"eps must be > 0, got {t.eps!r}")
        self._set("threat", t)
        self._set("eps", t.eps)
        self._set("norm", t.norm)
        self._set("steps", param_int(self.steps, "steps", low=1))
        alpha = 2.5 * t.eps / self.steps if self.alpha is None else param_float(self.alpha, "alpha", low=0,
                                                                                   low_open=True)
        self._set("alpha", alpha)
        self._set("attack_in_eval_mode", param_bool(self.attack_in_eval_mode, "attack_in_eval_mode"))


class _NeverSucceedCE:
    """CE to maximise whose success condition never holds, so the native engine keeps every
    example for every step (training wants the strongest point, not the first misclassified)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None):
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        return ObjectiveOutput(loss, logits, torch.zeros_like(y, dtype=torch.bool))

    def describe(self) -> str:
        return "ce (all steps)"


class _ModePinned(nn.Module):
    """``model`` with its train/eval mode kept as it is: the attack layer puts what it attacks in
    eval mode, which this wrapper does not pass on (PGD-AT attacks the training-mode model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> _ModePinned:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PGDObjective:
    """CE at the PGD adversary of each batch (see the module docstring)."""

    name = "pgd"
    co_monitor_eps = None  # multi-step training does not overfit catastrophically

    def __init__(self, params: PGDParams | None = None):
        self.params = params or PGDParams()
        p = self.params
        self.threat: ThreatModel = p.threat
        self.steps: int = p.steps
        self.alpha: float = p.alpha
        self.attack = create_attack("pgd", p.threat, steps=p.steps, step_size=p.alpha, random_start=True,
                                    objective=_NeverSucceedCE())

    def adversary(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        """Detached PGD adversaries of ``x`` (N, C, H, W) in [0, 1] for labels ``y`` (N,)."""
        target = model if self.params.attack_in_eval_mode else _ModePinned(model)
        return self.attack(target, x, y, generator=generator)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        x_adv = self.adversary(model, x, y, ctx.generator)
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)

    def config(self) -> dict[str, Any]:
        cfg = {"objective": self.name, "threat": str(self.threat), "steps": self.steps, "alpha": self.alpha}
        if self.params.attack_in_eval_mode:
            cfg["attack_in_eval_mode"] = True
        return cfg


register_objective("pgd", PGDParams, PGDObjective)
