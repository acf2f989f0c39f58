"""``autoattack-native``: AutoAttack's standard protocol on Bastion's own engines, for ablations.

APGD-CE (100 iterations) -> APGD-T (100 iterations, 9 target classes, DLR) -> FAB-T -> Square
(5,000 queries, p_init 0.8), AutoAttack's settings, each run only on the examples still robust
and each with per-example early exit (the native engines stop attacking an example as soon as it
breaks). APGD-CE, APGD-T, FAB-T (``fab-t``, 100 iterations, 9 target classes; an example leaves
the search once it is broken within eps) and Square (L-inf, L2) are native. Randomness comes from the attack's
generator, so numbers agree with pyautoattack in distribution, not example by example: use the
``autoattack`` adapter for leaderboard numbers, this one where AutoAttack-grade numbers are
needed fast.

    atk = create_attack("autoattack-native", "linf:8/255")
    res = atk.run(model, x, y)          # res.broken_by names the part that broke each example
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import Attack, AttackConfig, AttackResult, child_generator, create_attack, register_attack
from bastion.errors import ConfigError

PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass(frozen=True)
class NativeSuiteConfig(AttackConfig):
    """``parts``: which of apgd-ce, apgd-t, fab-t, square to run (in AutoAttack's order);
    ``steps``: APGD/FAB iterations (100); ``n_target_classes`` (9); ``n_queries``: Square (5000)."""

    parts: tuple[str, ...] = PARTS
    n_target_classes: int = 9
    n_queries: int = 5000

    def __post_init__(self) -> None:
        parts = self.parts
        if isinstance(parts, str):
            parts = [p.strip() for p in parts.replace("+", ",").split(",") if p.strip()]
        object.__setattr__(self, "parts", tuple(p for p in PARTS if p in parts))
        super().__post_init__()
        bad = [p for p in parts if p not in PARTS]
        if bad or not self.parts:
            raise ConfigError(f"autoattack-native parts must be among {', '.join(PARTS)}, got {list(parts)}")
        if self.threat.norm not in ("linf", "l2"):
            raise ConfigError(f"autoattack-native supports linf and l2, not {self.threat.norm}")


class AutoAttackNative(Attack):
    """AutoAttack's standard protocol (APGD-CE, APGD-T, FAB-T, Square) on the native engines."""

    config_class = NativeSuiteConfig
    supports_targeted = False
    cost_rank = 85
    gradient_free_parts = ("square",)

    def parts(self) -> list[str]:
        return list(self.config.parts)

    def _part(self, name: str) -> Attack:
        cfg = self.config
        steps = int(cfg.steps or 100)
        common = dict(seed=cfg.seed, restarts=int(cfg.restarts or 1), progress=False)
        if name == "apgd-ce":
            return create_attack("apgd-ce", cfg.threat, steps=steps, **common)
        if name == "apgd-t":
            return create_attack("apgd-t", cfg.threat, steps=steps, n_target_classes=cfg.n_target_classes, **common)
        if name == "square":
            return create_attack("square", cfg.threat, n_queries=cfg.n_queries, **common)
        if name == "fab-t":
            return create_attack("fab-t", cfg.threat, steps=steps, n_target_classes=cfg.n_target_classes,
                                 stop_within_eps=True, **common)
        extra = {"n_queries": cfg.n_queries} if name == "square" else {"steps": steps,
                                                                         "n_target_classes": cfg.n_target_classes}
        return create_attack("autoattack", cfg.threat, version="custom", attacks=(name,), seed=cfg.seed,
                             restarts=int(cfg.restarts or 1), progress=False, **extra)

    def _run(self, model, x, y, y_target, generator):
        from bastion.progress import progress

        n = x.shape[0]
        with torch.no_grad():
            wrong = model(x).argmax(1) != y
        x_adv = x.clone()
        success = wrong.clone()
        step = torch.full((n,), -1, dtype=torch.long, device=x.device)
        step[wrong] = 0
        by: list[str | None] = [None] * n
        notes: list[str] = []
        for name in progress(self.parts(), desc=self.name, unit="attack", quiet=not self.config.progress):
            idx = (~success).nonzero().flatten()
            if idx.numel() == 0:
                break
            res = self._part(name).run(model, x[idx], y[idx], generator=child_generator(generator))
            notes += [m for m in res.notes if m not in notes]
            with torch.no_grad():
                broke = res.success & (model(res.x_adv).argmax(1) != y[idx])
            pos = idx[broke]
            x_adv[pos] = res.x_adv[broke].to(x.dtype)
            success[pos] = True
            step[pos] = res.step[broke]
            for p in pos.tolist():
                by[p] = name
        return AttackResult(x_adv, success, step, broken_by=by, notes=notes)


register_attack("autoattack-native", AutoAttackNative,
                doc="AutoAttack's standard protocol on native engines (APGD-CE, APGD-T, FAB-T, Square).")
