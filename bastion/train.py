"""The one training loop. Every training method is an `Objective` plugged into `fit`.

An objective computes the per-batch loss (and whatever it wants logged) from the model and a
batch; `fit` owns everything else: shuffling, optimizer, per-iteration LR schedule, progress,
per-epoch log, checkpoints and resume. Runs are seeded: batch order and the objective's random
generator for epoch e are derived from (seed, e), so a run resumed from an epoch checkpoint
finishes with the same weights as an uninterrupted one (on CPU).

Under ``torchrun`` (an initialized process group, see `bastion.distributed`) `fit` trains with
DistributedDataParallel: ``batch_size`` is per rank, the global batch order is the one a single
process with the global batch would use, and each rank takes its slice; rank 0 alone writes
checkpoints and logs. A single process runs exactly as before.

Objectives are registered by name with a frozen parameter dataclass (`ObjectiveParams`);
`create_objective` checks names and values against it. Only ``standard`` lives here: the
others (``pgd``, ``gaussian``, ``fgsm``, ``aaer``, ...) live in plugin packages that the
registry imports on first use, found through the ``bastion.objectives`` entry-point group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data import ImageDataset
from bastion.errors import BastionError, ConfigError, RunError
from bastion.records import JsonlLog, config_digest, to_jsonable
from bastion.threat import parse_eps

# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

@dataclass
class StepContext:
    """What an objective may know about the current step."""

    epoch: int                 # 0-based epoch
    iteration: int             # global 0-based iteration
    iterations_per_epoch: int
    total_iterations: int
    generator: torch.Generator  # on the model's device, seeded from (seed, epoch)

    @property
    def progress(self) -> float:
        """Epochs done as a float, e.g. 2.5 = half way through the third epoch."""
        return self.iteration / max(1, self.iterations_per_epoch)


@dataclass
class StepResult:
    """``loss``: scalar tensor to minimize. ``logits``: (B, K) logits on the training input (for
    the running training accuracy). ``stats``: floats to log (averaged over the epoch)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """A per-batch training loss. Optional attribute ``co_monitor_eps`` (float or None): the
    L-inf radius at which a catastrophic-overfitting monitor should watch this objective by
    default (None or absent: not monitored unless asked); see `co_monitor_eps`."""

    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult: ...

    def config(self) -> dict[str, Any]: ...


def co_monitor_eps(objective: Objective) -> float | None:
    """The radius at which the CO monitor watches ``objective`` by default, or None."""
    eps = getattr(objective, "co_monitor_eps", None)
    return None if eps is None else float(eps)


class StandardObjective:
    """Cross-entropy on clean inputs."""

    name = "standard"
    co_monitor_eps = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        logits = model(x)
        return StepResult(F.cross_entropy(logits, y), logits)

    def config(self) -> dict[str, Any]:
        return {"objective": self.name}


# ---------------------------------------------------------------------------------------------
# Objective parameters: checked values, one-line errors
# ---------------------------------------------------------------------------------------------

