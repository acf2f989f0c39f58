"""Quickstart section "conformal": provably robust conformal prediction on digits (Yan et al. 2024).

A Gaussian-noise-trained MLP (sigma 0.25); the smoothed HPS/APS scores and their PTT versions with
N = 256 Monte-Carlo draws, clean and under a SmoothAdv attack (L2 eps 0.125; a lighter attack than
the full study's: 10 steps x 16 draws); coverage and set size over 20 calibration/test splits.
The full study (RCT beside PTT, 50 splits, 20 x 64 attack) is experiments/configs/conformal_digits.toml."""

from __future__ import annotations

from typing import Any

import defenses.gaussian  # noqa: F401  (registers the "gaussian" objective)
from bastion.train import TrainConfig
from certify.conformal_eval import ConformalSettings, run_conformal
from experiments.quickstart.context import QuickstartContext, train_or_load

QS_SETTINGS = ConformalSettings(sigma=0.25, eps=0.125, n_mc=256, beta=0.001, alpha=0.1, scores=("hps", "aps"),
                                attack_noise=16, attack_steps=10, splits=20)
QS_HOLDOUT = 150


def run(ctx: QuickstartContext) -> list[dict[str, Any]]:
    """Train (or reuse) the Gaussian MLP; RSCP+ with and without PTT under SmoothAdv."""
    cfg = TrainConfig(epochs=30, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                      seed=ctx.seed)
    model = train_or_load(ctx, "conformal-gaussian-0.25", "mlp", "gaussian", cfg, sigma=0.25)
    doc = run_conformal({"gaussian": model}, ctx.test, ctx.out_dir / "conformal", QS_SETTINGS, holdout=QS_HOLDOUT,
                        seed=ctx.seed, device=str(ctx.device), quiet=ctx.bars_off, write_reports=True)
    sec = next(s for s in doc["sections"] if s["type"] == "conformal")
    for r in sec["data"]["probes"][0]["results"]:
        if r["method"] == "rscp+":
            a = r["adv"]
            ctx.log(f"  RSCP+ {r['score']:8s} attacked coverage {100 * a['coverage']['mean']:.1f}% "
                    f"(min {100 * a['coverage']['min']:.1f}%), size {a['size']['mean']:.2f}")
    return [sec]


conformal_section = run
