"""Gaussian-augmentation training (Cohen et al. 2019, spec section 7): the "Cohen" baseline.

Every minibatch gets fresh i.i.d. ``N(0, sigma^2)`` noise added in pixel space (the model's
normalization is its first layer, so the noise comes *before* normalization, in the same
coordinates as the certificate), and the loss is cross-entropy on the noisy batch. Inputs are
not clipped to [0, 1] (the smoothed classifier sees unclipped noise too). The noise comes from
the step's seeded generator, so training is reproducible and resumable.

    bastion train --objective gaussian --sigma 0.25
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError
from bastion.train import StepContext, StepResult, register_objective


class GaussianAugmentation:
    name = "gaussian"

    def __init__(self, sigma: float = 0.25):
        sigma = float(sigma)
        if not sigma > 0:
            raise ConfigError(f"gaussian objective needs sigma > 0 (e.g. --sigma 0.25), got {sigma}")
        self.sigma = sigma

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        logits = model(x + self.sigma * noise)
        return StepResult(F.cross_entropy(logits, y), logits, {"sigma": self.sigma})

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, "sigma": self.sigma}


def _factory(sigma: float = 0.25, **_ignored: Any) -> GaussianAugmentation:
    return GaussianAugmentation(sigma)


register_objective("gaussian", _factory)
