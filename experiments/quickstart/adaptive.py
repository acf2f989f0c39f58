"""Quickstart section "adaptive": adaptive smoothing on digits in under a minute. The quickstart's
standard and PGD small CNNs (shared with the robustness section) are mixed with a fixed alpha and
with a small mixing network (3 epochs of the ``adaptive_mixing`` objective); each model is attacked
with a short adaptive suite (composite, alpha-first, transfer, Square) and the weak suite beside it.
The full reproduction is ``bastion mix experiments/configs/adaptive_digits.toml``."""

from __future__ import annotations

from typing import Any

import defenses.mixing_training  # noqa: F401  (registers adaptive_mixing)
import defenses.pgd_at  # noqa: F401
from bastion.train import TrainConfig
from experiments.quickstart.context import QuickstartContext, train_or_load

QS_EPS, QS_EXAMPLES, QS_STEPS = 0.2, 100, 20
TAPS = {"accurate": ["net.1", "net.4"], "robust": ["net.1", "net.4"]}


def run(ctx: QuickstartContext) -> list[dict[str, Any]]:
    import torch

    import defenses.mixing_report as rep
    from attacks.mixing import adaptive_probe, weak_probe
    from bastion.checkpoints import load_checkpoint
    from bastion.evaluate import CleanProbe, evaluate, section_data
    from bastion.runner import RunOptions
    from bastion.train import create_objective, fit
    from defenses.adaptive_smoothing import MixedClassifier, mixer_for, save_mixed
    from defenses.mixing_training import bases_unchanged, freeze_check

    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.05, schedule="cosine", seed=ctx.seed)
    g = train_or_load(ctx, "standard", "small_cnn", "standard", cfg)
    h = train_or_load(ctx, "pgd", "small_cnn", "pgd", cfg, eps=0.2, steps=7, alpha=0.05)
    out = ctx.out_dir / "adaptive"
    final = out / "mixed" / "model"
    if final.with_suffix(".json").is_file():
        mixed = load_checkpoint(final, ctx.device)[0]
        unchanged = True
    else:
        torch.manual_seed(ctx.seed)
        mixed = MixedClassifier(g, h, mixer=mixer_for(g, h, TAPS, ctx.train.input_shape, (32, 64), 0),
                                taps=TAPS).to(ctx.device)
        before = freeze_check(mixed)
        obj = create_objective("adaptive_mixing", eps=QS_EPS, steps_df=5).use_pool(ctx.train.images)
        with ctx.progress(3, "train mixing network") as bar:
            from experiments.quickstart.context import EpochBar

            fit(mixed, ctx.train, obj, TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=1e-3,
                                                   weight_decay=1e-5, seed=ctx.seed),
                device=ctx.device, quiet=True, callbacks=[EpochBar(bar)])
        unchanged = bases_unchanged(mixed, before)
        card = {k: v for k, v in load_checkpoint(ctx.out_dir / "standard" / "model.safetensors")[1].items()}
        hcard = load_checkpoint(ctx.out_dir / "pgd" / "model.safetensors")[1]
        save_mixed(final, mixed.eval(), card, hcard, {"widths": [32, 64], "blocks": 0})
    data = ctx.test.every(max(1, len(ctx.test) // QS_EXAMPLES), QS_EXAMPLES)
    threat = f"linf:{QS_EPS:g}"
    full = adaptive_probe(threat, steps=QS_STEPS, weights=(0.5,), n_target_classes=3, square_queries=100,
                          seed=ctx.seed)
    weak = weak_probe(threat, steps=QS_STEPS, seed=ctx.seed)
    models = [("g (alpha=0)", "accurate", mixed.with_fixed_alpha(0.0)),
              ("h (alpha=1)", "robust", mixed.with_fixed_alpha(1.0)),
              ("alpha=0.9", "fixed", mixed.with_fixed_alpha(0.9)),
              ("mixnet b=1.3 [0.5,1]", "mixing", mixed.operating_point(b_eval=1.3, alpha_range=(0.5, 1.0)))]
    points = []
    for name, kind, model in models:
        doc = evaluate(model, data, [CleanProbe(), full, weak], out / "eval" / name.replace(" ", "_"),
                       {"model": name, "full": full.describe(), "weak": weak.describe()},
                       opts=RunOptions(batch_size=QS_EXAMPLES, seed=ctx.seed, device=ctx.device, quiet=True),
                       title=name, write_reports=False)
        p = rep.tradeoff_point(name, kind, section_data(doc, "robustness"), threat, full.suite, weak.suite)
        points.append(p)
        ctx.log(f"  {name:22s} clean {100 * p['clean']:5.1f}%  robust {100 * p['robust']:5.1f}%  "
                f"(weak suite {100 * (p['robust_weak'] or 0):5.1f}%)")
    return [rep.tradeoff_section(f"Digits: adaptive smoothing at {threat} ({len(data)} test examples, quick "
                                 f"suite of {QS_STEPS} steps)", points, threat,
                                 [f"bases bit-identical after mixing-network training: {unchanged}"])]


adaptive_section = run
