"""The one place that imports ``diffusers``: a UNet2DModel epsilon-model with a DDPM (VP) scheduler.

Everything here works offline: models are built from a config or loaded from a *local*
directory (``local_files_only=True``, ``HF_HUB_OFFLINE=1``); nothing is downloaded.

- `build_unet(channels, image_size, ...)`: a small ``UNet2DModel`` of plain Down/Up blocks.
- `build_scheduler()`: ``DDPMScheduler`` with 1000 linear betas 1e-4..0.02 (the VP-SDE's discrete
  form); its ``alphas_cumprod`` is the single source of alpha_bar.
- `train_eps_model(unet, scheduler, images, cfg)`: epsilon-prediction training (MSE between the
  predicted and the drawn noise) on images in [0, 1] (the net sees ``u = 2x - 1``), optionally
  only on timesteps ``t < t_max`` (the small-noise levels EPS queries), with an EMA copy.
- `save_model_dir(dir, unet, scheduler, meta)` / `load_model_dir(dir)`: a local diffusers
  directory (``unet/`` + ``scheduler/`` subfolders, or a bare UNet directory) plus our JSON card.

Install with ``pip install "diffusers>=0.30"`` (the ``diffusion`` extra).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError, ModelError

META_FILE = "bastion_score_model.json"


def diffusers_module():
    """Import diffusers (offline); a one-line `ConfigError` that says how to install it when absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import diffusers
    except ImportError:
        raise ConfigError('detection needs diffusers: pip install "diffusers>=0.30" (the "diffusion" extra)') from None
    return diffusers


def diffusers_available() -> bool:
    try:
        diffusers_module()
        return True
    except ConfigError:
        return False


def build_unet(channels: int, image_size: int, block_out_channels: tuple[int, ...] = (16, 32),
               layers_per_block: int = 1, norm_num_groups: int = 8) -> nn.Module:
    """A ``UNet2DModel`` epsilon-network for (C, H, H) images with plain Down/Up blocks."""
    d = diffusers_module()
    n = len(block_out_channels)
    if image_size % (2 ** (n - 1)):
        raise ConfigError(f"image size {image_size} is not divisible by 2^{n - 1} for {n} UNet levels")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ConfigError(f"UNet channels {block_out_channels} must be multiples of norm_num_groups={norm_num_groups}")
    return d.UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                         block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                         norm_num_groups=norm_num_groups, down_block_types=("DownBlock2D",) * n,
                         up_block_types=("UpBlock2D",) * n)


def build_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """The DDPM scheduler with linear betas: alpha_bar equals the VP-SDE's (b0 = 0.1, b1 = 20)
    up to discretisation."""
    d = diffusers_module()
    return d.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                           beta_start=beta_start, beta_end=beta_end)


@dataclass(frozen=True)
class EpsTrainConfig:
    """Epsilon-model training. ``t_max``: timesteps drawn from ``{0..t_max-1}`` (EPS queries only
    ``t < K``; 1000 = the whole schedule). ``ema``: final EMA decay (ramped as ``min(ema, (1+s)/(10+s))``)."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    t_max: int = 100
    ema: float = 0.995
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("score-model training needs steps >= 1 and batch_size >= 1")
        if not 1 <= self.t_max <= 1000:
            raise ConfigError(f"score-model t_max must be in [1, 1000], got {self.t_max}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"score-model ema must be in [0, 1), got {self.ema}")


@dataclass
class TrainStats:
    steps: int
    images: int
    seconds: float
    final_loss: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def train_eps_model(unet: nn.Module, scheduler: Any, images: torch.Tensor, cfg: EpsTrainConfig,
                    progress: Callable[[int, float], None] | None = None) -> tuple[nn.Module, TrainStats]:
    """Train ``unet`` to predict the noise of ``scheduler.add_noise(u0, z, t)``.

    images: (N, C, H, W) in [0, 1] on the unet's device. Returns (EMA copy in eval mode, stats).
    Batches are drawn with replacement from a generator seeded by ``cfg.seed``."""
    device = next(unet.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    acp = scheduler.alphas_cumprod.to(device)
    u_all = images.to(device) * 2 - 1
    unet.train()
    t0 = time.perf_counter()
    loss_v = float("nan")
    for step in range(cfg.steps):
        idx = torch.randint(0, u_all.shape[0], (cfg.batch_size,), generator=g)
        t = torch.randint(0, cfg.t_max, (cfg.batch_size,), generator=g)
        z = torch.randn((cfg.batch_size,) + tuple(u_all.shape[1:]), generator=g).to(device)
        u0, t = u_all[idx.to(device)], t.to(device)
        a = acp[t].view(-1, 1, 1, 1)
        ut = a.sqrt() * u0 + (1 - a).sqrt() * z
        loss = F.mse_loss(unet(ut, t).sample, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        loss_v = float(loss.detach())
        if progress is not None:
            progress(step, loss_v)
    secs = time.perf_counter() - t0
    unet.eval()
    return ema, TrainStats(cfg.steps, cfg.steps * cfg.batch_size, secs, loss_v)


def save_model_dir(path: str | Path, unet: nn.Module, scheduler: Any, meta: dict[str, Any]) -> Path:
    """Write ``path/unet`` (safetensors), ``path/scheduler`` and ``path/bastion_score_model.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path / META_FILE)  # written last: its presence marks a complete directory
    return path


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(unet in eval mode, scheduler, meta) from a local directory.

    Accepts our layout (``unet/`` + ``scheduler/``) or a bare ``UNet2DModel`` directory (its
    ``config.json`` + weights; the scheduler then defaults to the linear DDPM schedule). Nothing is
    downloaded."""
    d = diffusers_module()
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"score model directory {str(path)!r} does not exist; train one with bastion detect "
                         f"(--score-model is a local diffusers directory)")
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    if not (unet_dir / "config.json").is_file():
        raise ModelError(f"{str(unet_dir)!r} holds no UNet config.json; save the model with save_pretrained()")
    unet = d.UNet2DModel.from_pretrained(unet_dir, local_files_only=True).to(device).eval()
    sched_dir = path / "scheduler"
    scheduler = (d.DDPMScheduler.from_pretrained(sched_dir, local_files_only=True) if sched_dir.is_dir()
                 else build_scheduler())
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    return unet, scheduler, meta


def config_dict(cfg: EpsTrainConfig) -> dict[str, Any]:
    return asdict(cfg)
