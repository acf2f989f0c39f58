"""Deep-kernel MMD on EPS (Liu et al. 2020, as used by EPS-AD; spec section 3).

Kernel on two EPS tensors a, b (flattened for the input-space term):

    k(a, b) = [(1 - e) exp(-Dphi / s0) + e] * exp(-Dx / s),  Dphi = ||phi(a) - phi(b)||^2, Dx = ||a - b||^2

with ``e = sigmoid(e_raw)``, ``s = s_raw^2``, ``s0 = s0_raw^2`` learned with the feature net phi.
``feature_only=True`` is the released demo's kernel ``exp(-Dphi / s0)``.

Estimators on Gram matrices (n x n, equal sizes for the U-statistic):

- `mmd2_unbiased`: ``[sum_{i!=j} Kxx + sum_{i!=j} Kyy - 2 sum_{i!=j} Kxy] / (n (n-1))``
- `mmd2_biased`: ``mean Kxx + mean Kyy - 2 mean Kxy`` (any sizes)
- `mmd2_variance`: ``4 (V1 - V2^2)`` with ``H = Kxx + Kyy - Kxy - Kxy^T``, ``V1 = ||rowsum(H)/n||^2/n``,
  ``V2 = sum(H)/n^2``;  `j_statistic`: ``MMD2_u / sqrt(var + 1e-8)`` (training maximises it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bastion.errors import ConfigError


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a (n, d) and b (m, d) -> (n, m), >= 0."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1).unsqueeze(0)
    return d.clamp_min(0)


def gaussian_gram(a: torch.Tensor, b: torch.Tensor, bandwidth: float | torch.Tensor) -> torch.Tensor:
    """``exp(-||a_i - b_j||^2 / bandwidth)`` on flattened tensors -> (n, m)."""
    return torch.exp(-sq_dists(a.flatten(1), b.flatten(1)) / bandwidth)


def mmd2_biased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    n = kxx.shape[0]
    if kyy.shape[0] != n or kxy.shape != (n, n) or n < 2:
        raise ConfigError(f"the one-sample U-statistic needs equal sizes n >= 2, got {tuple(kxx.shape)}, "
                          f"{tuple(kyy.shape)}, {tuple(kxy.shape)}")
    off = lambda k: k.sum() - k.diagonal().sum()  # noqa: E731
    return (off(kxx) + off(kyy) - 2 * off(kxy)) / (n * (n - 1))


def mmd2_variance(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    n = kxx.shape[0]
    h = kxx + kyy - kxy - kxy.T
    v1 = (h.sum(1) / n).pow(2).sum() / n
    v2 = h.sum() / n ** 2
    return 4 * (v1 - v2 ** 2)


def j_statistic(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    return mmd2_unbiased(kxx, kyy, kxy) / torch.sqrt(mmd2_variance(kxx, kyy, kxy) + 1e-8)


class FeatureNet(nn.Module):
    """phi: [Conv3x3 s2, LReLU 0.2] -> [Conv3x3 s2, LReLU 0.2, BN] ... -> Linear -> ``out`` features.

    widths (16, 32) is the CIFAR net; ``bn_eps=0.8`` keeps the reference's BatchNorm eps [quirk]."""

    def __init__(self, channels: int, image_size: int, widths: Sequence[int] = (16, 32), out: int = 300,
                 bn_eps: float = 0.8):
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = channels, image_size
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 2, 1), nn.LeakyReLU(0.2)]
            if i > 0:
                layers.append(nn.BatchNorm2d(w, eps=bn_eps))
            cin, side = w, (side + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(cin * side * side, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DeepKernel(nn.Module):
    """The deep kernel (*) with learned ``e``, ``s``, ``s0`` and feature net ``phi``.

    Initialisation [code]: ``e_raw = log(U(0,1) 10^-p)``, ``s_raw = sqrt(2 H W m)``, ``s0_raw = sqrt(c)``."""

    def __init__(self, channels: int, image_size: int, *, widths: Sequence[int] = (16, 32), out: int = 300,
                 p: float = 2.0, m: float = 100.0, c: float = 15.0, feature_only: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.phi = FeatureNet(channels, image_size, widths, out)
        u = float(torch.rand((), generator=generator))
        self.e_raw = nn.Parameter(torch.tensor(math.log(max(u, 1e-12) * 10 ** -p)))
        self.s_raw = nn.Parameter(torch.tensor(math.sqrt(2 * image_size * image_size * m)))
        self.s0_raw = nn.Parameter(torch.tensor(math.sqrt(c)))
        self.feature_only = bool(feature_only)

    def gram_parts(self, fa: torch.Tensor, xa: torch.Tensor, fb: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """Gram matrix from features f = phi(.) (n, F) and flattened inputs x (n, D)."""
        kphi = torch.exp(-sq_dists(fa, fb) / self.s0_raw.pow(2))
        if self.feature_only:
            return kphi
        e = torch.sigmoid(self.e_raw)
        return ((1 - e) * kphi + e) * torch.exp(-sq_dists(xa, xb) / self.s_raw.pow(2))

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """k(a_i, b_j) for EPS tensors a (n, C, H, W), b (m, C, H, W) -> (n, m)."""
        return self.gram_parts(self.phi(a), a.flatten(1), self.phi(b), b.flatten(1))


@dataclass(frozen=True)
class KernelTrainConfig:
    """Adam on phi + (e, s, s0), maximising J. ``batch``: B natural vs B adversarial (split evenly
    over the adversarial sets); at most ``max_batches`` per epoch [quirk: 31]."""

    epochs: int = 200
    batch: int = 200
    lr: float = 2e-3
    max_batches: int = 31
    seed: int = 999

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 4 or self.max_batches < 1 or not self.lr > 0:
            raise ConfigError("kernel training needs epochs >= 1, batch >= 4, max_batches >= 1 and lr > 0")


def train_deep_kernel(kernel: DeepKernel, natural: torch.Tensor, adversarial: Sequence[torch.Tensor],
                      cfg: KernelTrainConfig = KernelTrainConfig()) -> list[float]:
    """Train ``kernel`` to separate ``natural`` EPS (N, C, H, W) from the ``adversarial`` EPS sets.

    Loaders are shuffled independently (pairs are not matched); the last incomplete batch is
    dropped. Returns J per epoch (mean over batches). BN is in train mode during training and in
    eval mode afterwards."""
    if not adversarial:
        raise ConfigError("kernel training needs at least one adversarial EPS set")
    g = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    per = max(2, cfg.batch // len(adversarial))
    b = per * len(adversarial)
    n_batches = min(natural.shape[0] // b, *(a.shape[0] // per for a in adversarial), cfg.max_batches)
    if n_batches < 1:
        raise ConfigError(f"kernel training batch {b} is larger than the EPS sets "
                          f"({natural.shape[0]} natural, {[a.shape[0] for a in adversarial]} adversarial)")
    opt = torch.optim.Adam(kernel.parameters(), lr=cfg.lr)
    history: list[float] = []
    kernel.train()
    for _ in range(cfg.epochs):
        pn = torch.randperm(natural.shape[0], generator=g)
        pa = [torch.randperm(a.shape[0], generator=g) for a in adversarial]
        js = []
        for k in range(n_batches):
            x = natural[pn[k * b:(k + 1) * b].to(natural.device)]
            y = torch.cat([a[p[k * per:(k + 1) * per].to(a.device)] for a, p in zip(adversarial, pa)])
            fx, fy = kernel.phi(torch.cat([x, y])).split([b, b])
            xf, yf = x.flatten(1), y.flatten(1)
            kxx, kyy, kxy = (kernel.gram_parts(fx, xf, fx, xf), kernel.gram_parts(fy, yf, fy, yf),
                             kernel.gram_parts(fx, xf, fy, yf))
            j = j_statistic(kxx, kyy, kxy)
            opt.zero_grad(set_to_none=True)
            (-j).backward()
            opt.step()
            js.append(float(j.detach()))
        history.append(sum(js) / len(js))
    kernel.eval()
    return history


def median_bandwidth(x: torch.Tensor) -> float:
    """The median squared pairwise distance of the rows of x (flattened): the Gaussian baseline's width."""
    d = sq_dists(x.flatten(1), x.flatten(1))
    iu = torch.triu_indices(d.shape[0], d.shape[0], 1, device=d.device)
    return float(d[iu[0], iu[1]].median().clamp_min(1e-12))
