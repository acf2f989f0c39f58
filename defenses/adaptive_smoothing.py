"""Adaptive smoothing (Bai, Anderson, Kim, Sojoudi 2024; spec adaptive-smoothing.md): the mixed classifier.

Two frozen registry classifiers, an accurate base ``g`` and a robust base ``h``, are mixed in
PROBABILITY space with the weight ``alpha`` of the robust one:

    p(x) = (1 - alpha) * softmax(s_g * g(x)) + alpha * softmax(s_h * h(x)),   output f(x) = log p(x)

computed as a log-sum-exp of log-softmaxes (never ``log`` of summed probabilities). ``alpha`` is
either fixed or produced per input by a mixing network reading intermediate features of both
bases (forward hooks on named stages, the bases are not edited):

    gamma_raw = mixer(features) -> [train only: clamp to mean +- 0.6 std] -> BatchNorm1d (no affine,
    momentum 0.01) -> gamma = k * BN + b   (b = b_train while training and while training's adversary
    runs, b_eval at evaluation) -> alpha = sigmoid(gamma), squashed into [alpha_lo, alpha_hi] at
    evaluation only.

``b_eval`` and ``alpha_range`` are post-hoc knobs (`MixedClassifier.operating_point`): they move the
model along the accuracy-robustness curve without retraining; ``alpha_lo`` is what the certificate
(`certify.adaptive`) uses. Gradients reach the input through alpha (the features are never detached
unless ``detach_features`` is set, a debug switch that must never be used for evaluation).

    mixed = MixedClassifier(g, h, mixer=MixingNet.for_bases(g, h, taps, input_shape), taps=taps)
    log_p, gamma = mixed.forward_with_mixing(x)        # (B, K) log-probabilities, (B,) mixing logits
    save_mixed("runs/mix/model", mixed, g_card, h_card); load_checkpoint("runs/mix/model")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.checkpoints import register_composite, save_composite
from bastion.errors import ConfigError
from bastion.models import create_model

MIXINGS = ("probability", "logit")
FIXED_GAMMA_CLAMP = 30.0  # the mixing logit reported for a fixed alpha (finite, so attack losses stay finite)


# ---------------------------------------------------------------------------------------------
# Feature taps
# ---------------------------------------------------------------------------------------------

class _Tap:
    """Forward hook that keeps the output of one named submodule (picklable, no closure)."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.out = output

    def __getstate__(self) -> dict[str, Any]:
        return {"out": None}


def attach_taps(model: nn.Module, names: Sequence[str]) -> list[_Tap]:
    """Register a `_Tap` on each named submodule of ``model`` (e.g. ``net.1``); returns them in order."""
    taps = []
    for name in names:
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            stages = [n for n, _ in model.named_modules() if n][:12]
            raise ConfigError(f"feature tap {name!r} is not a submodule of {type(model).__name__}; "
                              f"named stages include {stages}") from None
        tap = _Tap()
        sub.register_forward_hook(tap)
        taps.append(tap)
    return taps


# ---------------------------------------------------------------------------------------------
# The mixing network
# ---------------------------------------------------------------------------------------------

class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1-conv shortcut on the pre-activated input when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(o)))) + sc


def _stage(cin: int, cout: int, blocks: int) -> nn.Module:
    """``blocks`` pre-activation residual blocks (first one strided); 0: one plain BN-ReLU-conv3x3/s2."""
    if blocks == 0:
        return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, 2, 1, bias=False))
    return nn.Sequential(*[_PreActBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(blocks)])


