"""Gaussian-augmentation training (Cohen et al. 2019, spec section 7): the "Cohen" baseline.

Every minibatch gets fresh i.i.d. ``N(0, sigma^2)`` noise added in pixel space (the model's
normalization is its first layer, so the noise comes *before* normalization, in the same
coordinates as the certificate), and the loss is cross-entropy on the noisy batch. Inputs are
not clipped to [0, 1] (the smoothed classifier sees unclipped noise too). The noise comes from
the step's seeded generator, so training is reproducible and resumable.

    bastion train --objective gaussian --sigma 0.25
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.train import ObjectiveParams, StepContext, StepResult, param_float, register_objective


@dataclass(frozen=True)
class GaussianParams(ObjectiveParams):
    """Gaussian augmentation (Cohen et al. 2019): CE on x + N(0, sigma^2) noise in pixel space.

    sigma: noise standard deviation in [0, 1] pixel units (> 0, finite; e.g. 0.25)."""

    sigma: Any = 0.25

    def __post_init__(self) -> None:
        self._set("sigma", param_float(self.sigma, "sigma (e.g. --sigma 0.25)", low=0, low_open=True))


class GaussianAugmentation:
    name = "gaussian"
    co_monitor_eps = None

    def __init__(self, sigma: float = 0.25):
        self.sigma = GaussianParams(sigma).sigma

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        logits = model(x + self.sigma * noise)
        return StepResult(F.cross_entropy(logits, y), logits, {"sigma": self.sigma})

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, "sigma": self.sigma}


register_objective("gaussian", GaussianParams, lambda p: GaussianAugmentation(p.sigma))
