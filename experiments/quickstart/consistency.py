"""Quickstart section "consistency": rRCM consistency-model smoothing vs Gaussian augmentation and
diffusion denoised smoothing on digits, one seed, sigma 0.25, a small certified subset (under a
minute on one CPU thread). The full comparison (3 seeds, two sigmas, ablations) is
``bastion smoothing-compare experiments/configs/consistency_digits.toml``."""

from __future__ import annotations

from typing import Any

from defenses.consistency_compare import config_from_dict, run_comparison
from experiments.quickstart.context import QuickstartContext

QS_CONFIG: dict[str, Any] = {
    "dataset": "digits", "seeds": [0], "sigmas": [0.25], "methods": ["gaussian", "denoised", "rrcm"],
    "encoder": {"kind": "mlp"}, "bootstrap": 200,
    "pretrain": {"steps": 100, "batch": 256, "lr": 1e-3, "ema_end": 0.999},
    "finetune": {"epochs": 10, "batch": 128, "lr": 1e-3, "lam": 10.0},
    "baselines": {"match_compute": True, "lr": 1e-3},
    "denoiser": {"match_compute": True, "t_max": 400}, "classifier": {"arch": "mlp", "epochs": 10},
    "certify": {"n0": 100, "n": 500, "alpha": 0.001, "skip": 9, "batch": 500, "max_radius": 1.0}}


def run(ctx: QuickstartContext) -> list[dict[str, Any]]:
    """Train the three base classifiers (compute-matched), certify them, return the comparison section."""
    cfg = config_from_dict({**QS_CONFIG, "seeds": [ctx.seed], "device": str(ctx.device)})
    sec = run_comparison(cfg, ctx.out_dir / "consistency", quiet=True)
    d = sec["data"]
    for r in d["rows"]:
        table = "  ".join(f"r={x:g}: {100 * a:.0f}%" for x, a in zip(d["radii"], r["certified_accuracy"]))
        ctx.log(f"  {r['method']:10s} sigma {r['sigma']:g}  {table}  ACR {r['acr']:.3f}")
    if d.get("cost_ratio"):
        ctx.log(f"  denoised / rRCM inference cost per noise sample: {d['cost_ratio']['wall_ratio']:.1f}x wall, "
                f"{d['cost_ratio']['flops_ratio']:.1f}x FLOPs")
    return [sec]


consistency_section = run
