"""The attack interface: a frozen config, ``attack(model, x, y) -> x_adv``, and a registry.

Every attack

- is configured by a frozen dataclass (`AttackConfig` or a subclass) holding the threat model,
  steps, step size, restarts, loss, targeted mode and seed;
- is called as ``attack(model, x, y)`` (or ``attack.run(...)`` for per-example details) and works
  on the model's device, in the input's dtype, returning a tensor of the input's shape, dtype
  and device;
- never prints, never touches the global RNG state visible to the caller (randomness comes from
  a `torch.Generator`; code that draws from the global RNG, such as a randomized model or a
  third-party attack, runs inside a forked RNG seeded from that generator), and restores the
  model's train/eval mode (per module) and every parameter's ``requires_grad`` afterwards.

    attack = create_attack("apgd-ce", ThreatModel.parse("linf:8/255"), steps=50)
    x_adv = attack(model, x, y)
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bastion.errors import BastionError, ConfigError
from bastion.rng import child_generator, forked_rng, model_device  # noqa: F401  (re-exported)
from bastion.threat import ThreatModel


class AttackError(BastionError):
    """An attack cannot run as configured (missing extra, unsupported mode, bad inputs)."""


LOSSES = ("ce", "margin", "dlr")
_LOSS_ALIASES = {"ce": "ce", "xent": "ce", "cross_entropy": "ce", "margin": "margin", "cw": "margin",
                 "dlr": "dlr"}
TARGET_SELECTIONS = ("random", "least_likely")


@dataclass(frozen=True)
class AttackConfig:
    """Hyper-parameters shared by every attack. ``None`` means "the attack's default".

    threat: the Lp ball (and the [0, 1] box) the adversary must stay in.
    steps: gradient steps (iterations) per restart.   step_size: in pixel units (None: attack default).
    restarts: random restarts (each only on examples not yet broken).
    loss: ``ce``, ``margin`` (alias ``cw``) or ``dlr`` (objective to maximise).
    targeted: aim at a target class (given as ``y_target`` at call time, else chosen by ``target``:
    ``random`` non-true class or ``least_likely`` class at the clean input).
    seed: seeds the attack's generator when the caller passes none.
    random_start: start from a random point of the ball.   eot_iter: gradient draws averaged per step
    (Expectation over Transformation, for randomized models).
    batch_size: examples per call of the attack's inner loop (None: the whole batch at once); the
    batches share one generator, drawn in order, so results depend on it only through memory.
    project: for attacks whose output may leave the threat model (third-party attacks, minimum-norm
    attacks): clip such points onto the ball (and re-check them) instead of counting them as not broken.
    progress: a tqdm bar over batches and sub-attacks of long attacks (off where stderr is not a
    terminal or TQDM_DISABLE is set).
    """

    threat: ThreatModel
    steps: int | None = None
    step_size: float | None = None
    restarts: int = 1
    loss: str = "ce"
    targeted: bool = False
    target: str = "random"
    seed: int = 0
    random_start: bool = True
    eot_iter: int = 1
    batch_size: int | None = None
    project: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        threat = self.threat
        if isinstance(threat, str):
            threat = ThreatModel.parse(threat)
        if not isinstance(threat, ThreatModel):
            raise ConfigError(f"attack threat must be a ThreatModel or a string like 'linf:8/255', got {threat!r}")
        object.__setattr__(self, "threat", threat)
        loss = _LOSS_ALIASES.get(str(self.loss).lower())
        if loss is None:
            raise ConfigError(f"unknown attack loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        object.__setattr__(self, "loss", loss)
        if self.steps is not None and int(self.steps) < 1:
            raise ConfigError(f"attack steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not float(self.step_size) > 0:
            raise ConfigError(f"attack step_size must be > 0, got {self.step_size}")
        if self.restarts is not None and int(self.restarts) < 1:
            raise ConfigError(f"attack restarts must be >= 1, got {self.restarts}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError(f"attack batch_size must be >= 1, got {self.batch_size}")
        if self.eot_iter is not None and int(self.eot_iter) < 1:
            raise ConfigError(f"attack eot_iter must be >= 1, got {self.eot_iter}")
        if self.target not in TARGET_SELECTIONS:
            raise ConfigError(f"unknown target selection {self.target!r}: use one of {', '.join(TARGET_SELECTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (for run configs and records); objects become their repr."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ThreatModel):
                v = str(v)
            elif isinstance(v, tuple):
                v = [list(t) if isinstance(t, tuple) else t for t in v]
            elif v is not None and not isinstance(v, (bool, int, float, str)):
                v = getattr(v, "describe", lambda v=v: repr(v))()
            out[f.name] = v
        return out


def _outside_unit(x: torch.Tensor) -> bool:
    """Some value of ``x`` below 0 or above 1 (one pass over ``x``; NaN passes, as with min/max)."""
    lo, hi = torch.aminmax(x)
    return float(lo) < 0 or float(hi) > 1


@dataclass
class AttackResult:
    """What an attack found for each example of the batch.

    x_adv: the strongest adversary per example (an adversarial one where found, else the highest
    loss point seen; ``x`` itself for examples already misclassified). success: the attack's own
    claim that ``x_adv`` is adversarial (the evaluator re-checks). step: gradient step at which the
    example broke, counted over restarts/targets (0 = at the start point), -1 when not broken or
    unknown. broken_by: for composite attacks (AutoAttack), the sub-attack that broke each example.
    notes: warnings collected during the run (e.g. AutoAttack's checks), as one-line strings.
    norms: for minimum-norm attacks, the norm (in the threat model's norm) of the smallest
    adversarial perturbation found per example, whether or not it is within eps (0 for examples
    already misclassified, inf where none was found); None for fixed-eps attacks.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    step: torch.Tensor
    broken_by: list[str | None] | None = None
    notes: list[str] = field(default_factory=list)
    norms: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Model and RNG hygiene
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode with frozen parameters; restore every module's mode and every
    parameter's ``requires_grad`` on exit (also on error).

    Only what differs is written (on a small model the bookkeeping is a visible share of an
    attack's time): ``model.eval()`` runs when some module is training or overrides ``train``,
    and on exit a flag is set back only where it is not already what it was."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode and any(t or type(m).train is not _MODULE_TRAIN for m, t in modes):
            model.eval()
        for p, r in flags:
            if r:
                p.requires_grad_(False)
        yield
    finally:
        for m, t in modes:
            if m.training != t:
                m.training = t
        for p, r in flags:
            if p.requires_grad != r:
                p.requires_grad_(r)


_MODULE_TRAIN = nn.Module.train


def select_targets(logits: torch.Tensor, y: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """Target classes != y: uniformly random (``random``) or the lowest logit (``least_likely``)."""
    k = logits.shape[1]
    if k < 2:
        raise AttackError("targeted attacks need at least 2 classes")
    if how == "least_likely":
        masked = logits.detach().clone()
        masked[torch.arange(len(y), device=y.device), y] = float("inf")
        return masked.argmin(dim=1)
    off = torch.randint(1, k, y.shape, generator=generator, device=generator.device).to(y.device)
    return (y + off) % k


_DEFAULT_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "bastion_attack_default_generator", default=None)


def generator_is_default(generator: torch.Generator) -> bool:
    """True when ``generator`` is the one `Attack.run` made from ``config.seed`` (caller passed none)."""
    return _DEFAULT_GENERATOR.get() is generator


def _class_indices(y: torch.Tensor) -> bool:
    """Whether ``y`` holds class indices: integers >= 0 (a float tensor of whole numbers counts)."""
    y = y.detach()
    if y.numel() == 0:
        return True
    if y.is_complex() or y.dtype == torch.bool:
        return False
    if y.is_floating_point() and not bool((torch.isfinite(y) & (y == y.floor())).all()):
        return False
    return bool(y.min() >= 0)


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------

class Attack(abc.ABC):
    """Base class. Subclasses set ``config_class`` and implement ``_run``.

    Class attributes: ``gradient_free`` (a black-box attack: its successes after white-box attacks
    failed hint at gradient masking), ``supports_targeted``, ``cost_rank`` (used to order
    attacks cheapest first when the user gives no order), ``minimum_norm`` (the attack looks for
    the smallest adversarial perturbation, unbounded by eps, and fills `AttackResult.norms`),
    ``bounded`` (False: the attack's output may leave the threat model, so `run` keeps only what
    lies inside it: points outside count as not broken, or are clipped with ``project=True``),
    ``batches_itself`` (the attack applies ``batch_size`` itself, e.g. pyautoattack)."""

    config_class: type[AttackConfig] = AttackConfig
    gradient_free: bool = False
    supports_targeted: bool = True
    cost_rank: int = 50
    minimum_norm: bool = False
    bounded: bool = True
    batches_itself: bool = False

    def __init__(self, config: AttackConfig, name: str | None = None):
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                              f"got {type(config).__name__}")
        if config.targeted and not self.supports_targeted:
            raise ConfigError(f"attack {name or type(self).__name__!r} has no targeted mode")
        self.config = config
        self.name = name or type(self).__name__.lower()

    @property
    def threat(self) -> ThreatModel:
        return self.config.threat

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, **self.config.to_dict()}
        if self.minimum_norm:
            out["minimum_norm"] = True
        return out

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, y_target: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: same shape, dtype and device as ``x``."""
        return self.run(model, x, y, y_target=y_target, generator=generator).x_adv

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, y_target: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> AttackResult:
        """Run the attack and return per-example details (`AttackResult`)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise AttackError("attack inputs x must be a floating-point tensor (N, ...) with values in [0, 1]")
        if y.shape != x.shape[:1]:
            raise AttackError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if not _class_indices(y):
            raise AttackError(f"labels y must be class indices (integers >= 0), got dtype {y.dtype} with values "
                              f"{y.detach().flatten()[:5].tolist()}...")
        if x.numel() and _outside_unit(x.detach()):
            raise AttackError("attack inputs must lie in [0, 1]; keep normalization inside the model")
        if y_target is not None and not self.config.targeted:
            raise AttackError(f"attack {self.name!r} got y_target but is not targeted; create it with targeted=True")
        device = model_device(model)
        in_device = x.device
        xd = x.detach().to(device)
        yd = y.detach().to(device).long()
        td = y_target.detach().to(device).long() if y_target is not None else None
        default_gen = None
        if generator is None:
            generator = default_gen = torch.Generator(device=device)
            generator.manual_seed(int(self.config.seed))
        n = xd.shape[0]
        if n == 0:
            empty = torch.zeros(0, dtype=torch.bool, device=in_device)
            return AttackResult(x.detach().clone(), empty, torch.zeros(0, dtype=torch.long, device=in_device))
        token = _DEFAULT_GENERATOR.set(default_gen)
        try:
            with attack_mode(model), forked_rng(device, generator):
                if self.config.targeted and td is None:
                    with torch.no_grad():
                        td = select_targets(model(xd), yd, self.config.target, generator)
                res = self._run_batches(model, xd, yd, td, generator)
                if self.minimum_norm and res.norms is None:
                    res.norms = torch.where(res.success, self.threat.distance(xd, res.x_adv.to(xd.dtype)),
                                            torch.full_like(res.success, float("inf"), dtype=xd.dtype))
                    if not self.config.targeted:  # already misclassified: distance 0, left alone
                        with torch.no_grad():
                            wrong = model(xd).argmax(1) != yd
                        res.norms[wrong] = 0.0
                        res.x_adv[wrong] = xd[wrong].to(res.x_adv.dtype)
                        res.success[wrong] = True
                if not self.bounded:
                    self._keep_inside(model, xd, yd, td, res)
        finally:
            _DEFAULT_GENERATOR.reset(token)
        res.x_adv = res.x_adv.detach().to(device=in_device, dtype=x.dtype)
        res.success = res.success.to(in_device)
        res.step = res.step.to(in_device)
        if res.norms is not None:
            res.norms = res.norms.detach().to(in_device)
        return res

    def _run_batches(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None,
                     generator: torch.Generator) -> AttackResult:
        """`_run` on slices of ``batch_size`` examples (one slice when unset), results concatenated."""
        bs = self.config.batch_size
        n = x.shape[0]
        if bs is None or self.batches_itself or n <= int(bs):
            return self._run(model, x, y, y_target, generator)
        from bastion.progress import progress

        parts: list[AttackResult] = []
        starts = range(0, n, int(bs))
        for s in progress(starts, desc=self.name, unit="batch", quiet=not self.config.progress):
            sl = slice(s, s + int(bs))
            parts.append(self._run(model, x[sl], y[sl], None if y_target is None else y_target[sl], generator))
        by = None
        if any(p.broken_by is not None for p in parts):
            by = [b for p in parts for b in (p.broken_by if p.broken_by is not None else [None] * p.x_adv.shape[0])]
        notes = list(dict.fromkeys(m for p in parts for m in p.notes))
        norms = None
        if all(p.norms is not None for p in parts):
            norms = torch.cat([p.norms for p in parts])
        return AttackResult(torch.cat([p.x_adv for p in parts]), torch.cat([p.success for p in parts]),
                            torch.cat([p.step for p in parts]), broken_by=by, notes=notes, norms=norms)

    def _keep_inside(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None,
                     res: AttackResult) -> None:
        """Make ``res`` respect the threat model (see ``bounded``); adds a note when it had to."""
        threat = self.threat
        xa = res.x_adv.to(x.dtype)
        finite = torch.isfinite(xa).flatten(1).all(1)
        xa = torch.where(finite.view((-1,) + (1,) * (x.dim() - 1)), xa, x)
        tol = 0.0 if threat.norm == "l0" else 1e-6 * (x[0].numel() if threat.norm == "l1" else 1)
        in_box = (xa.flatten(1).amin(1) >= 0) & (xa.flatten(1).amax(1) <= 1)
        dist = threat.distance(x, xa)
        outside = ~(finite & in_box & (dist <= threat.eps + tol))
        if not bool(outside.any()):
            res.x_adv = xa
            return
        k, n, worst = int(outside.sum()), x.shape[0], float(dist[outside & finite].max()) if bool(
            (outside & finite).any()) else float("nan")
        if self.config.project:
            xa[outside] = threat.project(x[outside], xa[outside])
            with torch.no_grad():
                pred = model(xa[outside]).argmax(1)
            goal = pred == y_target[outside] if self.config.targeted and y_target is not None else pred != y[outside]
            res.success[outside] = goal
            res.step[outside] = torch.where(goal, res.step[outside], torch.full_like(res.step[outside], -1))
            res.notes.append(f"{k} of {n} adversarial example(s) lay outside {threat} (up to {worst:.4g}); "
                             "project=True clipped them onto the ball and re-checked them")
        else:
            xa[outside] = x[outside]
            res.success[outside] = False
            res.step[outside] = -1
            res.notes.append(f"{k} of {n} adversarial example(s) lay outside {threat} (up to {worst:.4g}) and "
                             "count as not broken (project=True clips them instead)")
        res.x_adv = xa

    @abc.abstractmethod
    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None,
             generator: torch.Generator) -> AttackResult:
        """Attack a batch already on the model's device, in attack mode, with the RNG forked."""


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    cls: type[Attack]
    defaults: dict[str, Any]
    doc: str


