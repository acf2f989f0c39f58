"""Adapters: AutoAttack (``pyautoattack``) and any torchattacks attack, behind the Bastion interface.

``autoattack`` runs pyautoattack's own code (standard, plus, rand, or a custom list of its
sub-attacks) on our model. It calls ``run_standard_evaluation`` once per sub-attack, in
AutoAttack's order and on the examples still robust, which is exactly what one call does
internally (same batches, same seeds), so on a deterministic model the robust accuracy and the
adversarial examples equal a direct call with the same seed, while each broken example is
attributed to the sub-attack that broke it. On a randomized model they do not: each forward
pass draws new randomness, and the split into one call per sub-attack changes the order of
those draws, so only the protocol (attacks, settings, seed of each attack) is the same, not the
examples; evaluate randomized models with ``autoattack-rand`` (EOT over 20 draws) and re-predict
with several draws. pyautoattack's warnings (randomness, softmax output, zero gradients, Square
beating APGD) are collected from the ``auto-attack`` logger into the result's notes whatever
the logger's level (it is lowered to WARNING for the call and restored), never printed.
pyautoattack computes in float32 (its code casts with ``.float()``): a float64 model is run
behind a float32 interface and the results are re-projected and re-checked in float64.

Common parameters (Bastion name -> pyautoattack): ``steps`` -> ``n_iter`` of APGD/APGD-T/FAB;
``restarts`` -> ``n_restarts`` (APGD, APGD-T, FAB; ``n_restarts`` is accepted as an alias);
``eot_iter`` -> APGD's ``eot_iter``; ``batch_size`` -> ``run_standard_evaluation(batch_size=)``
(250 as pyautoattack); ``seed`` -> ``seed``. Left unset, each keeps AutoAttack's value for the
version (e.g. rand: 20 EOT draws; plus: 5 restarts). ``step_size`` and ``loss`` are not used.

``torchattacks:<Name>`` runs ``torchattacks.<Name>(model, **params)`` (the ``torchattacks``
extra, version 3.5.x; older releases ship shadowing copies of other packages and are refused).
``eps`` (and ``norm`` where the attack has one) come from the threat model. Bastion's common
parameters are passed only when you set them, so every other argument keeps torchattacks'
default (e.g. ``PGD``'s ``alpha=2/255`` and ``steps=10``, ``EOTPGD``'s ``eot_iter=2``); the
defaults that applied are listed in the result's notes. Mapping: ``steps`` -> ``steps``,
``step_size`` -> ``alpha``, ``restarts`` -> ``n_restarts``, ``random_start`` ->
``random_start``, ``eot_iter`` -> ``eot_iter`` (each where the class has that argument); any
other argument goes by its torchattacks name (``params={"c": 1}`` or ``c=1``). Attacks without
an ``eps`` (CW, DeepFool, OnePixel, SparseFool, Pixle, JSMA, EADL1, EADEN) are minimum-norm or
unbounded attacks: they run unbounded, report the norm they needed, and an example counts as
broken only when its adversarial example lies inside the threat model (``project=True`` clips
instead). Inputs stay in [0, 1] and normalization stays inside the model:
``set_normalization_used`` is never called.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from attacks.base import (
    Attack,
    AttackConfig,
    AttackError,
    AttackResult,
    generator_is_default,
    register_attack,
    register_attack_prefix,
)
from bastion.errors import ConfigError
from bastion.threat import ThreatModel

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_GRADIENT_FREE = ("square",)
_AA_ORDER = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
             "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
             "rand": ("apgd-ce", "apgd-dlr")}
_AA_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


@dataclass(frozen=True)
class AutoAttackConfig(AttackConfig):
    """AutoAttack settings. version: standard | plus | rand | custom (then ``attacks`` lists
    pyautoattack sub-attacks, e.g. ("apgd-ce", "square")). Overrides of the version's settings
    (None keeps them): ``steps`` -> APGD/FAB iterations, ``restarts`` (alias ``n_restarts``),
    ``n_target_classes``, ``n_queries`` (Square), ``eot_iter`` (APGD EOT draws; rand uses 20).
    ``batch_size``: as pyautoattack's. ``seed`` is AutoAttack's seed when the caller passes no
    generator."""

    restarts: int | None = None
    eot_iter: int | None = None
    batch_size: int | None = 250
    version: str = "standard"
    attacks: tuple[str, ...] = ()
    n_restarts: int | None = None
    n_target_classes: int | None = None
    n_queries: int | None = None

    def __post_init__(self) -> None:
        if self.n_restarts is not None:
            if self.restarts is not None and int(self.restarts) != int(self.n_restarts):
                raise ConfigError(f"autoattack got restarts={self.restarts} and n_restarts={self.n_restarts}; "
                                  "give one (n_restarts is an alias of restarts)")
            object.__setattr__(self, "restarts", int(self.n_restarts))
            object.__setattr__(self, "n_restarts", None)
        attacks = self.attacks
        if isinstance(attacks, str):
            attacks = [a for a in attacks.replace("+", ",").replace(";", ",").split(",") if a.strip()]
        object.__setattr__(self, "attacks", tuple(a.strip() for a in attacks))
        super().__post_init__()
        if self.version not in AA_VERSIONS:
            raise ConfigError(f"unknown autoattack version {self.version!r}: use one of {', '.join(AA_VERSIONS)}")
        bad = [a for a in self.attacks if a not in AA_ATTACKS]
        if bad:
            raise ConfigError(f"unknown autoattack sub-attack(s) {bad}: use {', '.join(AA_ATTACKS)}")
        if self.version == "custom" and not self.attacks:
            raise ConfigError("autoattack version='custom' needs attacks=[...], e.g. ['apgd-ce', 'square']")
        if self.version != "custom" and self.attacks:
            raise ConfigError(f"autoattack attacks=[...] needs version='custom' (version {self.version!r} fixes them)")
        if self.threat.norm not in _AA_NORMS:
            raise ConfigError(f"autoattack supports linf, l2 and l1, not {self.threat.norm}")
        if self.step_size is not None or self.loss != "ce":
            raise ConfigError("autoattack is parameter-free: step_size and loss are not used "
                              "(use steps, restarts, n_target_classes, n_queries)")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _captured_logger(name: str) -> Iterator[_Collect]:
    """Collect WARNING+ records of logger ``name`` (whatever level it was set to), print nothing."""
    logger = logging.getLogger(name)
    handler = _Collect()
    old, old_level, old_disabled = logger.propagate, logger.level, logger.disabled
    logger.addHandler(handler)
    logger.propagate = False
    logger.disabled = False
    if logger.getEffectiveLevel() > logging.WARNING or logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.disabled = old, old_disabled
        logger.setLevel(old_level)


def build_autoattack(model, cfg: AutoAttackConfig, device: torch.device, seed: int):
    """A configured ``pyautoattack.AutoAttack`` (the overrides rebuild APGD, whose checkpoint
    schedule is fixed at construction)."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    aa = AutoAttack(model, attacks=list(cfg.attacks) if cfg.version == "custom" else None, device=device,
                    eps=float(cfg.threat.eps), norm=_AA_NORMS[cfg.threat.norm], seed=int(seed), version=cfg.version)
    if cfg.steps is not None or cfg.eot_iter is not None:
        n_iter = int(cfg.steps) if cfg.steps is not None else aa.apgd.n_iter
        eot = int(cfg.eot_iter) if cfg.eot_iter is not None else aa.apgd.eot_iter
        common = dict(n_iter=n_iter, verbose=False, eps=aa.epsilon, norm=aa.norm, eot_iter=eot, rho=.75,
                      seed=aa.seed, device=device, logger=aa.logger)
        apgd = APGDAttack(model, n_restarts=aa.apgd.n_restarts, **common)
        apgd.use_largereps = aa.apgd.use_largereps
        apgdt = APGDAttack_targeted(model, n_restarts=aa.apgd_targeted.n_restarts, **common)
        apgdt.n_target_classes = aa.apgd_targeted.n_target_classes
        apgdt.use_largereps = aa.apgd_targeted.use_largereps
        aa.apgd, aa.apgd_targeted = apgd, apgdt
        if cfg.steps is not None:
            aa.fab.n_iter = int(cfg.steps)
    if cfg.restarts is not None:
        aa.apgd.n_restarts = aa.fab.n_restarts = aa.apgd_targeted.n_restarts = int(cfg.restarts)
    if cfg.n_target_classes is not None:
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = int(cfg.n_target_classes)
    if cfg.n_queries is not None:
        aa.square.n_queries = int(cfg.n_queries)
    return aa


