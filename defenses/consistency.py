"""Consistency-model smoothing (rRCM-style, spec consistency-smoothing.md): models and objectives.

- Time-conditioned encoders ``E(u, t) -> h`` (``u = c_in(t) * x_t`` in model space [-1, 1] scaled,
  ``t`` (B,) EDM levels): `TimeMLPEncoder` (the CPU default of spec section 9), `TimeCNNEncoder`
  and `TimeViTEncoder` (tokens ``[cls, time, patches]``, pre-LN blocks, qkv without bias).
- `Projector` (pretraining only) and `RRCMPretrainer` (online encoder + projector and the EMA
  teacher as non-trainable submodules, so ``fit`` checkpoints and resumes the teacher too).
- `RRCMClassifier`: the base classifier ``f(x') = head(E(c_in(t*) (2x' - 1), t*))`` on [0, 1]
  images, ``t*`` the grid level closest to ``2 sigma`` (section 5). One encoder pass per sample.
- Objectives for `bastion.train.fit`: ``rrcm_pretrain`` (contrastive + trajectory-consistency
  InfoNCE, curriculum, teacher EMA; section 4) and ``consistency`` (Jeong & Shin consistency
  regularisation under Gaussian noise: rRCM fine-tuning, and from scratch the "Gaussian +
  consistency" baseline; section 6), with an optional linear ramp of lambda (a from-scratch run
  with lambda 20 collapses to one class on digits, spec section 9).

Choices recorded (spec section 6 ambiguities and CPU scale): the head is trained (``train_head``
false freezes it: the released code's behaviour); the teacher EMA is applied at the start of the
next step (fit owns the optimiser step), so the last step's update is not applied; no grad-norm
clipping, warm-up or layer-wise lr decay (fit's schedules: cosine without warm-up); the slow EMA of
the online weights is not kept; views are random affine + intensity (spec section 9) for every
data set (no colour jitter / blur / solarise for CIFAR).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.checkpoints import register_composite, save_composite
from bastion.errors import ConfigError
from bastion.train import (
    ObjectiveParams,
    StepContext,
    StepResult,
    param_bool,
    param_float,
    param_int,
    register_objective,
)
from defenses.consistency_math import T_MIN, c_in, curriculum_levels, edm_grid, ema_rate, sigma_level

# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal embedding (cos half, then sin half) of ``c_noise(t) = 250 ln t``; t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = (250.0 * torch.log(t.float())).unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class TimeMLPEncoder(nn.Module):
    """Flattened input ++ a ``temb``-d time embedding -> GELU MLP -> ``out`` -> LayerNorm (= h)."""

    def __init__(self, in_shape: tuple[int, int, int], hidden: int = 256, depth: int = 3, out: int = 128,
                 temb: int = 32):
        super().__init__()
        self.temb, self.dim = temb, out
        d_in = int(math.prod(in_shape)) + temb
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, out))
        self.norm = nn.LayerNorm(out)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(torch.cat([u.flatten(1), time_embedding(t, self.temb)], dim=1)))


class TimeCNNEncoder(nn.Module):
    """Conv blocks whose channels are shifted by a projection of the time embedding; pooled, LayerNorm."""

    def __init__(self, in_shape: tuple[int, int, int], width: int = 32, out: int = 128, temb: int = 32):
        super().__init__()
        c = in_shape[0]
        self.temb, self.dim = temb, out
        self.convs = nn.ModuleList([nn.Conv2d(c, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1),
                                    nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2)])
        self.tproj = nn.ModuleList([nn.Linear(temb, m.out_channels) for m in self.convs])
        self.fc = nn.Linear(2 * width, out)
        self.norm = nn.LayerNorm(out)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = time_embedding(t, self.temb)
        h = u
        for conv, tp in zip(self.convs, self.tproj):
            h = F.gelu(conv(h) + tp(e)[:, :, None, None])
        return self.norm(self.fc(h.mean(dim=(2, 3))))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.n2(x))


class TimeViTEncoder(nn.Module):
    """ViT with tokens ``[cls, time, patch_1..patch_P]``; the time token is the raw sinusoidal embedding."""

    def __init__(self, in_shape: tuple[int, int, int], patch: int = 2, dim: int = 64, depth: int = 4, heads: int = 4):
        super().__init__()
        c, h, w = in_shape
        if h % patch or w % patch or dim % heads:
            raise ConfigError(f"ViT: image {h}x{w} must be divisible by patch {patch} and dim {dim} by heads {heads}")
        self.dim = dim
        self.patch = nn.Conv2d(c, dim, patch, stride=patch)
        p = (h // patch) * (w // patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.nn.init.trunc_normal_(torch.zeros(1, p + 2, dim), std=0.02))
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.patch(u).flatten(2).transpose(1, 2)
        tt = time_embedding(t, self.dim).unsqueeze(1).to(x.dtype)
        x = torch.cat([self.cls.expand(len(x), -1, -1), tt, x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])


ENCODERS = {"mlp": TimeMLPEncoder, "cnn": TimeCNNEncoder, "vit": TimeViTEncoder}


def build_encoder(spec: dict[str, Any], in_shape: tuple[int, int, int] | list[int]) -> nn.Module:
    """``spec``: ``{"kind": "mlp" | "cnn" | "vit", **constructor kwargs}`` (JSON values)."""
    spec = dict(spec)
    kind = spec.pop("kind", "mlp")
    if kind not in ENCODERS:
        raise ConfigError(f"unknown encoder kind {kind!r}: use {', '.join(ENCODERS)}")
    return ENCODERS[kind](tuple(int(v) for v in in_shape), **spec)


class Projector(nn.Module):
    """``D -> H -> H -> out``, no biases, BatchNorm + ReLU after the first two layers."""

    def __init__(self, dim: int, hidden: int = 256, out: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, out, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def encode(encoder: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``E(c_in(t) x_t, t)``; x_t (B, C, H, W) in model space, t (B,) levels."""
    scale = 1.0 / torch.sqrt(t.float() ** 2 + 0.25)
    return encoder(x_t * scale.view(-1, 1, 1, 1).to(x_t.dtype), t)