def param_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """``value`` as a finite float (``"8/255"`` accepted) in [low, high] (``(low, ...`` when
    ``low_open``), else `ConfigError` naming ``name``."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float, str))
    try:
        v = math.nan if bad else (parse_eps(value) if isinstance(value, str) else float(value))
    except BastionError:
        v = math.nan
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and v > high:
        raise ConfigError(f"{name} must be <= {high:g}, got {value!r}")
    return v


def param_int(value: Any, name: str, *, low: int | None = None) -> int:
    """``value`` as an int (integral floats and digit strings accepted) >= low."""
    v: Any = None
    if isinstance(value, int) and not isinstance(value, bool):
        v = value
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        v = int(value)
    if v is None:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if low is not None and v < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")
    return v


def param_bool(value: Any, name: str) -> bool:
    """``value`` as a bool (true/false, yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ObjectiveParams:
    """Base of every objective's parameters: a frozen dataclass whose fields are exactly the keys
    `create_objective` accepts. Subclasses check and coerce values in ``__post_init__`` (with
    `param_float` / `param_int` / `param_bool` and ``self._set``), raising `ConfigError`."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class StandardParams(ObjectiveParams):
    """The standard objective takes no parameters."""


@dataclass(frozen=True)
class _Entry:
    params: type[ObjectiveParams]
    build: Callable[[Any], Objective]
    doc: str


_REGISTRY: dict[str, _Entry] = {}
ENTRY_POINT_GROUP = "bastion.objectives"
# Used when the package's entry points are not installed (e.g. running from a source tree).
_FALLBACK_PLUGINS = {
    "pgd": "defenses.pgd_at", "gaussian": "defenses.gaussian",
    **{n: "defenses.single_step" for n in ("fgsm", "fgsm_rs", "n_fgsm", "nfgsm", "rs_aaer", "n_aaer", "aaer")},
    "rct": "certify.rscp",
    "adaptive_mixing": "defenses.mixing_training", "spectral_ce": "defenses.mixing_training",
    "rrcm_pretrain": "defenses.consistency", "consistency": "defenses.consistency",
}


def register_objective(name: str, params: type[ObjectiveParams], build: Callable[[Any], Objective],
                       doc: str = "") -> None:
    """Register ``name``: `create_objective(name, **kw)` builds ``build(params(**kw))``.

    ``params`` is a frozen `ObjectiveParams` subclass; ``doc`` a one-line description (default:
    the first line of ``params``' docstring)."""
    if not (isinstance(params, type) and issubclass(params, ObjectiveParams)):
        raise ConfigError(f"objective {name!r}: params must be an ObjectiveParams subclass, got {params!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.params is not params):
        raise ConfigError(f"objective {name!r} is registered twice")
    _REGISTRY[name] = _Entry(params, build, doc or (params.__doc__ or "").strip().split("\n")[0])


def _plugins() -> dict[str, str]:
    """Objective name -> entry-point value (``module`` or ``module:function``)."""
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**_FALLBACK_PLUGINS, **found}


def _load_plugin(name: str, target: str) -> None:
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module.strip())
        if attr:
            getattr(mod, attr.strip())()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"objective {name!r} comes from {target!r}, which cannot be loaded: {exc}") from None


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        target = _plugins().get(name)
        if target is not None:
            _load_plugin(name, target)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(list_objectives())}")
    return _REGISTRY[name]


def list_objectives() -> list[str]:
    """Every objective name, registered or provided by an installed plugin, sorted."""
    for name, target in sorted(_plugins().items()):
        if name not in _REGISTRY:
            try:
                _load_plugin(name, target)
            except ConfigError:
                continue  # a broken plugin does not hide the others; create_objective names the problem
    return sorted(_REGISTRY)


