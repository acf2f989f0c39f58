"""Defense kinds: how each kind of leaderboard entry is loaded and which attacks it needs.

A kind is chosen by the entry (``defense = "..."``) and decides, for one threat model, the model
the evaluator attacks and the attack suite (the AutoAttack-grade protocol plus the adaptive
attacks the defense calls for). Every suite runs through `attacks.AttackProbe` (each attack on
the examples still robust; robust accuracy is the per-example worst case), so a record names the
attack that broke each example and the report says which attacks ran.

- ``plain``: a deterministic checkpoint; standard: AutoAttack standard (pyautoattack: APGD-CE,
  APGD-T, FAB-T, Square); fast: APGD-CE + APGD-T.
- ``randomized``: a checkpoint whose forward pass draws noise; standard: AutoAttack rand (APGD-CE
  and APGD-DLR with EOT-20); fast: EOT-APGD-CE.
- ``smoothed`` (``sigma``): the Gaussian-smoothed soft classifier of a checkpoint
  (`certify.smoothing.SoftSmoothed`, ``num_noise`` draws per forward pass) attacked with SmoothAdv
  (PGD on its cross-entropy, fresh noise every step) and EOT-APGD; plus Cohen et al.'s CERTIFY
  (`certify.runner.CertifyProbe`), reported as certified accuracy at the threat model's radius
  (an L2 radius of eps * sqrt(d) covers the Linf ball of radius eps).
- ``mixed``: a composite checkpoint of `defenses.adaptive_smoothing` attacked with
  `attacks.mixing.adaptive_suite` (APGD, composite alpha attacks, alpha-first, transfer, Square,
  and AutoAttack under the standard protocol).
- ``detector``: a classifier checkpoint guarded by a detector (`experiments.leaderboard.detector`:
  a saved detector or a Mahalanobis detector fitted on the training split, threshold at a stated
  clean FPR); the standard protocol against the classifier alone plus detector-aware APGD/PGD;
  an attack succeeds only when misclassified AND not detected.

Register another kind with `register_defense(name, build, needs=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.records import CleanRecord
from bastion.rng import forked_rng
from bastion.threat import ThreatModel
from experiments.leaderboard.config import Entry

FAST_STEPS = 20        # attack steps under the fast protocol when the config sets none


class SeededCleanProbe:
    """Clean accuracy with the forward pass under an RNG forked from the probe's generator, so a
    randomized model's clean records are the same on resume and on any worker ("clean" records)."""

    name = "clean"

    def describe(self) -> dict[str, Any]:
        return {"kind": "clean"}

    def run(self, model, x, y, indices, generator):
        with torch.no_grad(), forked_rng(x.device, generator):
            pred = model(x).argmax(dim=1)
        return [CleanRecord(index=int(i), probe=self.name, label=int(t), pred=int(p), correct=bool(p == t)).to_record()
                for i, t, p in zip(indices.tolist(), y.tolist(), pred.tolist())]


@dataclass
class Context:
    """What a kind gets: the entry, its checkpoint (path) and card, the run's protocol and device."""

    entry: Entry
    checkpoint: str
    card: dict[str, Any]
    protocol: str
    steps: int | None
    seed: int
    device: str
    workers: int = 1
    detector: str | None = None                 # the card of the entry's saved detector (kind ``detector``)


@dataclass
class Defense:
    """A built entry: ``model`` (an nn.Module or a checkpoint path) and, per threat model, its probes."""

    kind: str
    model: Any
    probes: Callable[[Sequence[ThreatModel]], list[Any]]
    forward_passes: int = 1
    notes: list[str] = field(default_factory=list)
    certify_radius: Callable[[ThreatModel], float] | None = None
    info: dict[str, Any] = field(default_factory=dict)   # kind-specific JSON for the entry (detector card fields)


Builder = Callable[[Context], Defense]
_KINDS: dict[str, tuple[Builder, str]] = {}


def register_defense(name: str, build: Builder, needs: str) -> None:
    """Register a defense kind; ``needs`` says in a few words what an entry of this kind must give."""
    _KINDS[name] = (build, needs)


def list_defenses() -> dict[str, str]:
    return {k: v[1] for k, v in _KINDS.items()}


