"""The common evaluator: probes over a data set -> per-example records -> folded metrics.

`evaluate` runs probes through the one run loop (`bastion.runner.run_probes`: fixed chunks,
seeded randomness, resume by missing keys, shards on local processes or Ray), folds every record
kind with its registered fold (`bastion.folds`) and writes ``metrics.json`` (and the report) once.
The library and the ``bastion`` CLI call the same function, so they write the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.data import ImageDataset
from bastion.folds import FoldContext, fold_records
from bastion.records import CleanRecord, RunDir
from bastion.rng import derive_seed, make_generator, model_device  # noqa: F401  (re-exported)
from bastion.runner import Probe, RunOptions, describe_probes, run_probes  # noqa: F401  (re-exported)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Argmax predictions of a batch, (B,) int64."""
    return model(x).argmax(dim=1)


class CleanProbe:
    """Clean accuracy: one `CleanRecord` per example."""

    name = "clean"

    def describe(self) -> dict[str, Any]:
        return {"kind": "clean"}

    def run(self, model, x, y, indices, generator):
        pred = predict(model, x)
        return [CleanRecord(index=int(i), probe=self.name, label=int(t), pred=int(p), correct=bool(p == t)).to_record()
                for i, t, p in zip(indices.tolist(), y.tolist(), pred.tolist())]


def evaluate(model: Any, data: ImageDataset, probes: Sequence[Probe], run_dir: str | Path, config: dict[str, Any],
             *, opts: RunOptions | None = None, class_names: Sequence[str] | None = None, title: str | None = None,
             model_name: str | None = None, doc_title: str | None = None,
             write_reports: bool = True) -> dict[str, Any]:
    """Run ``probes`` over ``data`` into ``run_dir`` (resumable), fold the records, write
    ``metrics.json`` (+ ``report.md``/``report.html`` when ``write_reports``); returns the document.

    ``model``: an ``nn.Module``, a checkpoint path, or None when every probe carries its own model.
    ``config`` is what determines the records (stamped in the run directory: resuming with another
    config is refused); ``opts`` how they are computed (batch size and seed also determine them)."""
    from bastion.report import metrics_document, write_report

    opts = opts or RunOptions()
    run = RunDir(run_dir, config)
    records = run_probes(model, data, probes, run, opts)
    title = title or str(config.get("title") or config.get("model") or "evaluation")
    ctx = FoldContext(class_names=list(class_names or data.class_names), probes=describe_probes(probes), title=title,
                      model=model_name, data={"name": data.name, "split": data.split, "num_examples": len(data)})
    doc = metrics_document(fold_records(records, ctx), title=doc_title or f"Bastion evaluation: {title}")
    run.write_json("metrics.json", doc)
    if write_reports:
        write_report(run.path, doc)
    return doc


def section_data(doc: dict[str, Any], section_type: str) -> dict[str, Any]:
    """The ``data`` of the first section of ``section_type`` in a metrics document."""
    for sec in doc["sections"]:
        if sec.get("type") == section_type:
            return sec["data"]
    raise KeyError(f"no {section_type!r} section in the metrics document")


def evaluate_model(model: nn.Module, data: ImageDataset, probes: Sequence[Probe], run_dir: str | Path,
                   config: dict[str, Any], *, batch_size: int = 256, seed: int = 0, quiet: bool = False,
                   class_names: list[str] | None = None, model_name: str | None = None,
                   write_reports: bool = False) -> dict[str, Any]:
    """`evaluate` for a classifier; returns the robustness metrics (clean, robust per threat model,
    per class, flags)."""
    doc = evaluate(model, data, probes, run_dir, config, opts=RunOptions(batch_size=batch_size, seed=seed,
                   quiet=quiet, device=model_device(model)), class_names=class_names, model_name=model_name,
                   write_reports=write_reports)
    return section_data(doc, "robustness")