class RRCMPretrainer(nn.Module):
    """Online encoder + projector and their EMA teacher (``teacher_*``, no gradients)."""

    def __init__(self, encoder: dict[str, Any], in_shape: tuple[int, int, int] | list[int], proj_hidden: int = 256,
                 proj_out: int = 64):
        super().__init__()
        self.encoder = build_encoder(encoder, in_shape)
        self.projector = Projector(self.encoder.dim, proj_hidden, proj_out)
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, mu: float) -> None:
        for src, dst in ((self.encoder, self.teacher_encoder), (self.projector, self.teacher_projector)):
            for p, q in zip(src.parameters(), dst.parameters()):
                q.mul_(mu).add_(p.detach(), alpha=1 - mu)
            for b, c in zip(src.buffers(), dst.buffers()):
                c.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Representation at the clean end: x (B, C, H, W) in [0, 1] -> h (B, D)."""
        t = torch.full((len(x),), T_MIN, device=x.device)
        return encode(self.encoder, 2 * x - 1, t)


class RRCMClassifier(nn.Module):
    """``f(x') = head(E(c_in(t*) (2x' - 1), t*))``: [0, 1] images (B, C, H, W) -> logits (B, K)."""

    def __init__(self, encoder: dict[str, Any], in_shape: tuple[int, int, int] | list[int], num_classes: int,
                 sigma: float):
        super().__init__()
        self.encoder = build_encoder(encoder, in_shape)
        self.head = nn.Linear(self.encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.sigma = float(sigma)
        self.level, self.t_star = sigma_level(self.sigma)
        self.c_in = c_in(self.t_star)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(x),), self.t_star, device=x.device)
        return self.head(self.encoder((2 * x - 1) * self.c_in, t))


register_composite("rrcm_classifier", RRCMClassifier)


def save_rrcm_classifier(path, model: RRCMClassifier, encoder: dict[str, Any], in_shape, card: dict[str, Any]):
    """Save as a composite checkpoint (parts ``encoder``, ``head``); ``bastion certify --model`` loads it."""
    args = {"encoder": dict(encoder), "in_shape": list(in_shape), "num_classes": model.head.out_features,
            "sigma": model.sigma}
    return save_composite(path, "rrcm_classifier", {"encoder": (model.encoder, None), "head": (model.head, None)},
                          args=args, card={"input_shape": list(in_shape), "num_classes": model.head.out_features,
                                           **card})

# ---------------------------------------------------------------------------------------------
# Losses and views
# ---------------------------------------------------------------------------------------------


def info_nce(f: torch.Tensor, g: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row ``-log softmax_j(cos(f_i, g_j) / tau)[i]``; (B, D), (B, D) -> (B,)."""
    logits = F.normalize(f, dim=1) @ F.normalize(g, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(len(f), device=f.device), reduction="none")


