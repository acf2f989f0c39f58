"""Evaluator integration: AutoAttack's protocol for any list of attacks, and sanity flags.

`AttackProbe` follows `bastion.evaluate.Probe`. For one threat model it runs the configured
attacks in order (cheapest first by default), each only on the examples still robust, and
never trusts an attack: every adversarial batch is checked with `ThreatModel.check` (a
violation raises `ThreatModelViolation`, nothing is clamped) and re-predicted by the probe
itself. Each example gets one record:

    {"index", "probe", "kind": "robust", "threat", "attack" (the suite), "broken_by" (attack
     name, "autoattack/square" for AutoAttack's sub-attacks, or null), "step" (gradient step
     at which it broke, null when unknown or robust), "label", "pred", "correct", "flags",
     "min_norm" (minimum-norm attacks only, see below)}

Minimum-norm attacks (``minimum_norm``: fmn-*, ddn, cw-l2, deepfool, fab, and third-party
attacks without an eps such as ``torchattacks:CW``) run on every example correctly classified
at its clean input, not only on those still robust, so each record carries the smallest
perturbation norm found (``min_norm``): the robust fold turns these into a robust-accuracy-vs-eps
curve from one run. Within the suite they break an example only when that perturbation lies
inside the threat model.

``flags`` are per-example sanity checks, folded by `sanity_flags` into one-line warnings:

- ``random_output``: repeated forward passes at the clean input disagree (a randomized model:
  use eot-pgd / eot-apgd or autoattack-rand);
- ``probability_output``: the outputs look like probabilities, not logits;
- ``zero_gradient``: the loss gradient at the clean input is exactly zero;
- ``black_box_win``: a gradient-free attack broke an example every white-box attack before it
  missed (gradient masking);
- ``weaker_beats_stronger``: the strongest white-box attack of the suite, run on an example an
  earlier (weaker) attack broke, failed on it (``cross_check`` examples per batch).

All randomness comes from the probe's generator (one child generator per attack, drawn in a
fixed order), so a resumed run recomputes a chunk to exactly the same records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, attack_mode, child_generator, create_attack, forked_rng
from bastion.errors import ConfigError, ThreatModelViolation
from bastion.metrics import FLAG_MESSAGES, sanity_flags  # noqa: F401  (re-exported; the robust fold uses them)
from bastion.records import RobustRecord
from bastion.threat import ThreatModel


def _is_gradient_free(attack: Attack, part: str | None = None) -> bool:
    if part is not None:
        return part in getattr(attack, "gradient_free_parts", ())
    return bool(attack.gradient_free)


class AttackProbe:
    """Robustness under a suite of attacks at one threat model (see module docstring).

    attacks: names (built with ``create_attack(name, threat, **attack_params.get(name, {}))``) or
    `Attack` objects; ``sort=True`` orders them by their ``cost_rank`` (cheapest first).
    cross_check: examples per batch on which the strongest white-box attack is re-run after a
    weaker one broke them."""

    def __init__(self, threat: ThreatModel | str, attacks: Sequence[str | Attack], *,
                 attack_params: dict[str, dict[str, Any]] | None = None, cross_check: int = 0,
                 sort: bool = False, name: str | None = None):
        self.threat = ThreatModel.parse(threat) if isinstance(threat, str) else threat
        params = attack_params or {}
        built = [a if isinstance(a, Attack) else create_attack(a, self.threat, **params.get(a, {}))
                 for a in attacks]
        if not built:
            raise ConfigError("an attack probe needs at least one attack")
        for a in built:
            if a.threat != self.threat:
                raise ConfigError(f"attack {a.name!r} is configured for {a.threat}, the probe for {self.threat}")
        if sort:
            built = sorted(built, key=lambda a: a.cost_rank)
        names = [a.name for a in built]
        if len(set(names)) != len(names):
            raise ConfigError(f"attack names in a suite must be unique, got {names}")
        self.attacks = built
        self.suite = "+".join(names)
        self.cross_check = int(cross_check)
        self.name = name or f"{self.suite}@{self.threat}"

    def describe(self) -> dict[str, Any]:
        out = {"kind": "robust", "threat": str(self.threat), "attacks": [a.describe() for a in self.attacks],
               "cross_check": self.cross_check}
        if any(a.minimum_norm for a in self.attacks):
            out["minimum_norm"] = [a.name for a in self.attacks if a.minimum_norm]
        return out

    # -- checks ------------------------------------------------------------------------------
    @staticmethod
    def _checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                logits: torch.Tensor) -> list[list[str]]:
        device = x.device
        flags: list[list[str]] = [[] for _ in range(x.shape[0])]
        with torch.no_grad(), forked_rng(device, generator):
            again = [model(x) for _ in range(2)]

        def unit(z: torch.Tensor) -> torch.Tensor:
            return z / z.flatten(1).norm(dim=1).clamp_min(1e-10).view(-1, 1)

        differ = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        for z in again:
            differ |= (unit(z) - unit(logits)).norm(dim=1) > 1e-4
            differ |= z.argmax(1) != logits.argmax(1)
        prob = (logits.min(1).values > -1e-5) & (logits.max(1).values < 1 + 1e-5) & \
               ((logits.sum(1) - 1).abs() < 1e-5)
        with attack_mode(model), forked_rng(device, generator), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        zero = g.flatten(1).abs().sum(1) == 0
        for i in range(x.shape[0]):
            if differ[i]:
                flags[i].append("random_output")
            if prob[i]:
                flags[i].append("probability_output")
            if zero[i]:
                flags[i].append("zero_gradient")
        return flags

    def _predict(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad(), forked_rng(x.device, generator):
            return model(x).argmax(dim=1)

    # -- the protocol --------------------------------------------------------------------------
    def run(self, model, x, y, indices, generator):
        device = x.device
        n = x.shape[0]
        g_check = child_generator(generator)
        g_attack = [child_generator(generator) for _ in self.attacks]
        g_pred = [child_generator(generator) for _ in self.attacks]
        g_cross = child_generator(generator)
        with torch.no_grad(), forked_rng(device, child_generator(g_check)):
            logits = model(x)
        flags = self._checks(model, x, y, g_check, logits)
        pred = logits.argmax(1)
        robust = pred == y
        broken_by: list[str | None] = [None] * n
        step: list[int | None] = [None] * n
        first_broken: list[int | None] = [None] * n  # position of the attack that broke it
        clean_ok = robust.clone()
        min_norm: list[float | None] = [0.0 if not bool(c) else None for c in clean_ok] \
            if any(a.minimum_norm for a in self.attacks) else [None] * n
        white_box_seen = False
        for k, (atk, g, gp) in enumerate(zip(self.attacks, g_attack, g_pred)):
            # minimum-norm attacks see every clean-correct example (for the per-example norms)
            idx = (clean_ok if atk.minimum_norm else robust).nonzero().flatten()
            if idx.numel() == 0 or not bool(robust.any()) and not atk.minimum_norm:
                continue
            res = atk.run(model, x[idx], y[idx], generator=g)
            try:
                self.threat.check(x[idx], res.x_adv)
            except ThreatModelViolation as exc:
                raise ThreatModelViolation(f"attack {atk.name!r}: {exc}") from None
            if atk.minimum_norm and res.norms is not None:
                for j, v in enumerate(res.norms.tolist()):
                    i = int(idx[j])
                    if math.isfinite(v) and (min_norm[i] is None or v < min_norm[i]):
                        min_norm[i] = float(v)
            p = self._predict(model, res.x_adv, gp)
            broke = (p != y[idx]) & robust[idx]
            for j in broke.nonzero().flatten().tolist():
                i = int(idx[j])
                part = res.broken_by[j] if res.broken_by is not None else None
                broken_by[i] = f"{atk.name}/{part}" if part else atk.name
                s = int(res.step[j])
                step[i] = s if s >= 0 else None
                first_broken[i] = k
                pred[i] = p[j]
                gf = _is_gradient_free(atk, part)
                earlier = atk.parts()[:atk.parts().index(part)] if part in getattr(atk, "parts", list)() else []
                if gf and (white_box_seen or any(not _is_gradient_free(atk, q) for q in earlier)):
                    flags[i].append("black_box_win")
            robust[idx[broke]] = False
            if not atk.gradient_free:
                white_box_seen = True
            for note in res.notes:
                for j in range(idx.numel()):
                    flags[int(idx[j])].append(f"note:{atk.name}: {note}")
        if self.cross_check > 0:
            self._cross_check(model, x, y, first_broken, flags, g_cross)
        return [RobustRecord(index=int(i), probe=self.name, threat=str(self.threat), attack=self.suite,
                             broken_by=broken_by[j], step=step[j], label=int(y[j]), pred=int(pred[j]),
                             correct=bool(pred[j] == y[j]), flags=tuple(flags[j]), min_norm=min_norm[j]).to_record()
                for j, i in enumerate(indices.tolist())]

    def _cross_check(self, model, x, y, first_broken, flags, generator) -> None:
        white = [k for k, a in enumerate(self.attacks) if not a.gradient_free]
        if not white:
            return
        strongest = white[-1]
        cand = [i for i, k in enumerate(first_broken) if k is not None and k < strongest][: self.cross_check]
        if not cand:
            return
        idx = torch.tensor(cand, device=x.device)
        atk = self.attacks[strongest]
        res = atk.run(model, x[idx], y[idx], generator=child_generator(generator))
        self.threat.check(x[idx], res.x_adv)
        p = self._predict(model, res.x_adv, child_generator(generator))
        for j, i in enumerate(cand):
            if bool(p[j] == y[i]):
                flags[i].append("weaker_beats_stronger")
