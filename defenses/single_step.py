"""Single-step adversarial training as objectives of `bastion.train.fit`: FGSM, FGSM-RS, N-FGSM
and AAER (Lin, Yu, Liu, NeurIPS 2023) in its RS- and N- variants. Spec: specs/aaer.md.

One iteration (spec section 3): start x+eta (eta ~ U[-k*eps, k*eps], eta = 0 for k = 0, kept in
the image box); forward 1 gives the start logits/losses; one signed-gradient step of size
a*eps; optional projection to the eps-ball; forward 2 at x+delta. Both forwards run in the
model's current (train) mode, as in the reference code. Examples whose loss *dropped* along the
step are abnormal adversarial examples (AAEs). AAER adds

    r * (lambda2 * C_A + lambda3 * max(V_A - V_N, 0)),   r = lambda1 * m / B,

when the batch holds both AAEs and normal ones (NAEs); otherwise the regularizer is exactly 0.
Gradient semantics (``ce_term_grad=False``, the reference code's): only the adversarial
logits of AAEs inside V_A carry gradient; the start logits/losses, V_N, r and the whole C_A term
are constants. ``ce_term_grad=True`` lets gradient flow through the adversarial losses of AAEs
in C_A (the model is pushed to raise them).

Every objective here (the baselines too) logs per batch the quantities the paper studies:
``aae_count``, ``aae_frac``, ``v_a``, ``v_n``, ``v_gap`` (= V_A - V_N), ``c_a``, ``reg`` (the
regularizer's value), ``reg_grad`` (its part that carries gradient), ``gate_open`` (V_A > V_N in a
mixed batch) and indicators ``has_aae``, ``has_nae``, ``mixed`` so epoch means conditional on a
quantity being defined can be recovered (see `epoch_summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion import distributed
from bastion.errors import BastionError, ConfigError
from bastion.threat import ThreatModel, format_eps, parse_eps
from bastion.train import (
    ObjectiveParams,
    StepContext,
    StepResult,
    param_bool,
    param_float,
    register_objective,
)

# ---------------------------------------------------------------------------------------------
# Published hyper-parameters (spec sections 4 and 6)
# ---------------------------------------------------------------------------------------------

#: variant -> (noise multiplier k, step multiplier a, clip to the eps-ball)
VARIANTS: dict[str, tuple[float, float, bool]] = {
    "fgsm": (0.0, 1.0, True),      # Goodfellow et al.; the CO-prone negative control
    "rs": (1.0, 1.25, True),       # FGSM-RS (Wong et al. 2020) / RS-AAER
    "n": (2.0, 1.0, False),        # N-FGSM (de Jorge et al. 2022) / N-AAER
}

#: (dataset, eps in /255) -> {variant: (lambda2, lambda3)}; lambda1 = 1 everywhere.
PRESETS: dict[tuple[str, int], dict[str, tuple[float, float]]] = {
    ("cifar10", 8): {"rs": (2.5, 1.5), "n": (1.5, 0.15)},
    ("cifar10", 12): {"rs": (5.0, 2.75), "n": (5.0, 0.55)},
    ("cifar10", 16): {"rs": (7.0, 3.25), "n": (8.5, 1.5)},
    ("cifar10", 32): {"rs": (5.75, 1.5), "n": (2.75, 0.75)},
    ("cifar100", 8): {"rs": (3.5, 1.5), "n": (1.5, 0.15)},
    ("cifar100", 12): {"rs": (3.5, 2.75), "n": (3.5, 0.3)},
    ("cifar100", 16): {"rs": (6.0, 2.25), "n": (6.0, 0.5)},
    ("cifar100", 32): {"rs": (5.0, 0.75), "n": (3.5, 0.5)},
}
#: code defaults of the reference implementation (used for SVHN, Tiny-ImageNet, ImageNet-100)
CODE_DEFAULT = (1.0, 4.0, 1.5)
_CODE_DEFAULT_PRESETS = ("default", "svhn", "tiny-imagenet", "tinyimagenet", "imagenet100", "imagenet-100")


def preset_lambdas(preset: str, eps: float, variant: str) -> tuple[float, float, float]:
    """(lambda1, lambda2, lambda3) published for ``preset`` (cifar10, cifar100, svhn,
    tiny-imagenet, imagenet100 or default) at ``eps`` for ``variant`` (rs or n)."""
    key = preset.lower().replace("_", "-")
    if key in _CODE_DEFAULT_PRESETS:
        return CODE_DEFAULT
    key = key.replace("-", "")
    k255 = eps * 255
    if abs(k255 - round(k255)) > 1e-6 or (key, round(k255)) not in PRESETS:
        known = sorted({d for d, _ in PRESETS})
        if key not in known:
            names = known + ["svhn", "tiny-imagenet", "imagenet100", "default"]
            raise ConfigError(f"unknown AAER preset {preset!r}: use one of {', '.join(names)}")
        eps_list = sorted(e for d, e in PRESETS if d == key)
        raise ConfigError(f"AAER preset {preset!r} has no published lambdas at eps {format_eps(eps)}: "
                          f"published eps are {', '.join(f'{e}/255' for e in eps_list)}; "
                          f"set lambda2/lambda3 explicitly")
    table = PRESETS[(key, round(k255))]
    if variant not in table:
        raise ConfigError(f"AAER preset {preset!r} has no lambdas for variant {variant!r}: use rs or n")
    return (1.0, *table[variant])


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------

def _as_bool(v: Any, name: str) -> bool:
    return param_bool(v, name)


def _as_float(v: Any, name: str) -> float:
    return param_float(v, name)


def aae_regularizer(z_eta: torch.Tensor, l_eta: torch.Tensor, z_adv: torch.Tensor, l_adv: torch.Tensor,
                    lambda1: float, lambda2: float, lambda3: float,
                    ce_term_grad: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The AAER penalty of one batch and its logged statistics (spec section 3, step 6-7).

    ``z_eta``/``l_eta``: logits/per-example CE at the start point (detached inside);
    ``z_adv``/``l_adv``: at the adversarial point (carry gradient). Returns ``(reg, stats)``,
    ``reg`` a scalar tensor that is exactly 0 (no graph) when the batch has no AAE or no NAE."""
    z_eta, l_eta = z_eta.detach(), l_eta.detach()
    b = l_eta.shape[0]
    aae = l_eta > l_adv.detach()          # strict: the step lowered the loss
    nae = ~aae
    dist = (z_eta - z_adv).pow(2).sum(dim=1)          # squared L2 over classes, per example
    if distributed.active():               # under torchrun: the statistics of the global batch
        return _aae_regularizer_global(dist, aae, l_eta, l_adv, lambda1, lambda2, lambda3, ce_term_grad)
    with torch.no_grad():                  # every logged number in one device->host transfer
        af = aae.to(dist.dtype)
        s_va, s_vn, s_ca, s_m = torch.stack([(dist * af).sum(), (dist * (1 - af)).sum(),
                                             ((l_eta - l_adv.detach()) * af).sum(), af.sum()]).tolist()
    m = int(round(s_m))
    n = b - m
    stats = _aaer_stats(s_va, s_vn, s_ca, m, b)
    if m == 0 or n == 0:
        return torch.zeros((), device=z_adv.device, dtype=z_adv.dtype), stats
    r = lambda1 * m / b
    l_adv_a = l_adv[aae] if ce_term_grad else l_adv[aae].detach()
    c_a = (l_eta[aae] - l_adv_a).mean()
    v_a = dist[aae].mean()
    v_n = dist[nae].detach().mean()
    gap = F.relu(v_a - v_n)
    reg = r * (lambda2 * c_a + lambda3 * gap)
    return reg, _gate_stats(stats, r, lambda2, lambda3, ce_term_grad)


