"""Score models for EPS: ``score(u_t, k) -> s`` with ``s ~ grad log p_t(u_t)``.

Conventions (spec section 1): images x in [0, 1], the network sees ``u = 2x - 1``; the VP
schedule is the discrete DDPM one (1000 linear betas 1e-4..0.02), ``alpha_bar`` from the
scheduler's ``alphas_cumprod``. Noise level ``k = 1..K`` stands for continuous ``t_k = k/1000``
and uses DDPM index ``k - 1`` (this is the convention; ``tests/test_eps.py`` pins it). From an
epsilon network ``s(u_t, k) = -eps_hat(u_t, k-1) / sqrt(1 - alpha_bar[k-1])``; a v-prediction
network is converted first (``eps_hat = sqrt(a) v_hat + sqrt(1-a) u_t``).

Any module with ``alpha_bar(k)`` and ``score(u_t, k)`` plugs into `detection.eps` unchanged
(pretrained Score-SDE or guided-diffusion wrappers included).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bastion.errors import ConfigError


class ScoreModel(Protocol):
    """``score(u_t (B, C, H, W), k (B,) int levels 1..1000) -> (B, C, H, W)``; ``alpha_bar(k)`` (B,)."""

    def score(self, u_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor: ...

    def alpha_bar(self, k: torch.Tensor) -> torch.Tensor: ...


class EpsilonScoreModel(nn.Module):
    """An epsilon- (or v-) prediction network as a VP score model.

    net: ``net(u_t, timestep) -> tensor`` or an object with ``.sample`` (diffusers); extra output
    channels (learned variance) are dropped. alphas_cumprod: (T,) the schedule."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"score model prediction type {prediction_type!r} is not supported "
                              f"(use an epsilon or v_prediction network)")
        self.net = net
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())
        self.prediction_type = prediction_type
        self.meta = dict(meta or {})

    @property
    def channels(self) -> int:
        cfg = getattr(self.net, "config", None)
        return int(cfg.in_channels) if cfg is not None else int(self.meta.get("channels", 3))

    def alpha_bar(self, k: torch.Tensor) -> torch.Tensor:
        """alpha_bar of levels k = 1..T (DDPM index k - 1)."""
        return self.alphas_cumprod[k.long() - 1]

    def eps_hat(self, u_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = self.net(u_t, k.long() - 1)
        out = out.sample if hasattr(out, "sample") else out
        out = out[:, : u_t.shape[1]]
        if self.prediction_type == "v_prediction":
            a = self.alpha_bar(k).view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * u_t
        return out

    def score(self, u_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        sigma = (1 - self.alpha_bar(k)).sqrt().view(-1, 1, 1, 1)
        return -self.eps_hat(u_t, k) / sigma

    def forward(self, u_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.score(u_t, k)


def load_score_model(path: str | Path, device: str | torch.device = "cpu") -> EpsilonScoreModel:
    """A score model from a local diffusers directory (ours, or a user's saved ``UNet2DModel``)."""
    from detection.diffusers_backend import load_model_dir

    unet, scheduler, meta = load_model_dir(path, device)
    pt = str(getattr(scheduler.config, "prediction_type", "epsilon"))
    model = EpsilonScoreModel(unet, scheduler.alphas_cumprod, pt, meta | {"path": str(path)})
    return model.to(device).eval()


def train_score_model(images: torch.Tensor, out_dir: str | Path, *, steps: int = 600, batch_size: int = 128,
                      lr: float = 1e-3, t_max: int = 100, ema: float = 0.995, seed: int = 0,
                      block_out_channels: tuple[int, ...] = (16, 32), layers_per_block: int = 1,
                      norm_num_groups: int = 8, device: str | torch.device = "cpu", dataset: str | None = None,
                      progress: Any = None) -> EpsilonScoreModel:
    """Train (or, when ``out_dir`` already holds a finished model, load) a UNet epsilon-model on
    ``images`` (N, C, H, W) in [0, 1]; saves a local diffusers directory at ``out_dir``.

    The card (``bastion_score_model.json``) records the recipe, the number of training images
    and the throughput (images/s)."""
    from detection.diffusers_backend import (
        EpsTrainConfig,
        build_scheduler,
        build_unet,
        config_dict,
        is_model_dir,
        save_model_dir,
        train_eps_model,
    )

    out_dir = Path(out_dir)
    if is_model_dir(out_dir):
        return load_score_model(out_dir, device)
    n, c, h, w = images.shape
    if h != w:
        raise ConfigError(f"the score model needs square images, got {h}x{w}")
    cfg = EpsTrainConfig(steps=steps, batch_size=batch_size, lr=lr, t_max=t_max, ema=ema, seed=seed)
    torch.manual_seed(seed)
    unet = build_unet(c, h, tuple(block_out_channels), layers_per_block, norm_num_groups).to(device)
    scheduler = build_scheduler()
    t0 = time.perf_counter()
    ema_net, stats = train_eps_model(unet, scheduler, images.to(device), cfg, progress=progress)
    meta = {"kind": "eps-score-model", "channels": c, "image_size": h, "dataset": dataset, "train_images": n,
            "recipe": config_dict(cfg), "unet": {"block_out_channels": list(block_out_channels),
                                                 "layers_per_block": layers_per_block,
                                                 "norm_num_groups": norm_num_groups},
            "parameters": sum(p.numel() for p in unet.parameters()), "final_loss": stats.final_loss,
            "train_seconds": round(time.perf_counter() - t0, 2), "train_images_per_s": round(stats.images_per_s, 1),
            "convention": "level k = 1..K uses DDPM index k-1 (t_k = k/1000)"}
    save_model_dir(out_dir, ema_net, scheduler, meta)
    return EpsilonScoreModel(ema_net, scheduler.alphas_cumprod, "epsilon", meta | {"path": str(out_dir)}).eval()
