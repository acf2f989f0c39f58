"""The fold registry: per-example records -> the sections of ``metrics.json``.

A fold is registered for the record kinds it reads (``register_fold("robust", fn,
kinds=("clean", "robust"))``), beside the renderer of the section type it writes (see
`bastion.report.register_renderer`). `fold_records` hands each fold the typed records of its
kinds (`bastion.records.parse_record`, which also reads runs of older record schemas) and a
`FoldContext`, and collects the sections in registration order. Folds registered outside
``bastion`` (``certify`` by the certify package, ``detect`` and ``conformal`` by theirs) are
found through the ``bastion.plugins`` entry-point group (`bastion.plugins`), so reading a run never needs the caller
to import the package that wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.errors import RunError
from bastion.plugins import load_plugins
from bastion.records import BaseRecord, Record, parse_record


@dataclass
class FoldContext:
    """What a fold may know besides the records: class names, the probes' own descriptions
    (``{probe name: describe()}``), a title, the model's name, and the data set (name, split)."""

    class_names: Sequence[str]
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    title: str = "evaluation"
    model: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


Fold = Callable[[list[BaseRecord], FoldContext], list[dict[str, Any]]]


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: Fold
    kinds: tuple[str, ...]


_FOLDS: dict[str, _Entry] = {}


def register_fold(name: str, fn: Fold, kinds: Sequence[str]) -> None:
    """Register ``fn(records, ctx) -> [report section, ...]`` for records of ``kinds``."""
    _FOLDS[name] = _Entry(name, fn, tuple(kinds))


def list_folds() -> dict[str, tuple[str, ...]]:
    load_plugins()
    return {e.name: e.kinds for e in _FOLDS.values()}


def fold_records(records: Iterable[Record | BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    """Every registered fold over the records of its kinds; records of a kind no fold reads raise."""
    typed = [r if isinstance(r, BaseRecord) else parse_record(r) for r in records]
    kinds = {r.kind for r in typed}
    if kinds - {k for e in _FOLDS.values() for k in e.kinds}:
        load_plugins()
    unread = kinds - {k for e in _FOLDS.values() for k in e.kinds}
    if unread:
        raise RunError(f"no fold reads records of kind {sorted(unread)}; is the package that wrote them installed?")
    sections: list[dict[str, Any]] = []
    for e in _FOLDS.values():
        mine = [r for r in typed if r.kind in e.kinds]
        if mine:
            sections += e.fn(mine, ctx)
    return sections


def _fold_robust(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    from bastion.metrics import classification_metrics, sanity_flags
    from bastion.report import section

    metrics = classification_metrics(records, ctx.class_names)
    metrics["flags"] = sanity_flags(records)
    metrics["attacks"] = [d for d in ctx.probes.values() if d.get("kind") == "robust"]
    if ctx.model:
        metrics["model"] = ctx.model
    sections = [section("robustness", ctx.title, metrics)]
    sections += _min_norm_sections(records, ctx, metrics)
    return sections


def _min_norm_sections(records: list[BaseRecord], ctx: FoldContext, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Robust accuracy vs eps from one minimum-norm run (attacks/evaluation.py), beside the fixed-eps numbers."""
    from bastion.metrics import min_norm_curves
    from bastion.report import section

    curves = min_norm_curves(records, ctx.probes)
    if not curves:
        return []
    metrics["min_norm"] = curves
    out = []
    for norm in sorted({c["norm"] for c in curves.values()}):
        models = {f"{t} ({', '.join(c['attacks'])}; median norm {c['median_norm']:.4g})"
                  if c["median_norm"] is not None else t: c["curve"] for t, c in curves.items() if c["norm"] == norm}
        out.append(section("robustness_curves", f"{ctx.title}: robust accuracy vs {norm} eps from minimum-norm attacks",
                           {"models": models, "norm": norm}))
    return out


register_fold("robust", _fold_robust, kinds=("clean", "robust"))
