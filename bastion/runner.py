"""The one run loop: probes over fixed chunks of a data set -> records, resumable and shardable.

Every command that scores examples (evaluate, certify, detect, conformal, ...) runs here.

*Chunks.* A probe sees the data set in fixed chunks of consecutive positions: chunk ``c`` holds
positions ``[c, c + B)`` with ``B`` the probe's ``chunk_size`` (when it has one) or the run's
``batch_size``. Its randomness comes from a generator seeded by ``(run seed, probe name, c)``.
Chunks depend only on the data and the configuration, never on workers or on what was done.

*Resume.* The log ``records.jsonl`` holds one record per (example index, probe). A chunk with a
missing key is recomputed whole (so its randomness is the same) and only the missing records are
appended (`_missing`, the one resume filter). Records are appended and fsynced per chunk.

*Shards.* Consecutive chunks of one probe form a shard (about ``shard_size`` positions): the unit
of work handed to `bastion.parallel.run_tasks` (in this process, in local processes, or on Ray).
A worker writes each finished chunk to a part file ``parts/<probe>-<shard>.jsonl``; the driver
appends a shard's records when it returns and deletes its part file, and a restarted run first
folds part files a killed run left behind (`_fold_parts`, the one part-file merge). Records are
therefore the same for any backend, worker count or kill point.

*Models.* ``model`` is an ``nn.Module``, a checkpoint path (loaded once per worker process), or
None for probes that carry their own model (a certify setting names its base model); such probes
implement ``bind(device) -> nn.Module``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bastion.data import ImageDataset, check_images
from bastion.errors import ConfigError
from bastion.parallel import run_tasks
from bastion.progress import progress
from bastion.records import JsonlLog, Record, RecordLog, RunDir, record_key
from bastion.rng import make_generator


class Probe(Protocol):
    """A question asked of every example. ``name`` is the record key (unique within a run).

    ``run(model, x, y, indices, generator)`` gets a chunk on the model's device: ``x`` (B, C, H, W)
    in [0, 1], ``y`` (B,), ``indices`` (B,) data set indices (CPU), and a seeded generator on the
    device; it returns one record (a dict, see `bastion.records`) per example. Optional members:
    ``chunk_size`` (examples per chunk), ``bind(device)`` (the probe's own model), ``describe()``
    (a JSON-safe description handed to the folds)."""

    name: str

    def run(self, model: nn.Module | None, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
            generator: torch.Generator) -> list[Record]: ...


@dataclass
class RunOptions:
    """How a run executes. Only ``batch_size`` and ``seed`` change the records; the rest is
    execution (backend, workers, threads ...) and may differ between a run and its resume."""

    batch_size: int = 256
    seed: int = 0
    device: str | torch.device = "cpu"
    quiet: bool = False
    backend: str = "local"
    workers: int = 1
    threads: int | None = None
    address: str | None = None
    retries: int = 2
    num_gpus: float = 0.0
    shard_size: int = 256
    progress: str = "examples"

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")


@dataclass
class ShardTask:
    """One shard of one probe: what a worker needs (picklable)."""

    probe: Any
    model: Any
    seed: int
    device: str
    chunks: list[int]                      # chunk start positions (within the data set order)
    chunk: int                             # examples per chunk
    xs: torch.Tensor                       # (S, C, H, W) the shard's images, CPU
    ys: torch.Tensor                       # (S,)
    indices: torch.Tensor                  # (S,) data set indices
    offset: int                            # position of xs[0] in the data set order
    skip: frozenset[tuple[int, str]] = frozenset()
    part: str | None = None
    emit: Callable[[list[Record]], None] | None = field(default=None, repr=False)


_MODELS: dict[tuple[str, str], nn.Module] = {}


def resolve_model(spec: Any, device: str | torch.device) -> nn.Module | None:
    """An ``nn.Module`` (moved to ``device``, eval mode), a checkpoint path (loaded once per
    process and device), or None."""
    if spec is None:
        return None
    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    key = (str(spec), str(device))
    if key not in _MODELS:
        from bastion.checkpoints import load_checkpoint

        _MODELS[key] = load_checkpoint(spec, device)[0].eval()
    return _MODELS[key]


def _chunk_of(probe: Any, batch_size: int) -> int:
    size = getattr(probe, "chunk_size", None)
    return int(size) if size else int(batch_size)


def run_shard(task: ShardTask) -> list[Record]:
    """Run one probe over the chunks of one shard; returns (and emits, and writes to the part
    file) the records that were missing."""
    device = torch.device(task.device)
    bind = getattr(task.probe, "bind", None)
    model = bind(device) if bind is not None else resolve_model(task.model, device)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    part = JsonlLog(task.part) if task.part else None
    out: list[Record] = []
    try:
        for c in task.chunks:
            lo, hi = c - task.offset, min(c - task.offset + task.chunk, task.xs.shape[0])
            idx = task.indices[lo:hi]
            if all((int(i), task.probe.name) in task.skip for i in idx.tolist()):
                continue
            gen = make_generator(device, task.seed, task.probe.name, c)
            recs = task.probe.run(model, task.xs[lo:hi].to(device), task.ys[lo:hi].to(device), idx, gen)
            recs = [r for r in recs if record_key(r) not in task.skip]
            if part is not None:
                part.append(recs)
            if task.emit is not None:
                task.emit(recs)
            out += recs
    finally:
        if model is not None:
            model.train(was_training)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def _fold_parts(log: RecordLog, parts: Path, done: set[tuple[int, str]]) -> None:
    """Append what part files of a killed run hold and is not in the log yet; delete them."""
    if not parts.is_dir():
        return
    for f in sorted(parts.glob("*.jsonl")):
        _append_fresh(log, JsonlLog(f), done)
        f.unlink()


def _append_fresh(log: RecordLog, records: Any, done: set[tuple[int, str]]) -> list[Record]:
    fresh: list[Record] = []
    for r in records:
        k = record_key(r)
        if k not in done:
            done.add(k)
            fresh.append(r)
    log.append(fresh)
    return fresh


def _missing(data: ImageDataset, probe: Any, done: set[tuple[int, str]], chunk: int,
             shard_size: int) -> list[tuple[list[int], range, frozenset[tuple[int, str]]]]:
    """The resume filter: for each shard, its chunks that miss a record, its positions and the
    keys already recorded there."""
    n = len(data)
    per_shard = max(1, -(-shard_size // chunk))  # whole chunks per shard
    all_idx = data.indices.tolist()
    out = []
    for s in range(0, n, per_shard * chunk):
        positions = range(s, min(n, s + per_shard * chunk))
        keys = [(all_idx[p], probe.name) for p in positions]
        skip = frozenset(k for k in keys if k in done)
        if len(skip) == len(keys):
            continue
        chunks = [c for c in range(s, positions.stop, chunk)
                  if any(k not in skip for k in keys[c - s:c - s + chunk])]
        out.append((chunks, positions, skip))
    return out


def run_probes(model: Any, data: ImageDataset, probes: Sequence[Any], run: RunDir,
               opts: RunOptions | None = None) -> list[Record]:
    """Run every probe over ``data`` into ``run``'s log, skipping what is recorded.

    Holds the run directory's lock while it works. Returns the log's records of ``data``'s
    examples, one per (index, probe)."""
    opts = opts or RunOptions()
    check_images(data.images, f"{data.name} images")
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ConfigError(f"probe names must be unique within a run, got {names}")
    device = str(opts.device)
    with run.lock():
        log = run.records
        done = log.done_keys()
        parts = run.path / "parts"
        _fold_parts(log, parts, done)
        inline = opts.backend == "local" and opts.workers <= 1
        use_parts = not inline and not (opts.backend == "ray" and opts.address)
        tasks: list[ShardTask] = []
        todo = 0
        for probe in probes:
            chunk = _chunk_of(probe, opts.batch_size)
            for k, (chunks, positions, skip) in enumerate(_missing(data, probe, done, chunk, opts.shard_size)):
                pos = torch.arange(positions.start, positions.stop)
                todo += len(positions) - len(skip)
                tasks.append(ShardTask(
                    probe, None if getattr(probe, "bind", None) else model, opts.seed, device, chunks, chunk,
                    data.images[pos].contiguous(), data.labels[pos].contiguous(), data.indices[pos].contiguous(),
                    positions.start, skip,
                    str(parts / f"{_safe(probe.name)}-{k:05d}.jsonl") if use_parts else None))
        bar = progress(total=todo, desc=f"{len(probes)} probe(s) on {len(data)} {data.name} examples", unit="ex",
                       quiet=opts.quiet or todo == 0)

        def accept(recs: list[Record]) -> None:
            bar.update(len(_append_fresh(log, recs, done)))

        try:
            if inline:
                for t in tasks:
                    t.emit = accept
                run_tasks(run_shard, tasks, backend="local", workers=1, threads=opts.threads)
            else:
                if use_parts:
                    parts.mkdir(parents=True, exist_ok=True)

                def on_result(i: int, recs: list[Record]) -> None:
                    accept(recs)
                    if tasks[i].part:
                        Path(tasks[i].part).unlink(missing_ok=True)

                run_tasks(run_shard, tasks, backend=opts.backend, workers=opts.workers, threads=opts.threads,
                          address=opts.address, retries=opts.retries, num_gpus=opts.num_gpus, on_result=on_result)
        finally:
            bar.close()
        if parts.is_dir() and not any(parts.iterdir()):
            parts.rmdir()
        keep = {int(i) for i in data.indices.tolist()}
        return [r for r in log.unique() if int(r["index"]) in keep]


def describe_probes(probes: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """``{probe name: probe.describe()}`` for the probes that describe themselves."""
    return {p.name: p.describe() for p in probes if hasattr(p, "describe")}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0
