"""``bastion quickstart``: the main job on the embedded digits data, section by section.

Each section is ``fn(ctx) -> list[report section]``; sections train what they need into
``ctx.out_dir/<name>/`` (resumable: finished models are reused) and the sections are gathered
into one ``metrics.json`` / ``report.md`` / ``report.html`` at ``ctx.out_dir``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.checkpoints import load_checkpoint, make_card, save_checkpoint
from bastion.data import ImageDataset, load_dataset
from bastion.evaluate import CleanProbe, PGDProbe, evaluate_model
from bastion.models import create_model
from bastion.report import section
from bastion.threat import ThreatModel
from bastion.train import TrainConfig, create_objective, fit


@dataclass
class QuickstartContext:
    out_dir: Path
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False
    train: ImageDataset = field(default=None)  # type: ignore[assignment]
    test: ImageDataset = field(default=None)  # type: ignore[assignment]
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = load_dataset("digits", "train", seed=self.seed)
        if self.test is None:
            self.test = load_dataset("digits", "test", seed=self.seed)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)


def train_or_load(ctx: QuickstartContext, name: str, arch: str, objective: str, cfg: TrainConfig,
                  data: ImageDataset | None = None, **objective_params: Any) -> torch.nn.Module:
    """Train ``arch`` with ``objective`` into ctx.out_dir/name (resuming), or load the finished model."""
    data = data or ctx.train
    run_dir = ctx.out_dir / name
    final = run_dir / "model.safetensors"
    if final.is_file():
        return load_checkpoint(final, ctx.device)[0]
    c, h, _ = data.input_shape
    torch.manual_seed(cfg.seed)
    model = create_model(arch, data.num_classes, c, h).to(ctx.device)
    obj = create_objective(objective, **objective_params)
    card = make_card(model, arch, data.num_classes, data.input_shape, class_names=data.class_names,
                     dataset=data.name, seed=cfg.seed)
    res = fit(model, data, obj, cfg, run_dir=run_dir, device=ctx.device, quiet=True, checkpoint_card=card)
    card["recipe"] = obj.config()
    save_checkpoint(final.with_suffix(""), res.model, card)
    return res.model


# --- section: standard vs PGD adversarial training --------------------------------------------

QS_EPS = ("0.1", "0.2")


def robustness_section(ctx: QuickstartContext) -> list[dict[str, Any]]:
    """Train a standard and a PGD-trained small CNN; evaluate clean + PGD-20 at two epsilons."""
    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.05, schedule="cosine", seed=ctx.seed)
    models = {
        "standard": train_or_load(ctx, "standard", "small_cnn", "standard", cfg),
        "pgd": train_or_load(ctx, "pgd", "small_cnn", "pgd", cfg, eps=0.2, steps=7, alpha=0.05),
    }
    threats = [ThreatModel("linf", e) for e in QS_EPS]
    sections, curves = [], {}
    for name, model in models.items():
        probes = [CleanProbe()] + [PGDProbe(t, steps=20) for t in threats]
        m = evaluate_model(model, ctx.test, probes, ctx.out_dir / name / "eval",
                           {"model": name, "eps": list(QS_EPS), "seed": ctx.seed}, seed=ctx.seed, quiet=True)
        title = {"standard": "Standard small CNN", "pgd": "PGD-trained small CNN (eps 0.2, 7 steps)"}[name]
        sections.append(section("robustness", title, m | {"model": f"small_cnn/{name}"}))
        curves[name] = {"0": m["clean"]["accuracy"]} | {
            str(t.eps): m["robust"][str(t)]["accuracy"] for t in threats}
        ctx.log(f"  {name:9s} clean {100 * m['clean']['accuracy']:.1f}%  " + "  ".join(
            f"PGD-20@{t.eps:g} {100 * m['robust'][str(t)]['accuracy']:.1f}%" for t in threats))
    sections.insert(0, section("robustness_curves", "Digits: accuracy vs L-inf epsilon (PGD-20)",
                               {"models": curves, "norm": "linf"}))
    return sections


Section = Callable[[QuickstartContext], list[dict[str, Any]]]
SECTIONS: list[tuple[str, Section]] = [
    ("robustness", robustness_section),
]

from experiments.quickstart_aaer import aaer_section  # noqa: E402

SECTIONS.append(("aaer", aaer_section))

from experiments.quickstart_certify import certification_section  # noqa: E402

SECTIONS.append(("certification", certification_section))


def run_quickstart(ctx: QuickstartContext, only: list[str] | None = None) -> dict[str, Any]:
    from bastion.report import metrics_document, write_report

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[dict[str, Any]] = []
    for name, fn in SECTIONS:
        if only and name not in only:
            continue
        ctx.log(f"[quickstart] {name} ...")
        t0 = time.perf_counter()
        sections += fn(ctx)
        ctx.timings[name] = time.perf_counter() - t0
        ctx.log(f"[quickstart] {name} done in {ctx.timings[name]:.1f} s")
    doc = metrics_document(sections, title="Bastion quickstart (digits)")
    doc["timings_seconds"] = ctx.timings
    import json

    (ctx.out_dir / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    write_report(ctx.out_dir, doc)
    return doc
