"""Quickstart section "detection": EPS-AD (a diffusers UNet score model trained here, EPS with
K = 20 levels, the deep-kernel MMD) beside EPS-N, Gaussian MMD and Mahalanobis on the standard small
CNN, against PGD-5 at 8/255, oblivious and detector-aware adaptive. A small version of
``bastion run experiments/configs/detect_digits.toml`` (fewer score-model steps and test examples)."""

from __future__ import annotations

from typing import Any

from bastion.train import TrainConfig
from experiments.quickstart.context import QuickstartContext, train_or_load

QS_THREAT = "linf:8/255"
QS_EXAMPLES = 100


def run(ctx: QuickstartContext) -> list[dict[str, Any]]:
    """Reuse (or train) the standard model; train the score model and detectors; evaluate."""
    from detection.pipeline import DetectSettings, run_detection

    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.05, schedule="cosine", seed=ctx.seed)
    train_or_load(ctx, "standard", "small_cnn", "standard", cfg)
    s = DetectSettings(seed=ctx.seed, classifier=str(ctx.out_dir / "standard" / "model.safetensors"),
                       score_steps=200, kernel_epochs=50, attack_steps=5, threats=(QS_THREAT,),
                       test_examples=QS_EXAMPLES)
    res = run_detection(s, ctx.out_dir / "detection", device=str(ctx.device), quiet=True, write_reports=True,
                        title=f"Digits: EPS-AD and Mahalanobis vs PGD-5 at 8/255 ({QS_EXAMPLES} test examples; "
                              f"oblivious and adaptive)")
    secs = [sec for sec in res.doc["sections"] if sec["type"] == "detection"]
    for r in secs[0]["data"]["rows"]:
        if r["adaptive"] and r["detector"] != r["target"]:
            continue
        mode = f"adaptive vs {r['target']}" if r["adaptive"] else "oblivious"
        ctx.log(f"  {r['detector']:17s} {mode:26s} AUROC {r.get('auroc', float('nan')):.3f}  "
                f"det.-aware robust acc. {100 * r.get('detection_aware_robust_accuracy', 0):.0f}%")
    return secs


detection_section = run
