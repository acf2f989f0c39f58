"""Attack objectives: what the native PGD/APGD engine maximises.

An objective maps a batch to an `ObjectiveOutput`: a per-example loss to maximise, the logits
(or log-probabilities) whose argmax is the prediction being attacked, and optionally an extra
per-example condition an adversary must also meet (e.g. "the detector does not fire"). The
engine turns the prediction and the condition into per-example success; composite (adaptive)
objectives in `attacks.adaptive` plug into the same engine.

Losses (all to be maximised; ``target`` switches to the targeted form):

- ``ce``: cross-entropy of the true class; targeted: minus cross-entropy of the target.
- ``margin`` (Carlini-Wagner): ``max_{j != y} z_j - z_y``; targeted ``z_t - max_{j != t} z_j``.
  The maximum over other classes masks with -inf (never by multiplying with a one-hot).
- ``dlr`` (Croce & Hein 2020): ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``; targeted
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` with z sorted decreasingly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import AttackError


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor            # (B,) to maximise
    logits: torch.Tensor          # (B, K): the prediction under attack is logits.argmax(1)
    valid: torch.Tensor | None = None  # (B,) bool: extra condition for success (None: always met)


class Objective(Protocol):
    """``objective(model, x, y, target) -> ObjectiveOutput``; ``target`` is None (untargeted) or (B,)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None) -> ObjectiveOutput: ...


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    mask = F.one_hot(cls, logits.shape[1]).bool()
    return logits.masked_fill(mask, float("-inf")).amax(dim=1)


def _pick(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, cls.view(-1, 1)).squeeze(1)


# PyTorch's CPU log-softmax over a last dimension shorter than one SIMD vector (fewer than 16
# classes) runs row by row: for 450 x 10 logits it took 72 us forward where the same reduction
# along the first dimension took 15 us (benchmarks/attacks.py (g) measures the effect on PGD)
SHORT_ROW_CLASSES = 16
SHORT_ROW_MIN_BATCH = 128


def cross_entropy(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (B,) of ``logits`` (B, K) at the classes ``cls`` (B,), long:
    ``F.cross_entropy(logits, cls, reduction="none")``. On the CPU with K < 16 classes and
    B >= 128 rows the log-softmax is taken over the transposed logits (the same values to
    rounding: within a few units in the last place for loss and gradient, tests/test_attacks.py);
    2-4x faster forward, ~1.7x forward and backward for 450 x 10 on one core."""
    if (logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1] < SHORT_ROW_CLASSES
            and logits.shape[0] >= SHORT_ROW_MIN_BATCH):
        return F.nll_loss(F.log_softmax(logits.t(), 0).t(), cls, reduction="none")
    return F.cross_entropy(logits, cls, reduction="none")


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    if target is None:
        return cross_entropy(logits, y)
    return -cross_entropy(logits, target)


def margin_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    if target is None:
        return _other_max(logits, y) - _pick(logits, y)
    return _pick(logits, target) - _other_max(logits, target)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    k = logits.shape[1]
    srt = logits.sort(dim=1, descending=True).values
    if target is None:
        if k < 3:
            raise AttackError(f"the DLR loss needs at least 3 classes, the model has {k}; use loss='ce' or 'margin'")
        return -(_pick(logits, y) - _other_max(logits, y)) / (srt[:, 0] - srt[:, 2] + 1e-12)
    if k < 4:
        raise AttackError(f"the targeted DLR loss needs at least 4 classes, the model has {k}; use 'ce' or 'margin'")
    return -(_pick(logits, y) - _pick(logits, target)) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


LOSS_FUNCTIONS = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}


def loss_function(name: str):
    try:
        return LOSS_FUNCTIONS[name]
    except KeyError:
        raise AttackError(f"unknown loss {name!r}; use one of {', '.join(LOSS_FUNCTIONS)}") from None


class LossObjective:
    """A plain loss on the model's logits."""

    def __init__(self, loss: str = "ce"):
        self.loss = loss
        self._fn = loss_function(loss)

    def __call__(self, model, x, y, target):
        logits = model(x)
        return ObjectiveOutput(self._fn(logits, y, target), logits)

    def describe(self) -> str:
        return self.loss