_REGISTRY: dict[str, _Entry] = {}
# Prefix handlers: "torchattacks:<Name>" and the like. fn(suffix, threat, params) -> Attack
_PREFIXES: dict[str, Callable[[str, ThreatModel, dict[str, Any]], Attack]] = {}


def register_attack(name: str, cls: type[Attack], doc: str = "", **defaults: Any) -> None:
    """Register ``name`` -> ``cls`` with default parameters (overridable in `create_attack`)."""
    if name in _REGISTRY:
        raise ConfigError(f"attack {name!r} is registered twice")
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    bad = [k for k in defaults if k not in fields]
    if bad:
        raise ConfigError(f"attack {name!r}: defaults {bad} are not fields of {cls.config_class.__name__}")
    _REGISTRY[name] = _Entry(cls, dict(defaults), doc or (cls.__doc__ or "").strip().split("\n")[0])


def register_attack_prefix(prefix: str, factory: Callable[[str, ThreatModel, dict[str, Any]], Attack]) -> None:
    """Register a family of names ``prefix:<suffix>`` built by ``factory(suffix, threat, params)``."""
    _PREFIXES[prefix] = factory


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names matching a shell-style pattern, sorted (prefix families as ``p:<Name>``)."""
    names = list(_REGISTRY) + [f"{p}:<Name>" for p in _PREFIXES]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def is_attack(name: str) -> bool:
    return name in _REGISTRY or (":" in name and name.split(":", 1)[0] in _PREFIXES)


def attack_config_fields(name: str) -> set[str]:
    """The configuration fields a registered attack takes (empty for prefix attacks such as
    ``torchattacks:<Name>``, whose parameters belong to the third-party class)."""
    entry = _REGISTRY.get(name)
    return {f.name for f in dataclasses.fields(entry.cls.config_class)} if entry is not None else set()


def attack_doc(name: str) -> str:
    return _REGISTRY[name].doc if name in _REGISTRY else ""


def create_attack(name: str, threat: ThreatModel | str, **params: Any) -> Attack:
    """Build a registered attack: ``create_attack("pgd", "linf:8/255", steps=20)``.

    Unknown names or parameters raise `ConfigError` naming them."""
    threat = ThreatModel.parse(threat) if isinstance(threat, str) else threat
    if ":" in name and name not in _REGISTRY:
        prefix, suffix = name.split(":", 1)
        if prefix in _PREFIXES:
            return _PREFIXES[prefix](suffix, threat, dict(params))
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attack {name!r}; available: {', '.join(list_attacks())}")
    entry = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(entry.cls.config_class)} - {"threat"}
    unknown = sorted(k for k in params if k not in fields)
    if unknown:
        raise ConfigError(f"attack {name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
    kw = {**entry.defaults, **params}
    try:
        config = entry.cls.config_class(threat=threat, **kw)
    except (TypeError, ValueError) as exc:  # e.g. steps="abc" from a command line
        raise ConfigError(f"bad parameters for attack {name!r} ({', '.join(f'{k}={v!r}' for k, v in params.items())})"
                          f": {exc}") from None
    return entry.cls(config, name=name)
