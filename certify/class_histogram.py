"""The ``predicted_classes`` fold: a predicted-class histogram per certify/predict setting, with a
flag on any model whose most frequent class takes more than half of its (non-abstained)
predictions. A collapsed base classifier (one class everywhere) is certified by CERTIFY at the
largest radius for that class, so its certified accuracy equals the class frequency at every radius
and nothing else in the report shows it (consistency-smoothing spec, section 9, lesson 2).
Registered by `certify.folds` right after the ``certify`` fold, so every certify run has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bastion.folds import FoldContext, register_fold
from bastion.records import BaseRecord, parse_record
from bastion.report import md_table, register_renderer, section

COLLAPSE_SHARE = 0.5


def predicted_class_histogram(records: Sequence[Any], num_classes: int) -> dict[str, Any]:
    """Counts of each predicted class (``abstain`` apart) and the largest share among predictions."""
    preds = [parse_record(r).pred if isinstance(r, dict) else r.pred for r in records]
    counts = [sum(p == c for p in preds) for c in range(num_classes)]
    answered = sum(counts)
    top = int(np.argmax(counts)) if answered else None
    share = counts[top] / answered if answered else 0.0
    return {"counts": counts, "abstain": sum(p == -1 for p in preds), "top_class": top, "top_share": share,
            "collapsed": share > COLLAPSE_SHARE}



def fold_predicted_classes(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    k = len(ctx.class_names) or (max(r.label for r in records) + 1)
    by: dict[str, list[BaseRecord]] = {}
    for r in records:
        by.setdefault(r.probe, []).append(r)
    rows = [{"name": n, **predicted_class_histogram(rs, k)} for n, rs in by.items()]
    return [section("predicted_classes", "Predicted classes per setting (flag: one class > 50%)",
                    {"class_names": list(ctx.class_names), "settings": rows,
                     "collapsed": [r["name"] for r in rows if r["collapsed"]]})]


def render_predicted_classes(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    body = [[r["name"], " ".join(map(str, r["counts"])), r["abstain"],
             f"{100 * r['top_share']:.0f}% (class {r['top_class']})", "COLLAPSED" if r["collapsed"] else "ok"]
            for r in d["settings"]]
    md = [md_table(["setting", "counts per class", "abstain", "top share", "flag"], body)]
    if d["collapsed"]:
        md += ["", f"**Collapsed base classifier(s): {', '.join(d['collapsed'])}** - certified accuracy equals the "
                   f"frequency of one class; do not read it as robustness."]
    return "\n".join(md), []


def register_predicted_classes() -> None:
    """Register the fold and its renderer (called by `certify.folds` after the certify fold)."""
    register_fold("predicted_classes", fold_predicted_classes, kinds=("certify", "predict"))
    register_renderer("predicted_classes", render_predicted_classes)
