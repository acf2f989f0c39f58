"""Certification runs: records, TSV logs, resume, shards and metrics.

A run directory holds, for every setting (a base model and a sigma):

- ``records.jsonl`` — one record per certified example (``probe`` = the setting's name), appended
  as produced; the resume point;
- ``certify-<setting>.tsv`` — the reference CERTIFY log (spec section 5), flushed per row while the
  run goes and rewritten sorted by index at the end (``predict-<setting>.tsv`` for PREDICT);
- ``parts/`` — per-shard part files written by worker processes (folded into the log on completion
  or at the next start, so a killed multi-worker run loses nothing it had flushed);
- ``metrics.json`` (a ``certification`` section), ``report.md``, ``report.html``.

Examples are split into fixed shards of ``shard_size`` positions and each shard into fixed chunks
(`certify.smoothing.chunk_size`) whose noise shares forward passes. Both depend only on the
configuration, and a resumed run recomputes whole chunks that miss a record and appends only
the missing ones, so a killed-and-resumed run, a 1-worker run and an N-worker (or Ray) run end
with the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.data import ImageDataset, check_images
from bastion.errors import ConfigError
from bastion.parallel import run_tasks, shard_ranges
from bastion.records import JsonlLog, Record, RunDir
from certify.analysis import default_max_radius, envelope, fold_rows, table_radii
from certify.logs import CERTIFY_HEADER, PREDICT_HEADER, TsvLog, certify_line, format_radius, predict_line
from certify.smoothing import Sequential, Smooth, chunk_size

TASKS = ("certify", "predict")


@dataclass
class Setting:
    """One smoothed classifier: ``model`` is a checkpoint path or an ``nn.Module``."""

    name: str
    model: Any
    sigma: float
    num_classes: int


@dataclass
class CertifyOptions:
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000
    seed: int = 0
    task: str = "certify"
    sequential: bool = False
    seq_start: int = 1000
    max_radius: float | None = None      # largest reported radius (curve max; sequential stop radius)
    autocast: str | None = None
    shard_size: int = 100
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}: use certify or predict")
        if self.n0 < 1 or self.n < 1 or self.batch < 1 or self.shard_size < 1:
            raise ConfigError("n0, n, batch and shard_size must be >= 1")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.max_radius is not None and self.max_radius <= 0:
            raise ConfigError(f"max radius must be > 0, got {self.max_radius}")


@dataclass
class ShardTask:
    setting: Setting
    opts: CertifyOptions
    max_radius: float
    indices: list[int]
    xs: torch.Tensor
    ys: torch.Tensor
    skip: frozenset[int] = frozenset()
    part: str | None = None
    emit: Callable[[list[Record]], None] | None = field(default=None, repr=False)


_MODELS: dict[tuple[str, str], nn.Module] = {}


def _load_model(spec: Any, device: str) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    key = (str(spec), str(device))
    if key not in _MODELS:
        from bastion.checkpoints import load_checkpoint

        _MODELS[key] = load_checkpoint(spec, device)[0]
    return _MODELS[key]


def certificate_record(setting: Setting, cert, label: int) -> Record:
    return {"index": cert.index, "probe": setting.name, "kind": "certify", "sigma": setting.sigma,
            "label": int(label), "predict": cert.prediction, "radius": cert.radius,
            "radius_logged": format_radius(cert.radius), "correct": int(cert.prediction == int(label)),
            "p_lower": cert.p_lower, "c_a": cert.c_a, "n_a": cert.n_a, "n0": cert.n0, "n": cert.n,
            "samples": cert.samples, "looks": cert.looks, "stopped": cert.stopped, "time_s": cert.time_s}


def prediction_record(setting: Setting, pred, label: int) -> Record:
    return {"index": pred.index, "probe": setting.name, "kind": "predict", "sigma": setting.sigma,
            "label": int(label), "predict": pred.prediction, "correct": int(pred.prediction == int(label)),
            "pvalue": pred.pvalue, "n1": pred.n1, "n2": pred.n2, "n": pred.n, "samples": pred.n,
            "time_s": pred.time_s}


def run_shard(task: ShardTask) -> list[Record]:
    """Certify (or predict) one shard, chunk by chunk; returns the new records."""
    o, s = task.opts, task.setting
    model = _load_model(s.model, o.device)
    smooth = Smooth(model, s.num_classes, s.sigma, seed=o.seed, autocast=o.autocast)
    seq = (Sequential(stop_radius=task.max_radius, start=o.seq_start, radii=tuple(table_radii(task.max_radius)))
           if o.sequential else None)
    m = chunk_size(o.n0 if o.task == "certify" else 0, o.n, o.batch)
    part = JsonlLog(task.part) if task.part else None
    out: list[Record] = []
    for c in range(0, len(task.indices), m):
        idx = task.indices[c:c + m]
        if all(i in task.skip for i in idx):
            continue
        xs, ys = task.xs[c:c + m], task.ys[c:c + m].tolist()
        if o.task == "certify":
            res = smooth.certify_many(xs, idx, o.n0, o.n, o.alpha, o.batch, sequential=seq)
            recs = [certificate_record(s, r, y) for r, y in zip(res, ys)]
        else:
            res = smooth.predict_many(xs, idx, o.n, o.alpha, o.batch)
            recs = [prediction_record(s, r, y) for r, y in zip(res, ys)]
        recs = [r for r in recs if r["index"] not in task.skip]
        if part is not None:
            part.append(recs)
        if task.emit is not None:
            task.emit(recs)
        out += recs
    return out


def _tsv_line(r: Record) -> str:
    if r["kind"] == "certify":
        return certify_line(r["index"], r["label"], r["predict"], r["radius"], r["time_s"])
    return predict_line(r["index"], r["label"], r["predict"], r["time_s"])


def log_path(out: Path, setting: Setting, task: str) -> Path:
    return out / f"{task}-{setting.name}.tsv"


def run_certification(settings: Sequence[Setting], data: ImageDataset, out_dir: str | Path, opts: CertifyOptions,
                      *, config: dict[str, Any] | None = None, backend: str = "local", workers: int = 1,
                      threads: int | None = None, address: str | None = None, retries: int = 2,
                      num_gpus: float = 0.0, quiet: bool = False, title: str | None = None,
                      write_reports: bool = True) -> dict[str, Any]:
    """Certify every example of ``data`` under every setting into ``out_dir`` (resumable, shardable).

    Returns the metrics document (also written to ``out_dir/metrics.json``)."""
    from tqdm.auto import tqdm

    if not settings:
        raise ConfigError("no settings to certify: give at least one model and sigma")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"setting names must be unique, got {names}")
    check_images(data.images, f"{data.name} images")
    out = Path(out_dir)
    cfg = dict(config) if config is not None else {
        "task": opts.task, "n0": opts.n0, "n": opts.n, "alpha": opts.alpha, "batch": opts.batch,
        "seed": opts.seed, "sequential": opts.sequential, "seq_start": opts.seq_start,
        "max_radius": opts.max_radius, "autocast": opts.autocast, "shard_size": opts.shard_size,
        "settings": [{"name": s.name, "sigma": s.sigma, "model": str(s.model) if not isinstance(s.model, nn.Module)
                      else type(s.model).__name__} for s in settings],
        "data": {"name": data.name, "split": data.split, "indices": data.indices.tolist()}}
    run = RunDir(out, cfg)
    log = run.records
    max_radius = opts.max_radius or default_max_radius([s.sigma for s in settings])
    header = CERTIFY_HEADER if opts.task == "certify" else PREDICT_HEADER

    # fold part files left by workers of a killed run, then rebuild the TSV logs from the records
    parts = out / "parts"
    done = log.done_keys()
    for f in sorted(parts.glob("*.jsonl")) if parts.is_dir() else []:
        fresh = [r for r in JsonlLog(f) if (int(r["index"]), str(r["probe"])) not in done]
        log.append(fresh)
        done.update((int(r["index"]), str(r["probe"])) for r in fresh)
        f.unlink()
    records = log.read()
    tsvs = {s.name: TsvLog(log_path(out, s, opts.task), header) for s in settings}
    for s in settings:
        tsvs[s.name].rewrite([_tsv_line(r) for r in sorted((r for r in records if r["probe"] == s.name),
                                                           key=lambda r: int(r["index"]))])

    def accept(recs: list[Record]) -> int:
        fresh = [r for r in recs if (int(r["index"]), str(r["probe"])) not in done]
        log.append(fresh)
        for r in fresh:
            done.add((int(r["index"]), str(r["probe"])))
            tsvs[r["probe"]].append(_tsv_line(r))
        bar.update(len(fresh))
        return len(fresh)

    tasks: list[ShardTask] = []
    inline = backend == "local" and workers <= 1
    todo = 0
    all_idx = data.indices.tolist()
    for s in settings:
        for k, rng in enumerate(shard_ranges(len(data), opts.shard_size)):
            idx = [all_idx[p] for p in rng]
            skip = frozenset(i for i in idx if (i, s.name) in done)
            if len(skip) == len(idx):
                continue
            todo += len(idx) - len(skip)
            pos = torch.tensor(list(rng), dtype=torch.int64)
            part = None if inline or (backend == "ray" and address) else str(parts / f"{s.name}-{k:05d}.jsonl")
            tasks.append(ShardTask(s, opts, max_radius, idx, data.images[pos].contiguous(),
                                   data.labels[pos].contiguous(), skip, part))
    bar = tqdm(total=todo, desc=f"{opts.task} ({len(settings)} setting(s))", disable=quiet or todo == 0,
               unit="ex")
    t0 = time.perf_counter()
    try:
        if inline:
            for t in tasks:
                t.emit = accept
            run_tasks(run_shard, tasks, backend="local", workers=1, threads=threads)
        else:
            def on_result(i: int, recs: list[Record]) -> None:
                accept(recs)
                if tasks[i].part:
                    Path(tasks[i].part).unlink(missing_ok=True)

            run_tasks(run_shard, tasks, backend=backend, workers=workers, threads=threads, address=address,
                      retries=retries, num_gpus=num_gpus, on_result=on_result)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    return finalize(out, settings, data, opts, max_radius, title=title, wall_s=wall, write_reports=write_reports)


def finalize(out: Path, settings: Sequence[Setting], data: ImageDataset, opts: CertifyOptions, max_radius: float,
             *, title: str | None = None, wall_s: float | None = None, write_reports: bool = True) -> dict[str, Any]:
    """Merge: sort the TSV logs by index, fold the records into metrics, write the report."""
    from bastion.report import metrics_document, section, write_report

    run = RunDir(out)
    keep = set(data.indices.tolist())
    records = [r for r in run.records.read() if int(r["index"]) in keep]
    header = CERTIFY_HEADER if opts.task == "certify" else PREDICT_HEADER
    folded = []
    for s in settings:
        rows = sorted((r for r in records if r["probe"] == s.name), key=lambda r: int(r["index"]))
        TsvLog(log_path(out, s, opts.task), header).rewrite([_tsv_line(r) for r in rows])
        folded.append(setting_metrics(s, rows, opts, max_radius))
    data_ = {"task": opts.task, "mode": "sequential" if opts.sequential else "exact", "n0": opts.n0, "n": opts.n,
             "alpha": opts.alpha, "batch": opts.batch, "dataset": data.name, "split": data.split,
             "max_radius": max_radius, "settings": folded, "envelope": envelope(folded) if opts.task == "certify"
             else None, "wall_time_s": wall_s, "autocast": opts.autocast}
    title = title or (f"Randomized smoothing: {opts.task} on {data.name} ({data_['mode']} mode, n={opts.n}, "
                      f"alpha={opts.alpha})")
    doc = metrics_document([section("certification", title, data_)], title=f"Bastion certification: {data.name}")
    run.write_json("metrics.json", doc)
    if write_reports:
        import certify.report  # noqa: F401  (registers the renderer)

        write_report(out, doc)
    return doc


def setting_metrics(s: Setting, rows: list[Record], opts: CertifyOptions, max_radius: float) -> dict[str, Any]:
    base = {"name": s.name, "sigma": s.sigma,
            "model": str(s.model) if not isinstance(s.model, nn.Module) else type(s.model).__name__}
    if opts.task == "predict":
        m = len(rows)
        return base | {"num_examples": m,
                       "accuracy": sum(int(r["correct"]) for r in rows) / m if m else 0.0,
                       "abstention_rate": sum(int(r["predict"]) == -1 for r in rows) / m if m else 0.0,
                       "mean_time_s": sum(r["time_s"] for r in rows) / m if m else None}
    folded = fold_rows([{"label": r["label"], "predict": r["predict"], "radius": r["radius"], "time": r["time_s"],
                         "samples": r["samples"]} for r in rows], sigma=s.sigma, alpha=opts.alpha,
                       max_radius=max_radius, radii=table_radii(max_radius))
    stops: dict[str, int] = {}
    for r in rows:
        stops[r.get("stopped", "final")] = stops.get(r.get("stopped", "final"), 0) + 1
    return base | folded | {"stopped": stops}