class AutoAttackAdapter(Attack):
    """AutoAttack (Croce & Hein 2020) via pyautoattack: standard, plus, rand or custom."""

    config_class = AutoAttackConfig
    supports_targeted = False
    cost_rank = 90
    gradient_free_parts = AA_GRADIENT_FREE
    batches_itself = True

    def parts(self) -> list[str]:
        """Sub-attacks in the order they run (pyautoattack's order for each version)."""
        if self.config.version == "custom":
            return list(self.config.attacks)
        return list(_AA_ORDER[self.config.version])

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        device = x.device
        # the configured seed when the caller gave no generator (Attack.run seeds it from cfg.seed),
        # so a standalone call equals pyautoattack with the same seed
        seed = int(cfg.seed) if generator_is_default(generator) else \
            int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device))
        wide = x.dtype != torch.float32
        target = _Float32Interface(model, x.dtype) if wide else model
        aa = build_autoattack(target, cfg, device, seed)
        order = list(aa.attacks_to_run)
        x_adv = x.clone()
        success = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        by: list[str | None] = [None] * x.shape[0]
        with torch.no_grad():
            clean_wrong = model(x).argmax(1) != y
        success |= clean_wrong
        x_in = x.float() if wide else x
        bs = int(cfg.batch_size) if cfg.batch_size is not None else 250
        from bastion.progress import progress

        with _captured_logger("auto-attack") as log:
            for name in progress(order, desc=self.name, unit="attack", quiet=not cfg.progress):
                idx = (~success).nonzero().flatten()
                if idx.numel() == 0:
                    break
                aa.attacks_to_run = [name]
                adv, y_adv = aa.run_standard_evaluation(x_in[idx], y[idx], batch_size=bs)
                adv = adv.to(device=device, dtype=x.dtype)
                if wide:  # back in the model's precision: re-project and re-predict
                    adv = cfg.threat.project(x[idx], adv)
                    with torch.no_grad():
                        y_adv = model(adv).argmax(1)
                broke = (y_adv.to(device) != y[idx])
                pos = idx[broke]
                x_adv[pos] = adv[broke]
                success[pos] = True
                for p in pos.tolist():
                    by[p] = name
        step = torch.full((x.shape[0],), -1, dtype=torch.long, device=device)
        step[clean_wrong] = 0
        return AttackResult(x_adv, success, step, broken_by=by, notes=log.messages)