def check_defenses(entries: Sequence[Entry]) -> None:
    """Fail before any work on an unknown kind or one that cannot run yet."""
    for e in entries:
        if e.defense not in _KINDS:
            raise ConfigError(f"entry {e.name!r}: unknown defense {e.defense!r}; use one of {', '.join(_KINDS)}")
        if e.defense == "detector":
            from experiments.leaderboard.detector import parse_spec

            parse_spec(e.detector, e.name)
        elif e.detector:
            raise ConfigError(f"entry {e.name!r}: a 'detector' table needs defense = \"detector\"")
        if e.defense == "smoothed" and e.sigma is None:
            raise ConfigError(f"entry {e.name!r}: defense 'smoothed' needs sigma (the Gaussian noise level)")


def build_defense(ctx: Context) -> Defense:
    kind = ctx.entry.defense
    if kind not in _KINDS:
        raise ConfigError(f"entry {ctx.entry.name!r}: unknown defense {kind!r}; use one of {', '.join(_KINDS)}")
    return _KINDS[kind][0](ctx)


def _steps(ctx: Context, standard: int | None) -> int | None:
    """The configured steps, else the fast protocol's, else (standard) the attack's own (None)."""
    if ctx.steps is not None:
        return ctx.steps
    return FAST_STEPS if ctx.protocol == "fast" else standard


def _probe(threat: ThreatModel, names: list[str], params: dict[str, dict[str, Any]]):
    from attacks import AttackProbe

    return AttackProbe(threat, names, attack_params=params, name=f"attack@{threat}")


def _plain(ctx: Context) -> Defense:
    steps = _steps(ctx, None)

    def probes(threats: Sequence[ThreatModel]) -> list[Any]:
        out: list[Any] = [SeededCleanProbe()]
        for t in threats:
            if ctx.protocol == "standard":
                p = {"version": "standard", "seed": ctx.seed} | ({"steps": steps} if steps else {})
                out.append(_probe(t, ["autoattack"], {"autoattack": p}))
            else:
                out.append(_probe(t, ["apgd-ce", "apgd-t"], {"apgd-ce": {"steps": steps, "seed": ctx.seed},
                                                            "apgd-t": {"steps": steps, "seed": ctx.seed}}))
        return out

    model = ctx.checkpoint if ctx.workers > 1 else _load(ctx)
    return Defense("plain", model, probes)


def _randomized(ctx: Context) -> Defense:
    steps = _steps(ctx, None)
    eot = ctx.entry.eot_iter

    def probes(threats: Sequence[ThreatModel]) -> list[Any]:
        out: list[Any] = [SeededCleanProbe()]
        for t in threats:
            if ctx.protocol == "standard":
                p = {"version": "rand", "seed": ctx.seed, "eot_iter": eot} | ({"steps": steps} if steps else {})
                out.append(_probe(t, ["autoattack-rand"], {"autoattack-rand": p}))
            else:
                out.append(_probe(t, ["eot-apgd"], {"eot-apgd": {"steps": steps, "eot_iter": eot, "seed": ctx.seed}}))
        return out

    model = ctx.checkpoint if ctx.workers > 1 else _load(ctx)
    return Defense("randomized", model, probes, notes=[f"EOT over {eot} draws per gradient"])


def _smoothed(ctx: Context) -> Defense:
    from attacks.objectives import LossObjective
    from certify.analysis import default_max_radius
    from certify.runner import CertifyOptions, CertifyProbe, Setting
    from certify.smoothing import SoftSmoothed

    e = ctx.entry
    if e.sigma is None:
        raise ConfigError(f"entry {e.name!r}: defense 'smoothed' needs sigma (the Gaussian noise level)")
    steps = _steps(ctx, 20)
    apgd_steps = _steps(ctx, 100)
    model = SoftSmoothed(_load(ctx), e.sigma, num_noise=e.num_noise)
    cert = {"n0": 100, "n": 1000, "alpha": 0.001, "batch": 1000} | e.certify
    copts = CertifyOptions(n0=int(cert["n0"]), n=int(cert["n"]), alpha=float(cert["alpha"]), batch=int(cert["batch"]),
                           seed=ctx.seed, device=ctx.device)
    d = math.prod(int(v) for v in ctx.card["input_shape"])

    def radius(t: ThreatModel) -> float:
        return t.eps if t.norm == "l2" else t.eps * math.sqrt(d)

    def probes(threats: Sequence[ThreatModel]) -> list[Any]:
        out: list[Any] = [SeededCleanProbe()]
        for t in threats:
            # on the smoothed soft classifier, CE of its log-probabilities is SmoothAdv's objective
            params = {"smoothadv": {"steps": steps, "sigma": e.sigma, "num_noise": e.num_noise,
                                    "objective": LossObjective("ce"), "seed": ctx.seed},
                      "eot-apgd": {"steps": apgd_steps, "eot_iter": e.eot_iter, "seed": ctx.seed}}
            out.append(_probe(t, ["smoothadv", "eot-apgd"], params))
        max_r = max([default_max_radius([e.sigma])] + [radius(t) for t in threats])
        setting = Setting(f"certify-sigma{e.sigma:g}", ctx.checkpoint, e.sigma, int(ctx.card["num_classes"]))
        out.append(CertifyProbe(setting, copts, max_radius=max_r))
        return out

    notes = [f"soft smoothed classifier, sigma {e.sigma:g}, {e.num_noise} noise draws per forward pass",
             f"CERTIFY n0={copts.n0}, n={copts.n}, alpha={copts.alpha}"]
    return Defense("smoothed", model, probes, forward_passes=e.num_noise, notes=notes, certify_radius=radius)


