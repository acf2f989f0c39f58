"""Robust conformal prediction through the common evaluator: the conformal probe and `run_conformal`.

The probe asks, of every example, for the per-class scores a fold needs to run any conformal
method on any calibration/test split (spec rscp-plus.md, section 9):

- the unsmoothed base score at the clean input (plain split conformal);
- the Monte-Carlo smoothed score (``n_mc`` draws) and its empirical-Bernstein half-width, at the
  clean input and at the input attacked by SmoothAdv (L2 PGD on the smoothed soft classifier,
  ``attack_noise`` draws per step, all ``attack_steps`` steps run, zero start, step 2 eps / steps).

for base scores HPS and APS (and RAPS when asked) and their PTT versions. Randomness comes from
four independent child generators of the chunk's generator (`bastion.rng.child_generator`): the
APS uniforms, the clean scoring noise, the attack's noise, and *fresh* noise to score the
attacked input (never the attack's). PTT reference scores come from the holdout examples before
the run (their own generator), so the transform is fixed before any calibration.

`run_conformal` marks a seeded holdout (PTT's reference set, split ``holdout``) and a declared
calibration/test split of the rest, computes the PTT references per model, runs one probe per
model through `bastion.evaluate.evaluate`, and the ``conformal`` fold (`certify.conformal_fold`)
re-splits calibration/test many times at fold time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks.adaptive import SmoothedObjective
from attacks.objectives import ObjectiveOutput
from bastion.data import ImageDataset
from bastion.errors import ConfigError
from bastion.records import ConformalRecord, Record
from bastion.rng import child_generator, make_generator
from bastion.runner import RunOptions, resolve_model
from certify.conformal import APS, HPS, RAPS, Score, check_alpha
from certify.rscp import PTTScore, SmoothedScore, hoeffding_width, ptt_reference

import certify.conformal_fold  # noqa: F401  (registers the conformal fold and renderer)  # isort: skip

SPLITS = ("holdout", "calibration", "test")


@dataclass(frozen=True)
class ConformalSettings:
    """What the probe computes and the fold assumes (all in [0, 1] pixel units).

    sigma: smoothing std. eps: L2 attack radius (the robust margin is eps / sigma). n_mc: MC draws
    per input (N). beta: MC failure budget. alpha: target miscoverage. scores: base scores among
    hps, aps, raps. randomized: draw APS/RAPS's u. ptt: also score their PTT versions (b = 1 - alpha
    unless ptt_b is set, T = ptt_temperature). attack_noise / attack_steps: SmoothAdv draws per step
    and steps. splits: random calibration/test splits in the fold (the first is the declared one).
    holdout_in_calibration: non-PTT scores also calibrate on the holdout (the reference code's fair
    comparison). test_bound: bernstein | hoeffding (RSCP+'s test-side width). chunk: examples per
    chunk. mc_batch: inputs x draws per forward pass."""

    sigma: float = 0.25
    eps: float = 0.125
    n_mc: int = 256
    beta: float = 0.001
    alpha: float = 0.1
    scores: tuple[str, ...] = ("hps", "aps")
    randomized: bool = True
    ptt: bool = True
    ptt_b: float | None = None
    ptt_temperature: float = 1 / 400
    attack_noise: int = 64
    attack_steps: int = 20
    splits: int = 50
    split_seed: int = 0
    holdout_in_calibration: bool = True
    test_bound: str = "bernstein"
    chunk: int = 50
    mc_batch: int = 8192

    def __post_init__(self) -> None:
        for k in ("sigma", "eps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{k} must be a finite number >= 0, got {v!r}")
        if not self.sigma > 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma!r}")
        check_alpha(self.alpha)
        if not 0 < 2 * self.beta < self.alpha:
            raise ConfigError(f"beta must be in (0, alpha/2), got {self.beta!r}")
        for k in ("n_mc", "attack_noise", "attack_steps", "splits", "chunk", "mc_batch"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "n_mc" else 1):
                raise ConfigError(f"{k.replace('_', '-')} must be an integer >= {2 if k == 'n_mc' else 1}, got {v!r}")
        object.__setattr__(self, "scores", tuple(str(s).lower() for s in self.scores))
        bad = [s for s in self.scores if s not in ("hps", "aps", "raps")]
        if bad or not self.scores:
            raise ConfigError(f"unknown conformal score(s) {bad or '(none)'}: use hps, aps, raps")
        if self.test_bound not in ("bernstein", "hoeffding"):
            raise ConfigError(f"test-bound must be bernstein or hoeffding, got {self.test_bound!r}")

    @property
    def b(self) -> float:
        return 1 - self.alpha if self.ptt_b is None else float(self.ptt_b)

    def base_scores(self) -> dict[str, Score]:
        make = {"hps": HPS, "aps": lambda: APS(randomized=self.randomized),
                "raps": lambda: RAPS(randomized=self.randomized, scaled=True)}
        return {s: make[s]() for s in self.scores}

    def attack_name(self) -> str:
        return f"smoothadv@l2:{self.eps:g}"


class FullSmoothAdv(SmoothedObjective):
    """SmoothAdv's objective with success never declared, so PGD runs all its steps on every
    example (as the paper's attack does) and keeps the highest-loss iterate."""

    def __call__(self, model, x, y, target):
        out = super().__call__(model, x, y, target)
        return ObjectiveOutput(out.loss, out.logits, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))


class ConformalProbe:
    """Per-example conformal scores of one model (see the module docstring).

    model: an ``nn.Module`` or a checkpoint path (bound on the worker's device). split_of: dataset
    index -> ``holdout`` / ``calibration`` / ``test`` (default test). references: score name ->
    PTT holdout reference scores (needed when ``settings.ptt``)."""

    def __init__(self, name: str, model: Any, settings: ConformalSettings, split_of: dict[int, str],
                 references: dict[str, Sequence[float]] | None = None, model_name: str | None = None):
        self.name = name
        self.model = model
        self.settings = settings
        self.split_of = {int(k): str(v) for k, v in split_of.items()}
        self.references = {k: [float(v) for v in r] for k, r in (references or {}).items()}
        self.model_name = model_name or (model if isinstance(model, str) else type(model).__name__)
        self.chunk_size = settings.chunk
        missing = sorted(set(settings.scores) - set(self.references))
        if settings.ptt and missing:
            raise ConfigError(f"PTT needs holdout reference scores for {missing}; pass references= or set ptt=False")

    def scores(self) -> dict[str, Score]:
        base = self.settings.base_scores()
        out: dict[str, Score] = dict(base)
        if self.settings.ptt:
            for k, s in base.items():
                out[f"ptt-{k}"] = PTTScore(s, self.references[k], self.settings.b, self.settings.ptt_temperature)
        return out

    def describe(self) -> dict[str, Any]:
        s = self.settings
        counts = {k: sum(v == k for v in self.split_of.values()) for k in SPLITS}
        return {"kind": "conformal", "name": self.name, "model": str(self.model_name), **asdict(s),
                "scores": list(self.scores()), "ptt_b": s.b, "attack": s.attack_name(),
                "hoeffding_width": hoeffding_width(s.n_mc, s.beta), "declared": counts}

    def bind(self, device: torch.device) -> nn.Module:
        return resolve_model(self.model, device)

    def run(self, model, x, y, indices, generator) -> list[Record]:
        from attacks import create_attack

        s = self.settings
        idx, ys = indices.tolist(), y.tolist()
        gen_u, gen_clean, gen_attack, gen_adv = (child_generator(generator) for _ in range(4))
        scores = self.scores()
        randomized = any(sc.randomized for sc in scores.values())
        u = torch.rand(len(idx), generator=gen_u, device=gen_u.device, dtype=torch.float64) if randomized else None
        smoothed = SmoothedScore(model, scores, s.sigma, s.n_mc, s.mc_batch)
        with torch.no_grad():
            probs = torch.softmax(model(x).double(), dim=-1)
            base = {k: sc.from_probs(probs, u) for k, sc in scores.items()}
        clean = smoothed(x, gen_clean, u)
        splits = [self.split_of.get(int(i), "test") for i in idx]
        attacked = torch.tensor([sp != "holdout" for sp in splits], dtype=torch.bool)
        adv = None
        if s.eps > 0 and bool(attacked.any()):
            m = attacked.to(x.device)
            atk = create_attack("smoothadv", f"l2:{s.eps!r}", sigma=s.sigma, num_noise=s.attack_noise,
                                steps=s.attack_steps, objective=FullSmoothAdv(s.sigma, s.attack_noise))
            x_adv = atk.run(model, x[m], y[m], generator=gen_attack).x_adv
            adv = smoothed(x_adv, gen_adv, None if u is None else u[attacked.to(u.device)])
        pred = clean.probs.argmax(dim=1).tolist()
        out, j = [], 0
        for r, (i, t) in enumerate(zip(idx, ys)):
            rec: dict[str, Any] = {
                "index": int(i), "probe": self.name, "label": int(t), "pred": int(pred[r]), "correct": pred[r] == t,
                "split": splits[r], "sigma": s.sigma, "n_mc": s.n_mc,
                "scores": {k: v[r].tolist() for k, v in base.items()},
                "mean": {k: v[r].tolist() for k, v in clean.mean.items()},
                "bound": {k: clean.bound(k, s.n_mc, s.beta)[r].tolist() for k in scores}}
            if adv is not None and bool(attacked[r]):
                rec |= {"attack": s.attack_name(), "adv_pred": int(adv.probs[j].argmax()),
                        "adv_mean": {k: v[j].tolist() for k, v in adv.mean.items()},
                        "adv_bound": {k: adv.bound(k, s.n_mc, s.beta)[j].tolist() for k in scores}}
                j += 1
            out.append(ConformalRecord(**rec).to_record())
        return out


# ---------------------------------------------------------------------------------------------
# One call: holdout, declared split, PTT references, the evaluator
# ---------------------------------------------------------------------------------------------

@dataclass
class ConformalPlan:
    """Where each example goes: ``split_of`` (dataset index -> split) and the holdout positions."""

    split_of: dict[int, str] = field(default_factory=dict)
    holdout: list[int] = field(default_factory=list)


def plan_splits(data: ImageDataset, holdout: int, seed: int = 0, calibration_fraction: float = 0.5) -> ConformalPlan:
    """A seeded permutation: the first ``holdout`` examples are PTT's holdout, the next
    ``calibration_fraction`` of the rest the declared calibration set, the remainder test."""
    n = len(data)
    if not 0 <= holdout < n - 1:
        raise ConfigError(f"holdout must be in [0, {n - 2}] for {n} examples, got {holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    ids = data.indices.tolist()
    n_cal = int(round((n - holdout) * calibration_fraction))
    plan = ConformalPlan()
    for k, pos in enumerate(perm):
        plan.split_of[int(ids[pos])] = "holdout" if k < holdout else "calibration" if k < holdout + n_cal else "test"
    plan.holdout = sorted(perm[:holdout])
    return plan


def references_for(model: nn.Module, data: ImageDataset, plan: ConformalPlan, settings: ConformalSettings,
                   seed: int, name: str) -> dict[str, list[float]]:
    """PTT reference scores per base score from the holdout (one draw each; their own generator)."""
    if not settings.ptt:
        return {}
    if not plan.holdout:
        raise ConfigError("PTT needs a holdout set (holdout > 0), or turn PTT off")
    from bastion.rng import model_device

    dev = model_device(model)
    hold = data.subset(plan.holdout)
    x, y = hold.images.to(dev), hold.labels.to(dev)
    was = model.training
    model.eval()
    try:
        return {k: ptt_reference(model, sc, x, y, settings.sigma, make_generator(dev, seed, "ptt", name, k)).tolist()
                for k, sc in settings.base_scores().items()}
    finally:
        model.train(was)


def run_conformal(models: dict[str, Any], data: ImageDataset, out_dir: str | Path, settings: ConformalSettings, *,
                  holdout: int = 150, seed: int = 0, device: str | torch.device = "cpu",
                  config: dict[str, Any] | None = None, opts: RunOptions | None = None, title: str | None = None,
                  quiet: bool = True, write_reports: bool = True) -> dict[str, Any]:
    """Robust conformal evaluation of ``models`` (name -> ``nn.Module`` or checkpoint path) on
    ``data`` into ``out_dir`` (resumable). Returns the metrics document (``conformal`` section)."""
    from bastion.evaluate import evaluate

    if not models:
        raise ConfigError("no models to evaluate: give at least one")
    plan = plan_splits(data, holdout, seed)
    probes = []
    for name, spec in models.items():
        model = resolve_model(spec, device)
        refs = references_for(model, data, plan, settings, seed, name)
        probes.append(ConformalProbe(name, spec, settings, plan.split_of, refs,
                                     model_name=spec if isinstance(spec, str) else name))
    cfg = dict(config) if config is not None else {
        "settings": asdict(settings), "holdout": holdout, "seed": seed, "models": sorted(models),
        "data": {"name": data.name, "split": data.split, "indices": data.indices.tolist()}}
    opts = opts or RunOptions(batch_size=settings.chunk, seed=seed, device=device, quiet=quiet,
                              shard_size=max(settings.chunk, 100))
    title = title or (f"Robust conformal prediction on {data.name}: alpha={settings.alpha}, eps={settings.eps:g}, "
                      f"sigma={settings.sigma:g}, N={settings.n_mc}, beta={settings.beta:g}")
    return evaluate(None, data, probes, out_dir, cfg, opts=opts, title=title,
                    doc_title=f"Bastion conformal: {data.name}", write_reports=write_reports)