class _Float32Interface(torch.nn.Module):
    """float32 in, float32 logits out, the wrapped model run in ``dtype`` (for pyautoattack)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


register_attack("autoattack", AutoAttackAdapter, version="standard")
register_attack("autoattack-rand", AutoAttackAdapter, doc="AutoAttack rand version (APGD-CE/DLR with EOT-20).",
                version="rand")
register_attack("autoattack-plus", AutoAttackAdapter, doc="AutoAttack plus version.", version="plus")


# ---------------------------------------------------------------------------------------------
# torchattacks
# ---------------------------------------------------------------------------------------------

_TA_NORMS = {
    "linf": {"FGSM", "BIM", "RFGSM", "PGD", "EOTPGD", "FFGSM", "TPGD", "MIFGSM", "UPGD", "APGD", "APGDT",
             "DIFGSM", "TIFGSM", "Jitter", "NIFGSM", "PGDRS", "SINIFGSM", "VMIFGSM", "VNIFGSM", "SPSA",
             "PIFGSM", "PIFGSMPP", "FAB", "Square", "AutoAttack", "GN", "VANILA"},
    "l2": {"CW", "PGDL2", "PGDRSL2", "DeepFool", "EADEN", "APGD", "APGDT", "FAB", "Square", "AutoAttack",
           "VANILA"},
}
_TA_GRADIENT_FREE = {"Square", "SPSA", "OnePixel", "Pixle", "GN", "VANILA"}


def import_torchattacks():
    try:
        ta = importlib.import_module("torchattacks")
    except ImportError:
        raise AttackError("torchattacks is not installed: pip install 'bastion-robustness[torchattacks]' "
                          "(torchattacks==3.5.1)") from None
    version = str(getattr(ta, "__version__", "0"))
    if not version.startswith("3.5."):
        raise AttackError(f"torchattacks {version} is installed; Bastion needs 3.5.x (older releases install "
                          "shadowing copies of autoattack/robustbench): pip install torchattacks==3.5.1")
    return ta


_TA_COMMON = {"steps": "steps", "step_size": "alpha", "restarts": "n_restarts", "random_start": "random_start",
              "eot_iter": "eot_iter", "seed": "seed"}


@dataclass(frozen=True)
class TorchattacksConfig(AttackConfig):
    """``attack``: the torchattacks class name; ``params``: its other constructor arguments as
    (name, value) pairs; ``explicit``: the common fields the user set (only those are passed on,
    mapped as in the module docstring; the rest keep torchattacks' defaults)."""

    attack: str = "PGD"
    params: tuple[tuple[str, Any], ...] = ()
    explicit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        p = self.params
        if isinstance(p, dict):
            p = tuple(sorted(p.items()))
        object.__setattr__(self, "params", tuple((str(k), v) for k, v in p))
        object.__setattr__(self, "explicit", tuple(sorted(str(k) for k in self.explicit)))
        super().__post_init__()


class TorchattacksAdapter(Attack):
    """Any torchattacks attack by name (``torchattacks:<Name>``)."""

    config_class = TorchattacksConfig
    cost_rank = 50
    bounded = False  # third-party output is kept only where it lies inside the threat model

    def __init__(self, config: TorchattacksConfig, name: str | None = None):
        super().__init__(config, name or f"torchattacks:{config.attack}")
        ta = import_torchattacks()
        cls = getattr(ta, config.attack, None)
        if cls is None or not inspect.isclass(cls):
            names = sorted(n for n in getattr(ta, "__all__", []) if n not in ("MultiAttack", "LGV"))
            raise ConfigError(f"torchattacks has no attack {config.attack!r}; available: {', '.join(names)}")
        self._cls = cls
        sig = inspect.signature(cls.__init__).parameters
        norm = config.threat.norm
        known = any(config.attack in s for s in _TA_NORMS.values())
        self.minimum_norm = "eps" not in sig
        if known and not self.minimum_norm and config.attack not in _TA_NORMS.get(norm, ()):
            raise ConfigError(f"torchattacks.{config.attack} does not attack the {norm} threat model {config.threat}")
        if "eps" in sig and norm not in ("linf", "l2"):
            raise ConfigError(f"torchattacks.{config.attack} attacks linf or l2 balls, not {config.threat}")
        kwargs: dict[str, Any] = {}
        for field_name, arg in _TA_COMMON.items():
            if field_name in config.explicit:
                if arg not in sig and field_name == "seed":
                    continue  # Bastion's seed still seeds the forked RNG the attack draws from
                if arg not in sig:
                    raise ConfigError(f"torchattacks.{config.attack} has no {arg!r} argument for Bastion's "
                                      f"{field_name}; it takes {[p for p in sig if p not in ('self', 'model')]}")
                kwargs[arg] = getattr(config, field_name)
        if "eps" in sig:
            kwargs["eps"] = float(config.threat.eps)
        if "norm" in sig:
            kwargs["norm"] = {"linf": "Linf", "l2": "L2"}[norm]
        for k, v in config.params:
            if k not in sig or k == "model":
                raise ConfigError(f"torchattacks.{config.attack} takes no argument {k!r}; it takes "
                                  f"{[p for p in sig if p not in ('self', 'model')]}")
            kwargs[k] = v
        self._kwargs = kwargs
        # torchattacks' own defaults for the common arguments left unset (reported, never replaced)
        self.defaults_used = {arg: sig[arg].default for arg in _TA_COMMON.values()
                              if arg in sig and arg not in kwargs and arg != "seed"
                              and sig[arg].default is not inspect.Parameter.empty}
        self.gradient_free = config.attack in _TA_GRADIENT_FREE

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["torchattacks_kwargs"] = {k: v for k, v in sorted(self._kwargs.items())
                                      if isinstance(v, (bool, int, float, str))}
        out["torchattacks_defaults"] = dict(sorted(self.defaults_used.items()))
        return out

    def _run(self, model, x, y, y_target, generator):
        import numpy as np

        sink = io.StringIO()
        np_state = np.random.get_state()  # OnePixel (scipy's differential evolution) draws from numpy
        np.random.seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device)))
        try:
            return self._run_seeded(model, x, y, y_target, sink)
        finally:
            np.random.set_state(np_state)

    def _run_seeded(self, model, x, y, y_target, sink):
        with contextlib.redirect_stdout(sink):  # torchattacks prints status messages
            atk = self._cls(model, **self._kwargs)
            atk.set_device(x.device)
            if self.config.targeted:
                if "targeted" not in atk.supported_mode:
                    raise AttackError(f"torchattacks.{self.config.attack} has no targeted mode")
                atk.set_mode_targeted_by_label(quiet=True)
                x_adv = atk(x, y_target)
            else:
                x_adv = atk(x, y)
        x_adv = x_adv.detach().to(x.device, x.dtype)
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        success = pred == y_target if self.config.targeted else pred != y
        notes = []
        if self.defaults_used:
            notes.append(f"torchattacks.{self.config.attack} ran with its own defaults "
                         + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in sorted(self.defaults_used.items()))
                         + " (set steps/step_size/restarts/random_start/eot_iter to change them)")
        return AttackResult(x_adv, success, torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device),
                            notes=notes)


def _torchattacks_factory(suffix: str, threat: ThreatModel, params: dict[str, Any]) -> Attack:
    import dataclasses

    base = {f.name for f in dataclasses.fields(AttackConfig)} - {"threat"}
    own = {k: params.pop(k) for k in list(params) if k in base}
    if "params" in params:
        extra = params.pop("params")
        params.update(dict(extra))
    explicit = tuple(k for k in own if k in _TA_COMMON)
    bad = [k for k in own if k in ("loss",)]
    if bad:
        raise ConfigError(f"torchattacks:{suffix} does not use Bastion's {bad}; pass torchattacks' own arguments")
    return TorchattacksAdapter(TorchattacksConfig(threat=threat, attack=suffix, params=tuple(sorted(params.items())),
                                                  explicit=explicit, **own))


register_attack_prefix("torchattacks", _torchattacks_factory)
