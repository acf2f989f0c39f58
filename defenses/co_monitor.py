"""Catastrophic-overfitting (CO) monitor: a `bastion.train.Callback` that evaluates the model on
a fixed held-out set (never trained on; eval mode) every epoch and, optionally, every k
iterations: clean, FGSM (zero init, step eps) and PGD-k (step eps/4, one uniform random start)
accuracy, plus the held-out FGSM AAE fraction (examples whose loss the FGSM step lowered) and the
training-time AAE statistics of the epoch. Results are merged into the epoch record of
``train_log.jsonl`` (``val_clean``, ``val_fgsm``, ``val_pgd``, ``val_aae_frac``, ``aae_frac``,
``v_gap``, ``gate_open_frac``, ``co``, ``co_event``); iteration checks go to ``monitor.jsonl``.

CO detector (spec section 7), evaluated on the sequence of checks so far:
``pgd_t < drop * max_{s<=t} pgd_s  and  fgsm_t - pgd_t > gap  and  max_{s<=t} pgd_s >= min_peak``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks import create_attack
from bastion import distributed
from bastion.data import ImageDataset
from bastion.errors import ConfigError
from bastion.records import JsonlLog
from bastion.rng import make_generator, model_device
from bastion.threat import ThreatModel, parse_eps
from bastion.train import Callback, StepContext, StopTraining
from defenses.single_step import SingleStepObjective, epoch_summary

CO_DROP = 0.5
CO_GAP = 0.3
CO_MIN_PEAK = 0.1


def co_flags(pgd: Sequence[float], fgsm: Sequence[float], drop: float = CO_DROP, gap: float = CO_GAP,
             min_peak: float = CO_MIN_PEAK) -> list[bool]:
    """Per check t: is the model catastrophically overfitted at t (spec section 7 detector)?"""
    if len(pgd) != len(fgsm):
        raise ConfigError(f"co_flags needs equally long curves, got {len(pgd)} PGD and {len(fgsm)} FGSM values")
    flags, peak = [], float("-inf")
    for p, f in zip(pgd, fgsm):
        peak = max(peak, p)
        flags.append(bool(p < drop * peak and f - p > gap and peak >= min_peak))
    return flags


def first_co(flags: Sequence[bool]) -> int | None:
    """Index of the first flagged check, or None."""
    return next((i for i, f in enumerate(flags) if f), None)


@torch.no_grad()
def _predict_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = model(x)
    return z.argmax(1) == y, F.cross_entropy(z, y, reduction="none")


def evaluate_co(model: nn.Module, data: ImageDataset, eps: float, pgd_steps: int = 20, pgd_alpha: float | None = None,
                batch_size: int = 500, generator_parts: tuple = (0,)) -> dict[str, float]:
    """Clean / FGSM / PGD-k accuracy and the FGSM AAE fraction of ``model`` (in eval mode) on ``data``.

    FGSM (zero init, step eps) and PGD-k (step ``pgd_alpha``, default eps/4, one uniform random
    start from a generator seeded by ``generator_parts`` and the chunk) are the attack layer's
    native attacks: an example counts as broken when the attack finds an adversarial point
    anywhere on its path. The AAE fraction uses the training objectives' own FGSM step
    (`SingleStepObjective.perturb`): examples whose CE the step lowered, over all examples."""
    device = model_device(model)
    threat = ThreatModel("linf", eps)
    alpha = pgd_alpha if pgd_alpha is not None else eps / 4
    fgsm_attack = create_attack("fgsm", threat)
    pgd_attack = create_attack("pgd", threat, steps=pgd_steps, step_size=alpha, random_start=True)
    step = SingleStepObjective(eps, step=1.0, noise=0.0, clip=True, name="co_monitor_fgsm")
    was_training = model.training
    model.eval()
    n = len(data)
    clean = fgsm = pgd = aae = 0
    try:
        for c, start in enumerate(range(0, n, batch_size)):
            if c % distributed.world_size() != distributed.rank():  # under torchrun: chunks split over ranks
                continue
            x = data.images[start:start + batch_size].to(device)
            y = data.labels[start:start + batch_size].to(device)
            ok, _ = _predict_loss(model, x, y)
            clean += int(ok.sum())
            with torch.enable_grad():
                _, l0, delta = step.perturb(model, x, y, None)
            _, l_f = _predict_loss(model, x + delta, y)
            aae += int((l_f < l0).sum())
            gen = make_generator(device, *generator_parts, c)
            ok_f, _ = _predict_loss(model, fgsm_attack(model, x, y), y)
            fgsm += int(ok_f.sum())
            ok_p, _ = _predict_loss(model, pgd_attack(model, x, y, generator=gen), y)
            pgd += int(ok_p.sum())
    finally:
        model.train(was_training)
    clean, fgsm, pgd, aae = (int(v) for v in distributed.all_reduce_sum(torch.tensor([clean, fgsm, pgd, aae])))
    return {"val_clean": clean / n, "val_fgsm": fgsm / n, "val_pgd": pgd / n, "val_aae_frac": aae / n}


class COMonitor(Callback):
    """Per-epoch (and every ``every`` iterations when > 0) CO monitoring on ``data``.

    co_stop: stop training (after the current epoch) the first time the detector fires.
    run_dir: the run directory of `fit` (needed to resume the detector's history and to write
    ``monitor.jsonl`` for iteration checks). Attach it to objectives whose ``co_monitor_eps`` is
    set (`bastion.train.co_monitor_eps`), at that radius."""

    progress_keys = ("val_clean", "val_pgd", "val_fgsm", "co")

    def __init__(self, data: ImageDataset, eps: float | str, *, pgd_steps: int = 20, pgd_alpha: float | None = None,
                 every: int = 0, every_examples: int | None = None, co_stop: bool = False, seed: int = 0,
                 run_dir: str | Path | None = None, quiet: bool = True, batch_size: int = 500,
                 drop: float = CO_DROP, gap: float = CO_GAP, min_peak: float = CO_MIN_PEAK):
        if len(data) == 0:
            raise ConfigError("the CO monitor needs a non-empty held-out set")
        self.data = data
        self.eps = parse_eps(eps)
        if pgd_steps < 1 or every < 0:
            raise ConfigError("CO monitor: pgd_steps must be >= 1 and every >= 0")
        self.pgd_steps, self.pgd_alpha = pgd_steps, pgd_alpha
        self.every = int(every)
        self.iter_data = data if every_examples is None else data.subset(slice(0, every_examples))
        self.co_stop = co_stop
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.batch_size = batch_size
        self.drop, self.gap, self.min_peak = drop, gap, min_peak
        self.history: list[dict[str, Any]] = []   # epoch checks
        self.points: list[dict[str, Any]] = []    # iteration checks
        self._loaded = False

    # -- resume --------------------------------------------------------------------------------
    def _load(self, epoch: int) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.run_dir is None:
            return
        log = self.run_dir / "train_log.jsonl"
        if log.is_file():
            self.history = [r for r in JsonlLog(log) if r.get("epoch", -1) < epoch and "val_pgd" in r]
        mlog = JsonlLog(self.run_dir / "monitor.jsonl")
        self.points = [r for r in mlog if r.get("epoch", -1) < epoch]
        if distributed.is_main():
            mlog.rewrite(self.points)

    def _flags(self, rows: list[dict[str, Any]]) -> list[bool]:
        return co_flags([r["val_pgd"] for r in rows], [r["val_fgsm"] for r in rows], self.drop, self.gap,
                        self.min_peak)

    def _warn(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    # -- hooks ---------------------------------------------------------------------------------
    def on_batch_end(self, model: nn.Module, ctx: StepContext, stats: dict[str, float]) -> dict | None:
        if not self.every or (ctx.iteration + 1) % self.every:
            return None
        self._load(ctx.epoch)
        m = evaluate_co(model, self.iter_data, self.eps, self.pgd_steps, self.pgd_alpha, self.batch_size,
                        (self.seed, "co_monitor_iter", ctx.iteration))
        row = {"epoch": ctx.epoch, "iteration": ctx.iteration, **m, "aae_frac": stats.get("aae_frac"),
               "v_gap": stats.get("v_gap") if stats.get("mixed") else None}
        rows = self.points + [row]
        row["co"] = self._flags(rows)[-1]
        if row["co"] and not any(p.get("co") for p in self.points):
            row["co_event"] = (f"CATASTROPHIC OVERFITTING at iteration {ctx.iteration + 1}: PGD {m['val_pgd']:.3f} "
                               f"vs FGSM {m['val_fgsm']:.3f}")
            self._warn(row["co_event"])
        self.points.append(row)
        if self.run_dir is not None and distributed.is_main():
            JsonlLog(self.run_dir / "monitor.jsonl").append([row])
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> dict | None:
        self._load(epoch)
        m = evaluate_co(model, self.data, self.eps, self.pgd_steps, self.pgd_alpha, self.batch_size,
                        (self.seed, "co_monitor", epoch))
        summ = epoch_summary(record)
        extra: dict[str, Any] = {**m, "aae_frac": summ["aae_frac"], "v_gap": summ["v_gap"],
                                 "gate_open_frac": summ["gate_open_frac"]}
        rows = self.history + [{**record, **extra}]
        flags = self._flags(rows)
        extra["co"] = flags[-1]
        prior = first_co(flags[:-1])
        if flags[-1] and prior is None:
            extra["co_event"] = (f"CATASTROPHIC OVERFITTING detected at epoch {epoch + 1}: PGD-{self.pgd_steps} "
                                 f"{m['val_pgd']:.3f} < {self.drop:g} x peak {max(r['val_pgd'] for r in rows):.3f}, "
                                 f"FGSM {m['val_fgsm']:.3f}")
            self._warn(extra["co_event"])
        extra["co_first_epoch"] = (first_co(flags) if first_co(flags) is None else rows[first_co(flags)]["epoch"])
        record.update(extra)
        self.history.append(dict(record))
        if self.co_stop and flags[-1]:
            raise StopTraining(f"stopped on catastrophic overfitting at epoch {epoch + 1}")
        return extra