def _mixed(ctx: Context) -> Defense:
    from attacks.mixing import adaptive_suite

    if ctx.card.get("composite") is None and ctx.card.get("builder") is None:
        raise ConfigError(f"entry {ctx.entry.name!r}: defense 'mixed' needs a composite checkpoint of "
                          f"defenses.adaptive_smoothing (bastion mix), got a plain card")
    steps = _steps(ctx, 100)

    def probes(threats: Sequence[ThreatModel]) -> list[Any]:
        from attacks import AttackProbe

        out: list[Any] = [SeededCleanProbe()]
        for t in threats:
            suite = adaptive_suite(t, steps=steps, autoattack=ctx.protocol == "standard", seed=ctx.seed)
            out.append(AttackProbe(t, suite, name=f"attack@{t}"))
        return out

    return Defense("mixed", _load(ctx), probes, notes=["adaptive suite of attacks.mixing (composite alpha attacks)"])


def _detector(ctx: Context) -> Defense:
    from experiments.leaderboard import detector as guard

    e = ctx.entry
    if ctx.detector is None:
        raise ConfigError(f"entry {e.name!r}: defense 'detector' has no detector (give detector = {{ path = ... }} "
                          f"or detector = {{ kind = \"mahalanobis\" }})")
    spec = guard.parse_spec(e.detector, e.name)
    classifier = _load(ctx)
    det, card = guard.load_for_entry(ctx.detector, classifier, ctx.checkpoint, e.name)
    thr = float(card["threshold"])
    steps = _steps(ctx, None)

    def probes(threats: Sequence[ThreatModel]) -> list[Any]:
        out: list[Any] = [guard.GuardedCleanProbe(det, thr)]
        for t in threats:
            suite = guard.attack_suite(t, det, thr, ctx.protocol, steps, ctx.seed, spec.weight)
            out.append(guard.GuardedAttackProbe(t, det, thr, suite, name=f"attack@{t}"))
        return out

    fpr = card.get("fpr")
    extra = card.get("extra") or {}
    at = f"{100 * fpr:g}% FPR on {extra.get('calibration_n', '?')} held-out clean training images" \
        if fpr is not None else "the threshold saved with the detector"
    notes = [f"{card['detector']} detector '{card.get('name')}' rejects inputs scoring above {thr:.6g} ({at}); "
             f"a rejected clean input counts as an error",
             "robust = the clean input accepted and correct, and no attack output misclassified AND undetected",
             f"detector-aware attacks: APGD on (1 - {spec.weight:g}) margin - {spec.weight:g} x standardized score, "
             f"APGD and PGD with the selective objective (Bryniarski et al. 2022)"]
    info = guard.card_summary(card) | {"adaptive_attacks": list(guard.ADAPTIVE), "adaptive_weight": spec.weight}
    return Defense("detector", classifier, probes, notes=notes, info=info)


def _load(ctx: Context) -> nn.Module:
    from bastion.checkpoints import load_checkpoint

    return load_checkpoint(ctx.checkpoint, ctx.device)[0].eval()


register_defense("plain", _plain, "a checkpoint")
register_defense("randomized", _randomized, "a checkpoint whose forward pass is random (eot_iter)")
register_defense("smoothed", _smoothed, "a base checkpoint and sigma (num_noise, certify)")
register_defense("mixed", _mixed, "a composite checkpoint of defenses.adaptive_smoothing")
register_defense("detector", _detector, "a checkpoint and a detector table (a saved detector path, or kind = "
                  "\"mahalanobis\" fitted on the training split; fpr)")