def objective_params(name: str) -> list[tuple[str, Any]]:
    """The parameters ``name`` accepts, as (field, default) in declaration order."""
    entry = _entry(name)
    return [(f.name, f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(entry.params)]


def objective_doc(name: str) -> str:
    """One line describing objective ``name``."""
    return _entry(name).doc


def create_objective(name: str, **params: Any) -> Objective:
    """Build a registered objective: ``create_objective("pgd", eps=8/255, steps=10)``.

    Unknown names, parameters the objective does not take and bad values raise a one-line
    `ConfigError` (listing what is accepted)."""
    entry = _entry(name)
    accepted = [f.name for f in dataclasses.fields(entry.params)]
    unknown = sorted(k for k in params if k not in accepted)
    if unknown:
        takes = ", ".join(accepted) if accepted else "no parameters"
        raise ConfigError(f"objective {name!r} takes no parameter {unknown[0]!r}; it takes: {takes}")
    try:
        p = entry.params(**params)
    except BastionError as exc:
        raise ConfigError(f"objective {name!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad parameters for objective {name!r}: {exc}") from None
    return entry.build(p)


register_objective("standard", StandardParams, lambda p: StandardObjective(), "cross-entropy on clean inputs")


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Optimizer and schedule. ``schedule``: constant | cosine | step | cyclic.

    lr: peak learning rate (> 0, finite). momentum: SGD momentum in [0, 1). weight_decay: L2
    weight decay (>= 0). milestones: step schedule, fractions of training in [0, 1].
    cyclic: per-iteration triangle 0 -> lr -> 0 peaking at ``cyclic_peak`` of training, with
    momentum cycling ``momentum`` -> ``cyclic_base_momentum`` -> ``momentum`` when
    ``cycle_momentum`` (as torch's CyclicLR default). Bad values raise a one-line `ConfigError`."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: Sequence[float] = (0.5, 0.75)   # step schedule, fractions of training
    gamma: float = 0.1
    cyclic_peak: float = 0.5
    cycle_momentum: bool = True
    cyclic_base_momentum: float = 0.8
    augment: str = "none"                        # none | crop_flip | flip
    seed: int = 0

    def __post_init__(self) -> None:
        for key, choices in (("optimizer", ("sgd", "adam")), ("schedule", ("constant", "cosine", "step", "cyclic")),
                             ("augment", ("none", "crop_flip", "flip"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"unknown {key} {getattr(self, key)!r}: use {', '.join(choices)}")
        self.epochs = param_int(self.epochs, "epochs", low=1)
        self.batch_size = param_int(self.batch_size, "batch_size", low=1)
        self.seed = param_int(self.seed, "seed", low=0)
        self.lr = param_float(self.lr, "lr", low=0, low_open=True)
        self.weight_decay = param_float(self.weight_decay, "weight_decay", low=0)
        self.gamma = param_float(self.gamma, "gamma", low=0, low_open=True)
        self.cyclic_peak = param_float(self.cyclic_peak, "cyclic_peak", low=0, high=1, low_open=True)
        for key in ("momentum", "cyclic_base_momentum"):
            v = param_float(getattr(self, key), key, low=0)
            if v >= 1:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
            setattr(self, key, v)
        self.nesterov = param_bool(self.nesterov, "nesterov")
        self.cycle_momentum = param_bool(self.cycle_momentum, "cycle_momentum")
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Sequence):
            raise ConfigError(f"milestones must be a list of fractions of training, got {self.milestones!r}")
        self.milestones = tuple(param_float(m, "milestones", low=0, high=1) for m in self.milestones)


def lr_factor(cfg: TrainConfig, iteration: int, total: int) -> tuple[float, float | None]:
    """(lr multiplier, momentum or None) at a 0-based iteration out of ``total``."""
    t = iteration / max(1, total)
    if cfg.schedule == "constant":
        return 1.0, None
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t)), None
    if cfg.schedule == "step":
        return cfg.gamma ** sum(t >= m for m in cfg.milestones), None
    # cyclic: triangle over iterations, 0 at t=0 and t=1, 1 at the peak
    peak = cfg.cyclic_peak
    f = t / peak if t <= peak else max(0.0, (1 - t) / (1 - peak))
    mom = None
    if cfg.cycle_momentum and cfg.optimizer == "sgd":
        mom = cfg.momentum - f * (cfg.momentum - cfg.cyclic_base_momentum)
    return f, mom


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return x
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if kind == "crop_flip":
        pad = max(1, h // 8)
        xp = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
        rows = (dy.view(-1, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(-1, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        x = xp.gather(2, rows.expand(n, x.shape[1], h, xp.shape[3])).gather(3, cols.expand(n, x.shape[1], h, w))
    return x


# ---------------------------------------------------------------------------------------------
# Callbacks and the loop
# ---------------------------------------------------------------------------------------------

class StopTraining(Exception):
    """Raised by a callback to stop early (e.g. on catastrophic overfitting)."""


class TrainingDiverged(ConfigError):
    """The loss or the weights became NaN/inf (learning rate too high, bad data...). Training
    stopped; the last committed checkpoint (if any) is kept. A `ConfigError` subclass: the usual
    cause is the learning rate."""


class Callback:
    """Hooks into `fit`. ``on_batch_end`` may return extra floats to log for that iteration
    (written to ``batches.jsonl`` when fit's ``log_batches`` is on); ``on_epoch_end`` may return
    metrics merged into the epoch record. Raise `StopTraining` to stop after this epoch.

    ``progress_keys``: keys of the epoch record this callback wants shown on fit's per-epoch
    progress line (after ``train_loss`` and ``train_acc``)."""

    progress_keys: tuple[str, ...] = ()

    def on_batch_end(self, model: nn.Module, ctx: StepContext, stats: dict[str, float]) -> dict | None:
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> dict | None:
        return None


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    stopped_early: bool
    run_dir: Path | None


_STATE_KEY = "bastion_train_state"


def _save_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Atomically write everything a resume needs (weights, optimizer state, epoch, history) as one
    safetensors file: the commit point of an epoch. Nothing is pickled."""
    from bastion.checkpoints import write_safetensors

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    other: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                other.setdefault(str(pid), {})[k] = v
    meta = {**meta, "param_groups": osd["param_groups"], "opt_other": other}
    write_safetensors(path, tensors, {_STATE_KEY: json.dumps(meta, sort_keys=True)})


def _load_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RunError(f"training state {str(path)!r} is damaged ({exc}); delete the checkpoints/ folder "
                       f"of this run to start it over") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["opt_other"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _base_card(model: nn.Module, data: ImageDataset, cfg: TrainConfig, checkpoint_card: dict[str, Any] | None,
               arch: str | None, arch_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The card fit's checkpoints carry: the caller's, else one built from ``arch`` and the data,
    else an architecture-less card (loads with ``load_checkpoint(path, model=...)``)."""
    from bastion.checkpoints import make_card

    if checkpoint_card is not None:
        if arch is not None:
            raise ConfigError("pass either checkpoint_card or arch to fit, not both (the card names the arch)")
        return dict(checkpoint_card)
    if arch is not None:
        _check_arch(model, arch, data, arch_kwargs or {})
    return make_card(model, arch, data.num_classes, data.input_shape, arch_kwargs, data.class_names,
                     dataset=data.name, seed=cfg.seed)


def _check_arch(model: nn.Module, arch: str, data: ImageDataset, arch_kwargs: dict[str, Any]) -> None:
    """Refuse, before training, an ``arch`` whose weights would not fit ``model``."""
    from bastion.errors import ModelError
    from bastion.models import create_model

    c, h, _ = data.input_shape
    try:
        with torch.device("meta"):  # shapes only: no memory, no init time
            ref = create_model(arch, data.num_classes, c, h, **arch_kwargs)
    except ModelError as exc:
        raise ConfigError(f"fit(arch={arch!r}): {exc}") from None
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs[k])
        raise ConfigError(f"fit(arch={arch!r}, arch_kwargs={arch_kwargs}) does not describe the model being "
                          f"trained (first difference: {diff[0]!r}); pass the arguments create_model got")


def _export_checkpoint(ckpt_dir: Path, model: nn.Module, cfg: TrainConfig, objective: Objective,
                       card: dict[str, Any], epoch: int) -> None:
    from bastion.checkpoints import save_checkpoint

    card = dict(card)
    card.setdefault("recipe", {})
    card["recipe"] = {**card["recipe"], "train": asdict(cfg), **objective.config()}
    card["epoch"] = epoch
    save_checkpoint(ckpt_dir / "last", model, card)


def _checkpoint_is_current(ckpt_dir: Path, epoch: int) -> bool:
    from bastion.checkpoints import sha256_file

    w, c = ckpt_dir / "last.safetensors", ckpt_dir / "last.json"
    try:
        card = json.loads(c.read_text())
        return card.get("epoch") == epoch and card.get("sha256") == sha256_file(w)
    except (OSError, ValueError):
        return False


def _epoch_generator(seed: int, epoch: int, device: torch.device, salt: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2 ** 63))
    return g


def _first_nonfinite(model: nn.Module) -> str | None:
    """Name of the first parameter or floating buffer holding NaN/inf, or None."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _diverged(what: str, epoch: int, b: int | None, last_good: int | None, ckpt_dir: Path | None) -> TrainingDiverged:
    where = f"epoch {epoch + 1}" + (f", iteration {b + 1}" if b is not None else "")
    if ckpt_dir is None:
        kept = "no checkpoint was written"
    elif last_good is None:
        kept = "no epoch had finished, so no checkpoint was written"
    else:
        kept = f"the last good checkpoint (epoch {last_good + 1}) is kept in {str(ckpt_dir)!r}"
    return TrainingDiverged(f"training diverged at {where}: {what}; {kept}; lower the learning rate")


class _DDPStep(nn.Module):
    """What an objective sees under DDP: forwards that may train the weights (grad enabled, some
    parameter requiring grad) go through the DDP wrapper; the rest (attacks, which freeze the
    weights, and no-grad evaluation) through the unwrapped module ``self.module``, so they cost no
    DDP bookkeeping and no collectives."""

    def __init__(self, ddp: nn.Module):
        super().__init__()
        self.ddp = ddp

    @property
    def module(self) -> nn.Module:
        return self.ddp.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return self.ddp(x)
        return self.module(x)


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return _DDPStep(DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None))


def _reduce_step(loss: float, stats: dict[str, float], correct: int, seen: int, share: float
                 ) -> tuple[float, dict[str, float], int, int]:
    """Global-batch values of one distributed step: every float weighted by this rank's share of
    the batch and summed over ranks (exact for per-batch means and for values that are already
    global), counts summed."""
    from bastion import distributed as dist

    keys = sorted(stats)
    t = torch.tensor([loss * share, *(float(stats[k]) * share for k in keys), correct, seen], dtype=torch.float64)
    t = dist.all_reduce_sum(t).tolist()
    return t[0], {k: t[1 + i] for i, k in enumerate(keys)}, int(round(t[-2])), int(round(t[-1]))


def fit(model: nn.Module, data: ImageDataset, objective: Objective, cfg: TrainConfig,
        run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
        device: str | torch.device | None = None, quiet: bool = False, log_batches: bool = False,
        checkpoint_card: dict[str, Any] | None = None, arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` on ``data`` (images (N, C, H, W) in [0, 1]) with ``objective``.

    With ``run_dir``: after every epoch, commits the training state (weights, optimizer, epoch,
    history) to ``checkpoints/train_state.safetensors``, exports ``checkpoints/last.safetensors``
    + ``last.json`` and appends the epoch record to ``train_log.jsonl``; a restarted run resumes
    from the committed state and ends with the same weights as an uninterrupted one (on CPU).
    Resuming with a different config, objective or data size raises `RunError`; a run stopped by
    a callback (`StopTraining`) stays stopped.

    The exported checkpoint's card is ``checkpoint_card`` (see `bastion.checkpoints.make_card`);
    without one, fit builds it from the data (classes, input shape, data set, seed) and ``arch`` /
    ``arch_kwargs`` when given (the arguments ``create_model`` got; checked against the model
    before training), so `load_checkpoint` rebuilds the model. fit cannot name an architecture
    by itself: without ``checkpoint_card`` or ``arch`` the card's ``arch`` is null and the
    checkpoint loads only into a module the caller builds, ``load_checkpoint(path, model=m)``.

    A NaN/inf loss, or NaN/inf weights at the end of an epoch, raise `TrainingDiverged` (naming
    the epoch and iteration) before anything of that epoch is written. The progress line shows
    ``train_loss``, ``train_acc`` and the callbacks' ``progress_keys``.
    """
    from bastion import distributed as dist
    from bastion.progress import progress

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    torch.manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg)
    n = len(data)
    if n == 0:
        raise ConfigError("training set is empty")
    world, ddp = dist.world_size(), dist.active()
    main = dist.is_main()
    quiet = quiet or not main
    batch = cfg.batch_size * world   # the global batch: rank r takes rows rank_slice(len(batch)) of each
    # every rank needs >= 2 rows: a draw of shape (1,) is a scalar draw (the attack layer's seeds), never a row
    if ddp and (cfg.batch_size < 2 or 0 < n % batch < 2 * world):
        raise ConfigError(f"under torchrun every rank needs >= 2 examples per step: batch_size (per rank) >= 2 and "
                          f"{n} % (batch_size x {world}) either 0 or >= {2 * world} (it is {n % batch})")
    net = _wrap_ddp(model, device) if ddp else model
    iters_per_epoch = math.ceil(n / batch)
    total = iters_per_epoch * cfg.epochs
    history: list[dict[str, Any]] = []
    start_epoch = 0
    log = batch_log = None
    ckpt_dir = None
    card: dict[str, Any] = {}
    if run_dir is not None:
        card = _base_card(model, data, cfg, checkpoint_card, arch, arch_kwargs)
        run_dir = Path(run_dir)
        ckpt_dir = run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log = JsonlLog(run_dir / "train_log.jsonl")
        batch_log = JsonlLog(run_dir / "batches.jsonl") if log_batches else None
        state_path = ckpt_dir / "train_state.safetensors"
        # the global batch, not the per-rank one: a run resumes under any world size with the same global batch
        digest = config_digest({"train": {**asdict(cfg), "batch_size": batch}, "objective": objective.config(), "n": n,
                                "num_params": sum(p.numel() for p in model.parameters())})
        if state_path.is_file():
            meta = _load_train_state(state_path, model, opt)
            if meta.get("digest") != digest:
                raise RunError(f"run directory {str(run_dir)!r} holds training state of a different config "
                               f"(train settings, objective or data); use a new run directory or delete it")
            start_epoch = int(meta["epoch"]) + 1
            history = list(meta["history"])
            if main:
                log.rewrite(history)
            if batch_log is not None and main:
                batch_log.rewrite([r for r in batch_log if r.get("epoch", -1) < start_epoch])
            if main and not _checkpoint_is_current(ckpt_dir, int(meta["epoch"])):
                _export_checkpoint(ckpt_dir, model, cfg, objective, card, int(meta["epoch"]))
            if meta.get("stopped"):
                start_epoch = cfg.epochs
            if not quiet:
                print(f"resuming from epoch {start_epoch} ({str(ckpt_dir)!r})")
        elif main:  # nothing committed yet: drop what a killed first epoch may have logged
            log.rewrite([])
            if batch_log is not None:
                batch_log.rewrite([])
    shown_keys = ["train_loss", "train_acc"]
    for cb in callbacks:
        shown_keys += [k for k in getattr(cb, "progress_keys", ()) if k not in shown_keys]
    x_all, y_all = data.images, data.labels
    stopped = bool(history and history[-1].get("stopped"))
    last_good = start_epoch - 1 if start_epoch > 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # Global RNG (dropout, objectives without a generator) is re-seeded per epoch so that a
        # resumed run draws the same numbers as an uninterrupted one.
        torch.manual_seed((cfg.seed * 1_000_003 + epoch * 7919 + 3) % (2 ** 63))
        model.train()
        g_cpu = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g_cpu)
        g_obj = _epoch_generator(cfg.seed, epoch, device, salt=1)
        g_aug = _epoch_generator(cfg.seed, epoch, device, salt=2)
        sums: dict[str, float] = {}
        correct = seen = 0
        bar = progress(range(iters_per_epoch), desc=f"{objective.name} epoch {epoch + 1}/{cfg.epochs}", quiet=quiet)
        for b in bar:
            idx = order[b * batch:(b + 1) * batch]
            shard = contextlib.nullcontext()
            share = 1.0
            if ddp:
                rows = dist.rank_slice(len(idx))
                share = (rows.stop - rows.start) / len(idx)
                shard = dist.sharded_step(rows.start, rows.stop - rows.start, len(idx))
                idx = idx[rows]
            x = x_all[idx].to(device, non_blocking=True)
            y = y_all[idx].to(device, non_blocking=True)
            it = epoch * iters_per_epoch + b
            f, mom = lr_factor(cfg, it, total)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * f
                if mom is not None:
                    group["momentum"] = mom
            ctx = StepContext(epoch, it, iters_per_epoch, total, g_obj)
            with shard:
                x = _augment(x, cfg.augment, g_aug)
                res = objective(net, x, y, ctx)
            loss_value = float(res.loss.detach())
            step_correct = int((res.logits.detach().argmax(1) == y).sum()) if res.logits is not None else 0
            step_seen = len(y) if res.logits is not None else 0
            stats = dict(res.stats)
            if ddp:
                loss_value, stats, step_correct, step_seen = _reduce_step(loss_value, stats, step_correct,
                                                                          step_seen, share)
            if not math.isfinite(loss_value):
                raise _diverged(f"loss became {loss_value}", epoch, b, last_good, ckpt_dir)
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; weighting by world x share makes that the global batch's mean
            (res.loss * (world * share) if ddp else res.loss).backward()
            opt.step()
            stats = {"loss": loss_value, **stats}
            correct += step_correct
            seen += step_seen
            for cb in callbacks:
                extra = cb.on_batch_end(model, ctx, stats)
                if extra:
                    stats.update(extra)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if batch_log is not None and main:
                batch_log.append([{"epoch": epoch, "iteration": it, "lr": cfg.lr * f, **stats}])
        bad = _first_nonfinite(model)
        if bad is not None:  # the last step(s) of the epoch broke the weights: commit nothing
            raise _diverged(f"weight {bad!r} became NaN/inf", epoch, iters_per_epoch - 1, last_good, ckpt_dir)
        lr_end = cfg.lr * lr_factor(cfg, (epoch + 1) * iters_per_epoch - 1, total)[0]
        record: dict[str, Any] = {"epoch": epoch, "lr_end": lr_end}
        record.update({f"train_{k}": v / iters_per_epoch for k, v in sums.items()})
        if seen:
            record["train_acc"] = correct / seen
        record["epoch_seconds"] = time.perf_counter() - t0
        for cb in callbacks:
            try:
                extra = cb.on_epoch_end(model, epoch, record)
            except StopTraining as stop:
                record["stopped"] = str(stop) or "early stop"
                stopped = True
                extra = None
            if extra:
                record.update(extra)
        model.train()
        history.append(record)
        if ckpt_dir is not None:
            record = json.loads(json.dumps(to_jsonable(record), default=str))  # as the log will hold it
            history[-1] = record
        if ckpt_dir is not None and main:
            _save_train_state(ckpt_dir / "train_state.safetensors", model, opt,
                              {"epoch": epoch, "digest": digest, "history": history, "stopped": stopped})
            _export_checkpoint(ckpt_dir, model, cfg, objective, card, epoch)
            log.append([record])  # type: ignore[union-attr]
        dist.barrier()  # no rank runs ahead of rank 0's commit of this epoch
        last_good = epoch
        if not quiet:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k in shown_keys
                     if (v := record.get(k)) is not None}
            print(f"[{objective.name}] epoch {epoch + 1}/{cfg.epochs} {shown}")
        if stopped:
            break
    opt.zero_grad(set_to_none=True)  # hand back a model without stale parameter gradients
    model.eval()
    return TrainResult(model, history, stopped, Path(run_dir) if run_dir is not None else None)
