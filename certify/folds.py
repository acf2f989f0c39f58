"""The ``certify`` fold: CERTIFY / PREDICT records -> the ``certification`` section.

Per setting (probe): certified accuracy at the table radii and on a fine grid, its
high-probability variant, ACR, abstention, time and samples per example, how sequential runs
stopped; across settings the envelope (best over sigma). Run options (alpha, mode, n0, n, ...)
(and the table's ``radii``, default `table_radii(max_radius)`) come from the probes'
descriptions; for runs read back without them (an older run directory),
from the records, with Cohen et al.'s defaults where a record does not say.
"""

from __future__ import annotations

from typing import Any

from bastion.folds import FoldContext, register_fold
from bastion.records import BaseRecord
from bastion.report import section
from certify.analysis import default_max_radius, envelope, fold_rows, table_radii
from certify.class_histogram import register_predicted_classes

import certify.report  # noqa: F401  (registers the certification renderer)  # isort: skip


def setting_metrics(name: str, rows: list[BaseRecord], desc: dict[str, Any], alpha: float,
                    max_radius: float, radii: list[float]) -> dict[str, Any]:
    """The metrics of one setting from its records (sorted by index)."""
    sigma = desc.get("sigma", rows[0].sigma if rows else None)
    base = {"name": name, "sigma": sigma, "model": desc.get("model")}
    m = len(rows)
    if desc.get("task", rows[0].kind if rows else "certify") == "predict":
        times = [r.time_s for r in rows if r.time_s is not None]
        return base | {"num_examples": m,
                       "accuracy": sum(r.correct for r in rows) / m if m else 0.0,
                       "abstention_rate": sum(r.pred == -1 for r in rows) / m if m else 0.0,
                       "mean_time_s": sum(times) / len(times) if times else None}
    folded = fold_rows([{"label": r.label, "predict": r.pred, "radius": r.radius, "time": r.time_s,
                         "samples": r.samples} for r in rows], sigma=sigma, alpha=alpha,
                       max_radius=max_radius, radii=radii)
    stops: dict[str, int] = {}
    for r in rows:
        stops[r.stopped] = stops.get(r.stopped, 0) + 1
    return base | folded | {"stopped": stops}


def fold_certify(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    by_probe: dict[str, list[BaseRecord]] = {}
    for r in records:
        by_probe.setdefault(r.probe, []).append(r)
    described = [n for n, d in ctx.probes.items() if d.get("kind") in ("certify", "predict")]
    order = [n for n in described if n in by_probe] + sorted(n for n in by_probe if n not in described)
    descs = {n: ctx.probes.get(n, {}) for n in order}
    first = next((d for d in descs.values() if d), {})
    sigmas = [descs[n].get("sigma", by_probe[n][0].sigma) for n in order]
    max_radius = float(first.get("max_radius") or default_max_radius(sigmas))
    alpha = float(first.get("alpha", 0.001))
    task = first.get("task", records[0].kind)
    radii = [float(r) for r in first.get("radii") or table_radii(max_radius)]   # a probe may set its table
    settings = [setting_metrics(n, sorted(by_probe[n], key=lambda r: r.index), descs[n], alpha, max_radius, radii)
                for n in order]
    any_rec = records[0]
    data = {"task": task, "mode": first.get("mode", "exact"), "n0": first.get("n0", getattr(any_rec, "n0", None)),
            "n": first.get("n", any_rec.n), "alpha": alpha, "batch": first.get("batch"),
            "dataset": ctx.data.get("name"), "split": ctx.data.get("split"), "max_radius": max_radius,
            "settings": settings, "envelope": envelope(settings) if task == "certify" else None,
            "autocast": first.get("autocast")}
    return [section("certification", ctx.title, data)]


register_fold("certify", fold_certify, kinds=("certify", "predict"))
register_predicted_classes()  # after the certify fold: the certification section stays first