class MixingNet(nn.Module):
    """Spec section 3 ("V3"/"V4"): concat stage-1 features of both bases -> stage A (stride 2);
    concat stage-2 features -> 1x1 conv (no bias; identity when the widths already match, as in
    V3) added to it; further strided stages; global average pool; linear -> 1 without bias.

    stage1_channels / stage2_channels: total channels of the concatenated features.
    widths: output width of each stage (stage A first). blocks: residual blocks per stage (0: one
    plain BN-ReLU-conv, the digits variant). Returns the raw score (B,)."""

    def __init__(self, stage1_channels: int, stage2_channels: int, widths: Sequence[int] = (128, 256, 512),
                 blocks: int = 2, stage2_conv: bool | None = None):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"mixing network widths must be positive integers, got {widths}")
        self.stage_a = _stage(stage1_channels, widths[0], blocks)
        need_conv = stage2_channels != widths[0] if stage2_conv is None else bool(stage2_conv)
        self.merge = nn.Conv2d(stage2_channels, widths[0], 1, bias=False) if need_conv else None
        self.stages = nn.Sequential(*[_stage(a, b, blocks) for a, b in zip(widths[:-1], widths[1:])])
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], 1, bias=False)

    def forward(self, stage1: torch.Tensor, stage2: torch.Tensor) -> torch.Tensor:
        a = self.stage_a(stage1)
        m = self.merge(stage2) if self.merge is not None else stage2
        if m.shape[-2:] != a.shape[-2:]:
            m = F.adaptive_avg_pool2d(m, a.shape[-2:])
        out = F.relu(self.bn(self.stages(a + m)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))[:, 0]


