"""Model registry. Every model maps [0, 1] images (N, C, H, W) to logits (N, K); per-channel
normalization is the first layer inside the model (`Normalize`), so attacks and noise act in
pixel space.

    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ModelError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | None = None) -> Callable:
    """Decorator: register ``fn(num_classes, in_channels, image_size, **kwargs) -> nn.Module``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ModelError(f"model {key!r} is registered twice")
        _REGISTRY[key] = fn
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _REGISTRY


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; buffers travel with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net(normalize(x))``: the unit every Bastion classifier is built as."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def create_model(name: str, num_classes: int, in_channels: int, image_size: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 **kwargs) -> NormalizedModel:
    """Build a registered architecture wrapped with its input normalization.

    ``mean``/``std`` default to 0.5 per channel. Unknown names or arguments raise `ModelError`.
    """
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ModelError(f"model {name!r} takes no argument(s) {unknown}; it takes {list(params)[3:]}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"model {name!r}: {arg} must be a positive integer, got {value!r}")
    try:
        mean = [0.5] * in_channels if mean is None else [float(m) for m in mean]
        std = [0.5] * in_channels if std is None else [float(s) for s in std]
    except (TypeError, ValueError):
        raise ModelError(f"mean/std must be sequences of {in_channels} numbers, got {mean!r}/{std!r}") from None
    if len(mean) != in_channels or len(std) != in_channels:
        raise ModelError(f"mean/std need {in_channels} values (one per channel), got {len(mean)}/{len(std)}")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ModelError(f"mean must be finite and std finite and > 0, got mean {mean} std {std}")
    try:
        net = fn(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot build model {name!r} with {kwargs}: {exc}") from None
    return NormalizedModel(net, mean, std)


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------

@register_model("mlp")
def mlp(num_classes: int, in_channels: int, image_size: int, hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """Fully connected ReLU network on the flattened image."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int, image_size: int, width: int = 32,
              batchnorm: bool = False) -> nn.Module:
    """Two 3x3 conv blocks (width, 2*width) with one 2x2 max-pool each, then a 128-unit head.

    Meant for 8x8 to 32x32 inputs (digits, MNIST, CIFAR at small scale)."""
    if image_size < 4:
        raise ModelError("small_cnn needs image_size >= 4")

    def block(cin: int, cout: int) -> list[nn.Module]:
        mods: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
        if batchnorm:
            mods.append(nn.BatchNorm2d(cout))
        return mods + [nn.ReLU(), nn.MaxPool2d(2)]

    side = image_size // 4
    return nn.Sequential(*block(in_channels, width), *block(width, 2 * width), nn.Flatten(),
                         nn.Linear(2 * width * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))


@register_model("conv_linear")
def conv_linear(num_classes: int, in_channels: int, image_size: int, width: int = 8) -> nn.Module:
    """One 3x3 conv (stride 1, pad 1) + ReLU + a linear head: the catastrophic-overfitting
    testbed of the AAER spec (section 13, "digits-x4")."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * image_size * image_size, num_classes))


class _PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) in the CIFAR layout used by Wong et al./AAER."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, n in enumerate(num_blocks):
            cout = width * (2 ** i)
            for j in range(n):
                layers.append(_PreActBlock(cin, cout, stride=(1 if i == 0 or j > 0 else 2)))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int, in_channels: int, image_size: int, width: int = 64) -> nn.Module:
    """PreAct-ResNet-18 (CIFAR definition); ``width`` < 64 gives the narrow CPU variant."""
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, width)


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        sc = x if self.equal else self.shortcut(o)
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + sc


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016), CIFAR definition."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ModelError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(_WideBlock(cin, w, stride=(2 if i > 0 and j == 0 else 1), dropout=dropout))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("wrn28_10")
def wrn28_10(num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    """WideResNet-28-10."""
    return WideResNet(28, 10, num_classes, in_channels, dropout)


@register_model("wrn")
def wrn(num_classes: int, in_channels: int, image_size: int, depth: int = 16, widen: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """WideResNet of any depth/width (small ones for tests)."""
    return WideResNet(depth, widen, num_classes, in_channels, dropout)
