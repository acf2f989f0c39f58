"""Diffusion denoised smoothing (DDS, Carlini et al. 2023; randomized-smoothing.md section 9).

`DenoisedClassifier` is a plain base classifier on [0, 1] images: per noise sample, one call of a
DDPM epsilon-network at ``t*(sigma)`` (one-shot denoising, no reverse chain), then a classifier
trained on clean images. With ``x' = x + delta``, ``delta ~ N(0, sigma^2)``:

    y = sqrt(abar*) (2 x' - 1);  x0 = clip((y - sqrt(1 - abar*) eps(y, t*)) / sqrt(abar*), -1, 1)
    logits = C((x0 + 1) / 2)

``t*`` = smallest ``t >= 1`` with ``sqrt((1 - abar_t)/abar_t) >= 2 sigma`` (`consistency_math.ddpm_t_star`);
``abar*`` is the grid value at ``t*`` (the noise actually added is exactly ``2 sigma`` in model
space, so y is a sample of level ``t*`` up to the grid's rounding; the certificate uses sigma).

The epsilon-network is a diffusers ``UNet2DModel`` built and trained by
`detection.diffusers_backend` (the one diffusers wrapper); a locally saved diffusers directory
loads with `load_denoiser_dir`. Saved as a composite checkpoint (parts ``denoiser``, ``classifier``)
so ``bastion certify --model`` certifies it like any other base classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.checkpoints import register_composite, save_composite
from bastion.models import create_model
from defenses.consistency_math import ddpm_t_star

CLASSIFIER_KEYS = ("arch", "arch_kwargs", "num_classes", "input_shape", "mean", "std")


def _scheduler_alphas(schedule: dict[str, Any]) -> torch.Tensor:
    from detection.diffusers_backend import diffusers_module

    d = diffusers_module()
    sched = d.DDPMScheduler(**schedule)
    return sched.alphas_cumprod.clone().float()


class DenoisedClassifier(nn.Module):
    """One-shot DDPM denoiser + clean classifier: (B, C, H, W) in [0, 1] -> logits (B, K)."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, alphas_cumprod: torch.Tensor, sigma: float):
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier
        self.sigma = float(sigma)
        self.t_star = ddpm_t_star(alphas_cumprod, self.sigma)
        a = float(alphas_cumprod[self.t_star])
        self.sqrt_a, self.sqrt_1ma = a ** 0.5, (1 - a) ** 0.5

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """One-shot estimate of the clean image, [0, 1]."""
        y = self.sqrt_a * (2 * x - 1)
        t = torch.full((len(x),), self.t_star, device=x.device, dtype=torch.long)
        eps = self.denoiser(y, t).sample
        x0 = ((y - self.sqrt_1ma * eps) / self.sqrt_a).clamp(-1, 1)
        return (x0 + 1) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoise(x))


def build_denoised(unet: dict[str, Any], schedule: dict[str, Any], classifier: dict[str, Any],
                   sigma: float) -> DenoisedClassifier:
    """Composite builder (``denoised_smoothing``): ``unet`` = build_unet kwargs, ``schedule`` =
    DDPMScheduler kwargs, ``classifier`` = registry card fields."""
    from detection.diffusers_backend import build_unet

    c, h, _ = classifier["input_shape"]
    clf = create_model(classifier["arch"], classifier["num_classes"], c, h, classifier["mean"], classifier["std"],
                       **classifier.get("arch_kwargs", {}))
    net = build_unet(**{**unet, "block_out_channels": tuple(unet["block_out_channels"])})
    return DenoisedClassifier(net, clf, _scheduler_alphas(schedule), sigma)


register_composite("denoised_smoothing", build_denoised)


def save_denoised(path: str | Path, model: DenoisedClassifier, unet_args: dict[str, Any], schedule: dict[str, Any],
                  classifier_card: dict[str, Any], card: dict[str, Any] | None = None) -> Path:
    """Composite checkpoint of ``model`` (parts ``denoiser``, ``classifier``)."""
    clf = {k: classifier_card.get(k, {}) for k in CLASSIFIER_KEYS}
    args = {"unet": dict(unet_args), "schedule": dict(schedule), "classifier": clf, "sigma": model.sigma}
    return save_composite(path, "denoised_smoothing",
                          {"denoiser": (model.denoiser, None), "classifier": (model.classifier, classifier_card)},
                          args=args, card={"recipe": {"method": "denoised_smoothing", "t_star": model.t_star,
                                                      "sigma": model.sigma}, **(card or {})})


def load_denoiser_dir(path: str | Path, classifier: nn.Module, sigma: float,
                      device: str | torch.device = "cpu") -> DenoisedClassifier:
    """A `DenoisedClassifier` from a local diffusers directory (``unet/`` + ``scheduler/``; nothing downloaded)."""
    from detection.diffusers_backend import load_model_dir

    unet, sched, _ = load_model_dir(path, device)
    return DenoisedClassifier(unet, classifier.to(device), sched.alphas_cumprod.clone().float(), sigma).eval()
