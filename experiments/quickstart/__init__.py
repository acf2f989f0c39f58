"""``bastion quickstart``: the main job on the embedded digits data, section by section.

Each section is a module of this package with ``run(ctx) -> list[report section]``; it trains
what it needs into ``ctx.out_dir/<name>/`` (resumable: finished models are reused) and the
sections are gathered into one ``metrics.json`` / ``report.md`` / ``report.html`` at
``ctx.out_dir``. To add a section, write ``experiments/quickstart/<name>.py`` and list it in
`SECTIONS`. This module imports no torch, so ``bastion --help`` can list the sections.
"""

from __future__ import annotations

import importlib
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.quickstart.context import QuickstartContext

# (name, module) in report order; each module defines ``run(ctx) -> list[dict]``
SECTIONS: list[tuple[str, str]] = [
    ("robustness", "experiments.quickstart.robustness"),
    ("aaer", "experiments.quickstart.aaer"),
    ("certification", "experiments.quickstart.certification"),
    ("conformal", "experiments.quickstart.conformal"),
    ("detection", "experiments.quickstart.detection"),
    ("adaptive", "experiments.quickstart.adaptive"),
    ("consistency", "experiments.quickstart.consistency"),
]


def section_names() -> list[str]:
    return [name for name, _ in SECTIONS]


def run_quickstart(ctx: QuickstartContext, only: list[str] | None = None) -> dict[str, Any]:
    """Run the sections (all, or those named in ``only``) and write the combined report."""
    from bastion.report import metrics_document, write_report

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[dict[str, Any]] = []
    for name, module in SECTIONS:
        if only and name not in only:
            continue
        ctx.log(f"[quickstart] {name} ...")
        t0 = time.perf_counter()
        sections += importlib.import_module(module).run(ctx)
        ctx.timings[name] = time.perf_counter() - t0
        ctx.log(f"[quickstart] {name} done in {ctx.timings[name]:.1f} s")
    doc = metrics_document(sections, title="Bastion quickstart (digits)")
    doc["timings_seconds"] = ctx.timings
    doc["environment"] = ctx.environment()
    (ctx.out_dir / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    write_report(ctx.out_dir, doc)
    return doc
