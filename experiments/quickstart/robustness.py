"""Quickstart section "robustness": a standard and a PGD-trained small CNN on digits, evaluated
clean and under the attack layer's PGD-20 (`attacks.evaluation.AttackProbe`) at two L-inf radii."""

from __future__ import annotations

from typing import Any

from attacks.evaluation import AttackProbe
from bastion.evaluate import CleanProbe, evaluate_model
from bastion.report import section
from bastion.threat import ThreatModel
from bastion.train import TrainConfig
from experiments.quickstart.context import QuickstartContext, train_or_load

QS_EPS = ("0.1", "0.2")
QS_PGD_STEPS = 20
TITLES = {"standard": "Standard small CNN", "pgd": "PGD-trained small CNN (eps 0.2, 7 steps)"}


class _Counted:
    """A probe that advances a progress bar by the examples it has just processed."""

    def __init__(self, probe: Any, bar: Any) -> None:
        self.probe, self.bar = probe, bar
        self.name = probe.name

    def run(self, model, x, y, indices, generator):
        records = self.probe.run(model, x, y, indices, generator)
        self.bar.update(len(indices))
        return records

    def __getattr__(self, item: str) -> Any:
        return getattr(self.probe, item)


def run(ctx: QuickstartContext) -> list[dict[str, Any]]:
    """Train (or reuse) both models; clean and PGD-20 accuracy at each epsilon, per class."""
    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.05, schedule="cosine", seed=ctx.seed)
    models = {
        "standard": train_or_load(ctx, "standard", "small_cnn", "standard", cfg),
        "pgd": train_or_load(ctx, "pgd", "small_cnn", "pgd", cfg, eps=0.2, steps=7, alpha=0.05),
    }
    threats = [ThreatModel("linf", e) for e in QS_EPS]
    sections, curves = [], {}
    for name, model in models.items():
        probes = [CleanProbe()] + [AttackProbe(t, ["pgd"], attack_params={"pgd": {"steps": QS_PGD_STEPS}})
                                   for t in threats]
        with ctx.progress(len(ctx.test) * len(probes), f"evaluate {name}") as bar:
            m = evaluate_model(model, ctx.test, [_Counted(p, bar) for p in probes], ctx.out_dir / name / "eval",
                               {"model": name, "eps": list(QS_EPS), "attack": f"pgd{QS_PGD_STEPS}", "seed": ctx.seed},
                               seed=ctx.seed, quiet=True)
        sections.append(section("robustness", TITLES[name], m | {"model": f"small_cnn/{name}"}))
        curves[name] = {"0": m["clean"]["accuracy"]} | {
            str(t.eps): m["robust"][str(t)]["accuracy"] for t in threats}
        ctx.log(f"  {name:9s} clean {100 * m['clean']['accuracy']:.1f}%  " + "  ".join(
            f"PGD-{QS_PGD_STEPS}@{t.eps:g} {100 * m['robust'][str(t)]['accuracy']:.1f}%" for t in threats))
    sections.insert(0, section("robustness_curves", f"Digits: accuracy vs L-inf epsilon (PGD-{QS_PGD_STEPS})",
                               {"models": curves, "norm": "linf"}))
    return sections