class MixingHead(nn.Module):
    """The trained part of a mixed classifier: `MixingNet` plus the BatchNorm1d on its score
    (``affine=False``, momentum 0.01; its running statistics are part of the checkpoint)."""

    def __init__(self, stage1_channels: int, stage2_channels: int, widths: Sequence[int] = (128, 256, 512),
                 blocks: int = 2, stage2_conv: bool | None = None, bn_momentum: float = 0.01):
        super().__init__()
        self.net = MixingNet(stage1_channels, stage2_channels, widths, blocks, stage2_conv)
        self.bn = nn.BatchNorm1d(1, affine=False, momentum=bn_momentum)

    def forward(self, stage1: torch.Tensor, stage2: torch.Tensor) -> torch.Tensor:
        """Normalized score BN(clamp(raw)) (B,); the clamp to mean +- 0.6 std is training-only."""
        raw = self.net(stage1, stage2)
        if self.training and raw.shape[0] > 1:
            m, s = raw.detach().mean(), raw.detach().std()
            raw = torch.maximum(torch.minimum(raw, m + 0.6 * s), m - 0.6 * s)
        return self.bn(raw[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# The mixed classifier
# ---------------------------------------------------------------------------------------------

def _check_range(alpha_range: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in alpha_range)
    if not (0.0 <= lo <= hi <= 1.0):
        raise ConfigError(f"alpha range must satisfy 0 <= lo <= hi <= 1, got [{lo}, {hi}]")
    return lo, hi


def _log_or_ninf(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


class MixedClassifier(nn.Module):
    """``log((1 - alpha) softmax(s_g g(x)) + alpha softmax(s_h h(x)))`` (see the module docstring).

    accurate, robust: classifiers mapping [0, 1] images (B, C, H, W) to logits (B, K); frozen
    (``requires_grad`` off) and always in eval mode. alpha: a fixed weight in [0, 1], or None
    with ``mixer`` (a `MixingHead`) and ``taps`` = {"accurate": [stage1, stage2], "robust":
    [stage1, stage2]} naming the submodules whose outputs it reads. temperatures: (s_g, s_h) > 0.
    alpha_range: [alpha_lo, alpha_hi] applied to the mixing network's alpha at evaluation.
    k, b_train, b_eval: gamma = k * BN(score) + b. mixing: ``probability`` (the method) or
    ``logit`` (the ablation: softmax((1 - alpha) s_g g + alpha s_h h))."""

    def __init__(self, accurate: nn.Module, robust: nn.Module, *, alpha: float | None = None,
                 mixer: MixingHead | None = None, taps: dict[str, Sequence[str]] | None = None,
                 temperatures: Sequence[float] = (1.0, 1.0), alpha_range: Sequence[float] = (0.0, 1.0),
                 k: float = 2.0, b_train: float = 0.4, b_eval: float = 0.4, mixing: str = "probability",
                 detach_features: bool = False, _share_taps: dict[str, list[_Tap]] | None = None):
        super().__init__()
        if (alpha is None) == (mixer is None):
            raise ConfigError("a mixed classifier needs exactly one of alpha (fixed) or mixer (a mixing network)")
        if alpha is not None and not (0.0 <= float(alpha) <= 1.0):
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        if mixing not in MIXINGS:
            raise ConfigError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
        s_g, s_h = (float(t) for t in temperatures)
        if not (s_g > 0 and s_h > 0 and math.isfinite(s_g) and math.isfinite(s_h)):
            raise ConfigError(f"logit temperatures must be finite and > 0, got {list(temperatures)}")
        self.accurate, self.robust = accurate, robust
        for p in list(accurate.parameters()) + list(robust.parameters()):
            p.requires_grad_(False)
        self.accurate.eval()
        self.robust.eval()
        self.alpha = None if alpha is None else float(alpha)
        self.mixer = mixer
        self.taps = {k_: list(v) for k_, v in (taps or {}).items()}
        if mixer is not None:
            if set(self.taps) != {"accurate", "robust"} or any(len(v) != 2 for v in self.taps.values()):
                raise ConfigError("a mixing network needs taps={'accurate': [stage1, stage2], 'robust': [stage1, "
                                  "stage2]} (named submodules of each base)")
            self._taps = _share_taps or {"accurate": attach_taps(accurate, self.taps["accurate"]),
                                         "robust": attach_taps(robust, self.taps["robust"])}
        self.temperatures = (s_g, s_h)
        self.alpha_range = _check_range(alpha_range)
        self.k, self.b_train, self.b_eval = float(k), float(b_train), float(b_eval)
        self.mixing = mixing
        self.detach_features = bool(detach_features)
        self._train_constants = False

    # -- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MixedClassifier:
        super().train(mode)
        self.accurate.eval()  # the bases are frozen: their BatchNorm never sees training batches
        self.robust.eval()
        return self

    @contextlib.contextmanager
    def train_constants(self) -> Iterator[None]:
        """Use the training constants (b_train, no alpha range) whatever the module mode: the
        setting of the adversary that trains the mixing network (spec section 5)."""
        old, self._train_constants = self._train_constants, True
        try:
            yield
        finally:
            self._train_constants = old

    @property
    def adaptive(self) -> bool:
        return self.mixer is not None

    def alpha_floor(self) -> float:
        """A lower bound of alpha over all inputs at evaluation: alpha itself, or alpha_lo."""
        return self.alpha if self.alpha is not None else self.alpha_range[0]

    # -- derived models ------------------------------------------------------------------------
    def _spawn(self, **changes: Any) -> MixedClassifier:
        kw: dict[str, Any] = dict(alpha=self.alpha, mixer=self.mixer, taps=self.taps or None,
                                  temperatures=self.temperatures, alpha_range=self.alpha_range, k=self.k,
                                  b_train=self.b_train, b_eval=self.b_eval, mixing=self.mixing,
                                  detach_features=self.detach_features)
        kw.update(changes)
        if kw["alpha"] is not None:
            kw["mixer"], kw["taps"] = None, None
        else:
            kw["_share_taps"] = self._taps  # the same hooks on the same bases
        out = MixedClassifier(self.accurate, self.robust, **kw)
        return out.train(self.training)

    def operating_point(self, b_eval: float | None = None, alpha_range: Sequence[float] | None = None
                        ) -> MixedClassifier:
        """The same bases and mixing network (shared, not copied) at another (b_eval, alpha range)."""
        if not self.adaptive:
            raise ConfigError("operating_point needs a mixing network; a fixed-alpha model has none")
        return self._spawn(b_eval=self.b_eval if b_eval is None else float(b_eval),
                           alpha_range=self.alpha_range if alpha_range is None else alpha_range)

    def with_fixed_alpha(self, alpha: float, mixing: str | None = None) -> MixedClassifier:
        """The same bases mixed with a fixed alpha (transfer source, sweep point)."""
        return self._spawn(alpha=float(alpha), mixing=mixing or self.mixing)

    # -- forward -------------------------------------------------------------------------------
    def _features(self, which: str) -> list[torch.Tensor]:
        outs = [t.out for t in self._taps[which]]
        if any(o is None for o in outs):
            raise ConfigError(f"the {which} base did not run its tapped stages {self.taps[which]}")
        for t in self._taps[which]:
            t.out = None
        return [o.detach() if self.detach_features else o for o in outs]  # type: ignore[union-attr]

    def _log_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
        """(gamma (B,), log alpha, log(1 - alpha)): tensors (B, 1) or Python floats for a fixed alpha."""
        if self.alpha is not None:
            a = self.alpha
            g = math.log(a) - math.log1p(-a) if 0 < a < 1 else (math.inf if a == 1 else -math.inf)
            gamma = torch.full((x.shape[0],), max(-FIXED_GAMMA_CLAMP, min(FIXED_GAMMA_CLAMP, g)),
                               dtype=x.dtype, device=x.device)
            return gamma, _log_or_ninf(a), (math.log1p(-a) if a < 1 else -math.inf)
        fa, fh = self._features("accurate"), self._features("robust")
        stage1 = torch.cat([fa[0], fh[0]], dim=1)
        stage2 = torch.cat([fa[1], fh[1]], dim=1)
        score = self.mixer(stage1, stage2)
        train_consts = self.training or self._train_constants
        gamma = self.k * score + (self.b_train if train_consts else self.b_eval)
        lo, hi = (0.0, 1.0) if train_consts else self.alpha_range
        if lo == hi:
            la, l1a = _log_or_ninf(lo), (math.log1p(-lo) if lo < 1 else -math.inf)
            return gamma, la, l1a
        span = math.log(hi - lo)
        la = span + F.logsigmoid(gamma)            # log((hi - lo) sigmoid(gamma))
        l1a = span + F.logsigmoid(-gamma)          # log((hi - lo) sigmoid(-gamma))
        if lo > 0:
            la = torch.logaddexp(la, torch.full_like(la, math.log(lo)))
        if hi < 1:
            l1a = torch.logaddexp(l1a, torch.full_like(l1a, math.log1p(-hi)))
        return gamma, la[:, None], l1a[:, None]

    def forward_with_mixing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log mixed probabilities (B, K), mixing logit gamma (B,)); alpha = weight of the robust base."""
        zg, zh = self.accurate(x), self.robust(x)
        s_g, s_h = self.temperatures
        gamma, la, l1a = self._log_weights(x)
        if self.mixing == "logit":
            a = math.exp(la) if isinstance(la, float) else la.exp()
            return F.log_softmax((1 - a) * (s_g * zg) + a * (s_h * zh), dim=1), gamma
        lg, lh = F.log_softmax(s_g * zg, dim=1), F.log_softmax(s_h * zh, dim=1)
        if isinstance(la, float):  # fixed weight: drop a zero-weight term instead of adding -inf
            if la == -math.inf:
                return lg, gamma
            if l1a == -math.inf:
                return lh, gamma
        return torch.logsumexp(torch.stack([l1a + lg, la + lh]), dim=0), gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_mixing(x)[0]

    @torch.no_grad()
    def mixing_weight(self, x: torch.Tensor) -> torch.Tensor:
        """alpha(x) (B,) as the model uses it in its current mode."""
        _, la, _ = self._log_weights_after_bases(x)
        return la.exp().flatten() if isinstance(la, torch.Tensor) else torch.full((x.shape[0],), math.exp(la))

    def _log_weights_after_bases(self, x: torch.Tensor):
        self.accurate(x)
        self.robust(x)
        return self._log_weights(x)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mixing": self.mixing, "temperatures": list(self.temperatures)}
        if self.alpha is not None:
            return d | {"alpha": self.alpha}
        return d | {"alpha_range": list(self.alpha_range), "k": self.k, "b_train": self.b_train,
                    "b_eval": self.b_eval, "taps": self.taps}


# ---------------------------------------------------------------------------------------------
# Building and checkpoints
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def tap_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """(C, H, W) of each named stage's output for one input of ``input_shape`` (a dry forward pass)."""
    taps = attach_taps(model, names)
    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    model(torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu"))
    model.train(was)
    for name in names:  # drop the probe hooks again
        sub = model.get_submodule(name)
        for hid, h in list(sub._forward_hooks.items()):
            if h in taps:
                del sub._forward_hooks[hid]
    return [tuple(t.out.shape[1:]) for t in taps]  # type: ignore[union-attr]


def mixer_for(accurate: nn.Module, robust: nn.Module, taps: dict[str, Sequence[str]], input_shape: Sequence[int],
              widths: Sequence[int] = (128, 256, 512), blocks: int = 2, stage2_conv: bool | None = None
              ) -> MixingHead:
    """A `MixingHead` sized from the bases' tapped feature shapes."""
    sa = tap_shapes(accurate, taps["accurate"], input_shape)
    sh = tap_shapes(robust, taps["robust"], input_shape)
    return MixingHead(sa[0][0] + sh[0][0], sa[1][0] + sh[1][0], widths, blocks, stage2_conv)


BASE_KEYS = ("arch", "arch_kwargs", "num_classes", "input_shape", "mean", "std")


def _base_from_card(card: dict[str, Any]) -> nn.Module:
    c, h, _ = card["input_shape"]
    return create_model(card["arch"], card["num_classes"], c, h, card["mean"], card["std"],
                        **card.get("arch_kwargs", {}))


def build_mixed(accurate: dict[str, Any], robust: dict[str, Any], alpha: float | None = None,
                mixer: dict[str, Any] | None = None, taps: dict[str, list[str]] | None = None,
                temperatures: Sequence[float] = (1.0, 1.0), alpha_range: Sequence[float] = (0.0, 1.0),
                k: float = 2.0, b_train: float = 0.4, b_eval: float = 0.4, mixing: str = "probability"
                ) -> MixedClassifier:
    """The composite builder (``adaptive_smoothing``): structure from the bases' card fields."""
    g, h = _base_from_card(accurate), _base_from_card(robust)
    head = None
    if mixer is not None:
        head = mixer_for(g, h, taps or {}, accurate["input_shape"], mixer.get("widths", (128, 256, 512)),
                         int(mixer.get("blocks", 2)), mixer.get("stage2_conv"))
    return MixedClassifier(g, h, alpha=alpha, mixer=head, taps=taps, temperatures=temperatures,
                           alpha_range=alpha_range, k=k, b_train=b_train, b_eval=b_eval, mixing=mixing)


register_composite("adaptive_smoothing", build_mixed)


def save_mixed(path: str | Path, model: MixedClassifier, accurate_card: dict[str, Any], robust_card: dict[str, Any],
               mixer_args: dict[str, Any] | None = None, card: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as one composite checkpoint (parts ``accurate``, ``robust`` and, when adaptive,
    ``mixer``); the base cards must name registry architectures. ``mixer_args``: the widths /
    blocks / stage2_conv the mixing head was built with."""
    for which, c in (("accurate", accurate_card), ("robust", robust_card)):
        missing = [key for key in BASE_KEYS if c.get(key) is None and key != "arch_kwargs"]
        if missing:
            raise ConfigError(f"the {which} base card lacks {missing}; save registry models with their cards")
    args: dict[str, Any] = {
        "accurate": {key: accurate_card.get(key, {}) for key in BASE_KEYS},
        "robust": {key: robust_card.get(key, {}) for key in BASE_KEYS},
        "alpha": model.alpha, "temperatures": list(model.temperatures), "alpha_range": list(model.alpha_range),
        "k": model.k, "b_train": model.b_train, "b_eval": model.b_eval, "mixing": model.mixing}
    parts: dict[str, tuple[nn.Module, dict[str, Any] | None]] = {
        "accurate": (model.accurate, accurate_card), "robust": (model.robust, robust_card)}
    if model.adaptive:
        if mixer_args is None:
            raise ConfigError("save_mixed needs mixer_args (widths, blocks) for a model with a mixing network")
        args["mixer"] = dict(mixer_args)
        args["taps"] = model.taps
        parts["mixer"] = (model.mixer, None)
    return save_composite(path, "adaptive_smoothing", parts, args=args,
                          card={"recipe": {"method": "adaptive_smoothing", **model.describe()}, **(card or {})})