def affine_views(x: torch.Tensor, g: torch.Tensor | torch.Generator) -> torch.Tensor:
    """Random affine (rotation +-10 deg, translation +-1 px, scale 0.9-1.1) times U(0.7, 1.3), in [0, 1]."""
    n, _, h, w = x.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, device=x.device)

    ang, s = u(-10, 10) * math.pi / 180, u(0.9, 1.1)
    tx, ty = u(-1, 1) * 2 / w, u(-1, 1) * 2 / h
    theta = torch.stack([torch.stack([torch.cos(ang) / s, -torch.sin(ang) / s, tx], 1),
                         torch.stack([torch.sin(ang) / s, torch.cos(ang) / s, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    return (out * u(0.7, 1.3).view(-1, 1, 1, 1)).clamp(0, 1)


@dataclass(frozen=True)
class PretrainParams(ObjectiveParams):
    """rRCM pretraining: contrastive (clean end, EMA teacher) + trajectory-consistency InfoNCE.

    tau: temperature. ema_start/ema_end/ema_a: teacher EMA ramp (spec: 0.99 -> 0.9999, A 15; digits
    0.99 -> 0.999). use_ctr/use_con: the two terms (ablations). con_target: stopgrad (online) | ema
    (teacher). per_sample_index: draw the level index n per example instead of per batch."""

    tau: Any = 0.2
    ema_start: Any = 0.99
    ema_end: Any = 0.999
    ema_a: Any = 15.0
    use_ctr: Any = True
    use_con: Any = True
    con_target: Any = "stopgrad"
    per_sample_index: Any = False

    def __post_init__(self) -> None:
        self._set("tau", param_float(self.tau, "tau", low=0, low_open=True))
        for k in ("ema_start", "ema_end"):
            v = param_float(getattr(self, k), k, low=0)
            if v >= 1:
                raise ConfigError(f"{k} must be in [0, 1), got {v}")
            self._set(k, v)
        self._set("ema_a", param_float(self.ema_a, "ema_a", low=0, low_open=True))
        for k in ("use_ctr", "use_con", "per_sample_index"):
            self._set(k, param_bool(getattr(self, k), k))
        if not (self.use_ctr or self.use_con):
            raise ConfigError("rrcm_pretrain needs use_ctr or use_con (or both)")
        if self.con_target not in ("stopgrad", "ema"):
            raise ConfigError(f"con_target must be stopgrad or ema, got {self.con_target!r}")


class RRCMPretrain:
    """One pretraining step on an `RRCMPretrainer` (section 4). Returns no logits (no accuracy)."""

    name = "rrcm_pretrain"
    co_monitor_eps = None
    # per image per step, in encoder forward-equivalents (a pass with gradient ~ 3 forwards):
    # online v1, v2, x_n with gradient (9) + teacher v1, v2 and the x_{n+1} target (3)
    forward_equivalents = 12

    def __init__(self, p: PretrainParams):
        self.p = p

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        if not isinstance(model, RRCMPretrainer):
            raise ConfigError("rrcm_pretrain trains an RRCMPretrainer (defenses.consistency)")
        p, g, k, total = self.p, ctx.generator, ctx.iteration, ctx.total_iterations
        mu = ema_rate(k, total, p.ema_start, p.ema_end, p.ema_a)
        if k > 0:  # the update after step k-1 (fit owns the optimiser step)
            model.update_teacher(mu)
        b = len(x)
        eps = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        levels = curriculum_levels(k, total)
        grid = torch.tensor(edm_grid(levels), device=x.device, dtype=x.dtype)
        n = (torch.randint(0, levels - 1, (b,), generator=g, device=x.device) if p.per_sample_index
             else torch.randint(0, levels - 1, (1,), generator=g, device=x.device).expand(b))
        t_n, t_n1 = grid[n], grid[n + 1]
        xs = 2 * x - 1
        stats: dict[str, float] = {"levels": float(levels), "ema": mu}
        loss = x.new_zeros(())
        inputs, ts = [], []
        if p.use_ctr:
            v1, v2 = 2 * affine_views(x, g) - 1, 2 * affine_views(x, g) - 1
            tmin = torch.full((b,), T_MIN, device=x.device, dtype=x.dtype)
            inputs += [v1 + T_MIN * eps, v2 + T_MIN * eps]
            ts += [tmin, tmin]
        if p.use_con:
            inputs.append(xs + t_n.view(-1, 1, 1, 1) * eps)
            ts.append(t_n)
        h = encode(model.encoder, torch.cat(inputs), torch.cat(ts))
        if p.use_ctr:
            a = model.projector(h[:2 * b])
            with torch.no_grad():
                bt = model.teacher_projector(encode(model.teacher_encoder, torch.cat(inputs[:2]), torch.cat(ts[:2])))
            l_ctr = (info_nce(a[:b], bt[b:], p.tau) + info_nce(a[b:], bt[:b], p.tau)).mean()
            loss = loss + l_ctr
            stats["ctr"] = float(l_ctr.detach())
        if p.use_con:
            target_enc = model.encoder if p.con_target == "stopgrad" else model.teacher_encoder
            with torch.no_grad():
                w = encode(target_enc, xs + t_n1.view(-1, 1, 1, 1) * eps, t_n1)
            l_con = info_nce(h[-b:], w, p.tau).mean()
            loss = loss + l_con
            stats["con"] = float(l_con.detach())
        return StepResult(loss, None, stats)

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, **self.p.to_dict()}


@dataclass(frozen=True)
class ConsistencyParams(ObjectiveParams):
    """Consistency regularisation (Jeong & Shin 2020) under N(0, sigma^2) pixel noise.

    sigma: noise std in [0, 1] pixel units. m: noisy copies per image. lam: weight of mean_i
    KL(p_bar || p_i). eta: weight of the entropy H(p_bar). lam_ramp_epochs: lambda rises linearly
    from 0 over this many epochs (0: constant; guards against collapse to one class)."""

    sigma: Any = 0.25
    m: Any = 2
    lam: Any = 10.0
    eta: Any = 0.5
    lam_ramp_epochs: Any = 0

    def __post_init__(self) -> None:
        self._set("sigma", param_float(self.sigma, "sigma", low=0, low_open=True))
        self._set("m", param_int(self.m, "m", low=1))
        self._set("lam", param_float(self.lam, "lam", low=0))
        self._set("eta", param_float(self.eta, "eta", low=0))
        self._set("lam_ramp_epochs", param_float(self.lam_ramp_epochs, "lam_ramp_epochs", low=0))


class ConsistencyRegularization:
    """``CE(all m*B logits) + lam * mean_i KL(p_bar || p_i) + eta * H(p_bar)`` on noisy copies."""

    name = "consistency"
    co_monitor_eps = None

    def __init__(self, p: ConsistencyParams):
        self.p = p
        self.forward_equivalents = 3 * p.m

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        p = self.p
        xm = x.repeat(p.m, 1, 1, 1)
        noise = torch.randn(xm.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        logits = model(xm + p.sigma * noise)
        ce = F.cross_entropy(logits, y.repeat(p.m))
        logp = F.log_softmax(logits, dim=1).view(p.m, len(x), -1)
        p_bar = logp.exp().mean(0)
        log_pbar = p_bar.clamp_min(1e-12).log()
        kl = (p_bar.unsqueeze(0) * (log_pbar.unsqueeze(0) - logp)).sum(-1).mean()
        ent = -(p_bar * log_pbar).sum(-1).mean()
        lam = p.lam * (min(1.0, ctx.progress / p.lam_ramp_epochs) if p.lam_ramp_epochs > 0 else 1.0)
        loss = ce + lam * kl + p.eta * ent
        return StepResult(loss, logits[:len(x)], {"ce": float(ce.detach()), "kl": float(kl.detach()),
                                                  "entropy": float(ent.detach()), "lam": lam})

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, **self.p.to_dict()}


register_objective("rrcm_pretrain", PretrainParams, RRCMPretrain)
register_objective("consistency", ConsistencyParams, ConsistencyRegularization)