def _aae_regularizer_global(dist: torch.Tensor, aae: torch.Tensor, l_eta: torch.Tensor, l_adv: torch.Tensor,
                            lambda1: float, lambda2: float, lambda3: float,
                            ce_term_grad: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """`aae_regularizer` on one rank's rows of a global batch: m, V_A, V_N, C_A are sums over all
    ranks; the returned penalty is this rank's part, scaled so that fit's share-weighted gradient
    average equals the single-process penalty's gradient (and its share-weighted value sum, the
    penalty). Stats are the global batch's (the same on every rank)."""
    share = distributed.step_share()
    af = aae.to(dist.dtype)
    with torch.no_grad():
        sums = torch.stack([(dist * af).sum(), (dist * (1 - af)).sum(), ((l_eta - l_adv.detach()) * af).sum(),
                            af.sum(), torch.tensor(float(aae.numel()), dtype=dist.dtype, device=dist.device)])
        s_va, s_vn, s_ca, s_m, s_b = distributed.all_reduce_sum(sums.double().cpu()).tolist()
    m, b = int(round(s_m)), int(round(s_b))
    n = b - m
    stats = _aaer_stats(s_va, s_vn, s_ca, m, b)
    v_n_val = stats["v_n"]
    if m == 0 or n == 0:
        return torch.zeros((), device=dist.device, dtype=dist.dtype), stats
    r = lambda1 * m / b
    l_adv_a = l_adv if ce_term_grad else l_adv.detach()
    c_a = ((l_eta - l_adv_a) * af).sum() / m
    gate = float(stats["v_a"] > v_n_val)
    v_part = (dist * af).sum() / m - share * v_n_val   # share-weighted sum over ranks: V_A - V_N
    reg = r * (lambda2 * c_a + lambda3 * gate * v_part) / share
    return reg, _gate_stats(stats, r, lambda2, lambda3, ce_term_grad)


def _aaer_stats(s_va: float, s_vn: float, s_ca: float, m: int, b: int) -> dict[str, float]:
    """The logged AAER statistics of a batch of ``b`` with ``m`` AAEs from the sums of the AAEs'
    logit distances (``s_va``), the NAEs' (``s_vn``) and the AAEs' loss drops (``s_ca``)."""
    n = b - m
    return {"aae_count": float(m), "aae_frac": m / max(1, b), "has_aae": float(m > 0), "has_nae": float(n > 0),
            "mixed": float(m > 0 and n > 0), "v_a": s_va / m if m else 0.0, "v_n": s_vn / n if n else 0.0,
            "c_a": s_ca / m if m else 0.0, "v_gap": 0.0, "gate_open": 0.0, "reg": 0.0, "reg_grad": 0.0}


def _gate_stats(stats: dict[str, float], r: float, lambda2: float, lambda3: float,
                ce_term_grad: bool) -> dict[str, float]:
    """Add the gate and the penalty's value (and its gradient-carrying part) to a mixed batch's stats."""
    gap = stats["v_a"] - stats["v_n"]
    stats["v_gap"] = gap
    stats["gate_open"] = float(gap > 0)
    stats["reg"] = r * (lambda2 * stats["c_a"] + lambda3 * max(gap, 0.0))
    stats["reg_grad"] = r * lambda3 * max(gap, 0.0) + (r * lambda2 * stats["c_a"] if ce_term_grad else 0.0)
    return stats


class SingleStepObjective:
    """Single-step adversarial training with an optional AAER regularizer.

    eps: L-inf radius in [0,1] pixel units (``8/255`` accepted). step: a (alpha = a*eps).
    noise: k (eta ~ U[-k*eps, k*eps]; 0 = zero init). clip: project delta to the eps-ball.
    lambda1..3: AAER weights (``aaer=False`` disables the regularizer; the statistics are
    still logged). ce_term_grad: gradient switch of the C_A term (False = reference code).
    warmup_epochs: eps warm-up, factor w = min(progress / warmup_epochs, 1) on the step and the
    projection radius (and on the start noise too when ``warmup_noise``, N-FGSM's SVHN recipe;
    AAER's reference leaves the noise unscaled)."""

    def __init__(self, eps: float | str, step: float, noise: float, clip: bool, *, aaer: bool = False,
                 lambda1: float = 1.0, lambda2: float = 0.0, lambda3: float = 0.0, ce_term_grad: bool = False,
                 warmup_epochs: float = 0.0, warmup_noise: bool = False, name: str = "single_step"):
        self.eps = parse_eps(eps)
        if self.eps <= 0:
            raise ConfigError(f"{name}: eps must be > 0, got {eps!r}")
        self.step = _as_float(step, "step")
        self.noise = _as_float(noise, "noise")
        if self.step <= 0 or self.noise < 0:
            raise ConfigError(f"{name}: step must be > 0 and noise >= 0 (got step={step}, noise={noise})")
        self.clip = _as_bool(clip, "clip")
        self.aaer = _as_bool(aaer, "aaer")
        self.lambda1, self.lambda2, self.lambda3 = (_as_float(v, n) for v, n in
                                                    ((lambda1, "lambda1"), (lambda2, "lambda2"), (lambda3, "lambda3")))
        if min(self.lambda1, self.lambda2, self.lambda3) < 0:
            raise ConfigError(f"{name}: lambda1..3 must be >= 0")
        self.ce_term_grad = _as_bool(ce_term_grad, "ce_term_grad")
        self.warmup_epochs = _as_float(warmup_epochs, "warmup_epochs")
        if self.warmup_epochs < 0:
            raise ConfigError(f"{name}: warmup_epochs must be >= 0")
        self.warmup_noise = _as_bool(warmup_noise, "warmup_noise")
        self.name = name

    @property
    def co_monitor_eps(self) -> float:
        """Single-step training can overfit catastrophically: the CO monitor watches it at eps."""
        return self.eps

    def warmup_factor(self, ctx: StepContext | None) -> float:
        if self.warmup_epochs <= 0 or ctx is None:
            return 1.0
        return min(ctx.progress / self.warmup_epochs, 1.0)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
                w: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Start point and one step. Returns ``(z_eta, l_eta, delta)``: the logits (B, K) and
        per-example CE (B,) at the start point x+eta (both detached) and the perturbation delta
        (same shape as x, detached) with x+delta in [0, 1]."""
        eps = self.eps
        if self.noise > 0:
            k = self.noise * eps * (w if self.warmup_noise else 1.0)
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            eta = (2 * u - 1) * k
            eta = (x + eta).clamp(0, 1) - x
        else:
            eta = torch.zeros_like(x)
        x_eta = (x + eta).detach().requires_grad_(True)
        z_eta = model(x_eta)
        l_eta = F.cross_entropy(z_eta, y, reduction="none")
        (g,) = torch.autograd.grad(l_eta.mean(), x_eta)
        delta = eta + self.step * eps * w * g.sign()
        if self.clip:
            delta = delta.clamp(-eps * w, eps * w)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        return z_eta.detach(), l_eta.detach(), delta

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        w = self.warmup_factor(ctx)
        z_eta, l_eta, delta = self.perturb(model, x, y, ctx.generator if ctx is not None else None, w)
        z_adv = model(x + delta)
        l_adv = F.cross_entropy(z_adv, y, reduction="none")
        loss_adv = l_adv.mean()
        reg, stats = aae_regularizer(z_eta, l_eta, z_adv, l_adv,
                                     self.lambda1 if self.aaer else 0.0, self.lambda2, self.lambda3,
                                     self.ce_term_grad)
        if not self.aaer:
            stats["reg"] = stats["reg_grad"] = 0.0
            loss = loss_adv
        else:
            loss = loss_adv + reg
        stats["loss_adv"] = float(loss_adv.detach())
        if self.warmup_epochs > 0:
            stats["eps_factor"] = w
        return StepResult(loss, z_adv, stats)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"objective": self.name, "eps": self.eps, "eps_text": format_eps(self.eps),
                               "step": self.step, "noise": self.noise, "clip": self.clip}
        if self.aaer:
            cfg.update({"lambda1": self.lambda1, "lambda2": self.lambda2, "lambda3": self.lambda3,
                        "ce_term_grad": self.ce_term_grad})
        if self.warmup_epochs > 0:
            cfg.update({"warmup_epochs": self.warmup_epochs, "warmup_noise": self.warmup_noise})
        return cfg


# ---------------------------------------------------------------------------------------------
# Factories (registered by name for `bastion train --objective NAME`)
# ---------------------------------------------------------------------------------------------

def _resolve_eps(eps: Any, threat: Any) -> float:
    if threat is not None:
        t = ThreatModel.parse(str(threat)) if not isinstance(threat, ThreatModel) else threat
        if t.norm != "linf":
            raise ConfigError(f"single-step objectives are L-inf only, got threat {t}")
        if eps is None:
            return t.eps
    if eps is None:
        raise ConfigError("single-step objectives need an epsilon: pass --eps 8/255 (or --param eps=...)")
    return param_float(eps, "eps", low=0, low_open=True)


@dataclass(frozen=True)
class SingleStepParams(ObjectiveParams):
    """Single-step adversarial training (FGSM family), L-inf only.

    eps: radius in [0, 1] pixel units (``8/255`` accepted; required, or ``threat="linf:8/255"``).
    step: step multiplier a (alpha = a * eps). noise: start-noise multiplier k. clip: project to
    the eps-ball. (None: the variant's default.) warmup_epochs: eps warm-up length in epochs.
    warmup_noise: scale the start noise by the warm-up too. norm: must be linf."""

    eps: Any = None
    step: Any = None
    noise: Any = None
    clip: Any = None
    warmup_epochs: Any = 0.0
    warmup_noise: Any = False
    threat: Any = None
    norm: Any = "linf"

    def __post_init__(self) -> None:
        if str(self.norm).lower() not in ("linf", "l_inf", "inf"):
            raise ConfigError(f"single-step objectives are L-inf only, got norm {self.norm!r}")
        try:
            self._set("eps", _resolve_eps(self.eps, self.threat))
        except BastionError as exc:
            raise ConfigError(str(exc)) from None
        if self.step is not None:
            self._set("step", param_float(self.step, "step", low=0, low_open=True))
        if self.noise is not None:
            self._set("noise", param_float(self.noise, "noise", low=0))
        if self.clip is not None:
            self._set("clip", param_bool(self.clip, "clip"))
        self._set("warmup_epochs", param_float(self.warmup_epochs, "warmup_epochs", low=0))
        self._set("warmup_noise", param_bool(self.warmup_noise, "warmup_noise"))


@dataclass(frozen=True)
class AAERParams(SingleStepParams):
    """Single-step training with the AAER regularizer (Lin, Yu, Liu 2023).

    variant: rs, n or fgsm (the base method). preset: cifar10, cifar100, svhn, tiny-imagenet,
    imagenet100 or default (published lambdas at eps). lambda1..3: AAER weights (>= 0; None: from
    the preset, else the code defaults). ce_term_grad: gradient through the C_A term."""

    variant: Any = None
    preset: Any = None
    lambda1: Any = None
    lambda2: Any = None
    lambda3: Any = None
    ce_term_grad: Any = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("lambda1", "lambda2", "lambda3"):
            if getattr(self, key) is not None:
                self._set(key, param_float(getattr(self, key), key, low=0))
        self._set("ce_term_grad", param_bool(self.ce_term_grad, "ce_term_grad"))
        if self.preset is not None and not isinstance(self.preset, str):
            raise ConfigError(f"preset must be a name such as cifar10, got {self.preset!r}")


def _single_step(name: str, variant: str):
    k0, a0, clip0 = VARIANTS[variant]

    def build(p: SingleStepParams) -> SingleStepObjective:
        return SingleStepObjective(p.eps, a0 if p.step is None else p.step, k0 if p.noise is None else p.noise,
                                   clip0 if p.clip is None else p.clip, warmup_epochs=p.warmup_epochs,
                                   warmup_noise=p.warmup_noise, name=name)

    return build, f"{name}: noise k={k0:g}, step a={a0:g}, clip={clip0} (override with step/noise/clip)"


def _aaer(name: str, default_variant: str | None):
    def build(p: AAERParams) -> SingleStepObjective:
        v = str(p.variant or default_variant or "n").lower().replace("-", "").replace("_", "")
        v = {"rsaaer": "rs", "naaer": "n", "fgsmrs": "rs", "nfgsm": "n"}.get(v, v)
        if v not in VARIANTS:
            raise ConfigError(f"unknown AAER variant {p.variant!r}: use rs, n or fgsm")
        if default_variant is not None and p.variant is not None and v != default_variant:
            raise ConfigError(f"objective {name!r} is the {default_variant!r} variant; use --objective aaer "
                              f"--param variant={p.variant} instead")
        k0, a0, clip0 = VARIANTS[v]
        if p.preset is not None:
            l1, l2, l3 = preset_lambdas(p.preset, p.eps, "rs" if v == "fgsm" else v)
        else:
            l1, l2, l3 = CODE_DEFAULT
        return SingleStepObjective(p.eps, a0 if p.step is None else p.step, k0 if p.noise is None else p.noise,
                                   clip0 if p.clip is None else p.clip, aaer=True,
                                   lambda1=l1 if p.lambda1 is None else p.lambda1,
                                   lambda2=l2 if p.lambda2 is None else p.lambda2,
                                   lambda3=l3 if p.lambda3 is None else p.lambda3, ce_term_grad=p.ce_term_grad,
                                   warmup_epochs=p.warmup_epochs, warmup_noise=p.warmup_noise, name=name)

    return build, (f"{name}: AAER on the {default_variant or 'n (default; variant=rs|n|fgsm)'} variant; lambdas "
                   f"from preset=cifar10|cifar100|svhn|... at eps, else code defaults {CODE_DEFAULT}")


for _name, _variant in (("fgsm", "fgsm"), ("fgsm_rs", "rs"), ("n_fgsm", "n")):
    register_objective(_name, SingleStepParams, *_single_step(_name, _variant))
register_objective("nfgsm", SingleStepParams, *_single_step("n_fgsm", "n"))
for _name, _variant in (("rs_aaer", "rs"), ("n_aaer", "n"), ("aaer", None)):
    register_objective(_name, AAERParams, *_aaer(_name, _variant))


def epoch_summary(record: dict[str, Any]) -> dict[str, float | None]:
    """Conditional epoch means from fit's epoch record (fit averages every stat over all
    iterations, and V_A / V_N / V_A - V_N are logged as 0 when undefined).

    Returns ``aae_frac`` (mean m/B), ``v_a`` (over batches with AAEs), ``v_n`` (over batches with
    NAEs), ``v_gap`` (over mixed batches), ``gate_open_frac`` (fraction of mixed batches whose
    gate V_A > V_N was open), ``reg`` (mean regularizer value over all batches)."""
    def ratio(num: str, den: str) -> float | None:
        d = record.get(f"train_{den}")
        if d is None or d <= 0 or f"train_{num}" not in record:
            return None
        return float(record[f"train_{num}"]) / float(d)

    out = {"aae_frac": record.get("train_aae_frac"), "v_a": ratio("v_a", "has_aae"),
           "v_n": ratio("v_n", "has_nae"), "v_gap": ratio("v_gap", "mixed"),
           "gate_open_frac": ratio("gate_open", "mixed"), "reg": record.get("train_reg"),
           "mixed_frac": record.get("train_mixed")}
    return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)) for k, v in out.items()}
