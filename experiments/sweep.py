"""Ablation sweeps: one `bastion` command over a grid of its options, one run directory per cell.

    name = "co_digits"
    command = "train"                 # any runnable command (train, evaluate, certify, conformal, ...)
    [base]                            # that command's options for every cell (TOML keys as in `bastion run`)
    dataset = "digits"
    [grid]                            # cartesian product over any keys; seeds are an axis like any other
    seed = [0, 1, 2]
    [[zip]]                           # keys that vary together (one axis named `axis`, values labelled)
    axis = "method"
    labels = ["fgsm", "n_fgsm"]
    objective = ["fgsm", "n_fgsm"]
    [summary]
    metrics = ["final_pgd", "co"]     # default: every scalar the command's metrics give
    [[expect]]                        # claims checked after the runs (exit status 1 on a miss)
    where = { method = "fgsm" }
    metric = "co"
    mean_min = 0.8

Cells run through `bastion.parallel.run_tasks` (in this process, local processes or Ray). A
finished cell (``cell.json`` with the cell's digest) is reused; a killed cell is rerun with the
same command, which resumes its own run directory. The summary groups cells by every axis but
``seed``: mean, sample standard deviation, min and max over seeds, and one plot per metric.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError

TOP_KEYS = ("name", "description", "command", "base", "grid", "zip", "summary", "expect")
SUMMARY_KEYS = ("metrics", "group_by")
EXPECT_KEYS = ("where", "metric", "mean_min", "mean_max")
SEED = "seed"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its axis values (labels) and the command's options."""

    name: str
    axes: dict[str, Any]
    options: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    name: str
    command: str
    cells: tuple[Cell, ...]
    axes: tuple[str, ...]
    metrics: tuple[str, ...] | None
    expect: tuple[dict[str, Any], ...]
    description: str = ""


@dataclass
class CellTask:
    """What a worker needs to run one cell (picklable)."""

    command: str
    options: dict[str, Any]
    out: str
    digest: str
    device: str
    threads: int | None


def _label(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(_label(x) for x in v) or "none"
    if isinstance(v, dict):
        return "+".join(f"{k}={_label(x)}" for k, x in v.items()) or "none"
    return str(v)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text)[:120]


def parse_sweep(cfg: dict[str, Any], where: str) -> Sweep:
    """Expand a sweep config into its cells (grid axes first, in file order, then zip axes)."""
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(TOP_KEYS)}")
    for key in ("name", "command"):
        if not isinstance(cfg.get(key), str) or not cfg[key]:
            raise ConfigError(f"sweep config {where} needs {key} = \"...\"")
    base = dict(cfg.get("base", {}))
    grid = dict(cfg.get("grid", {}))
    zips = cfg.get("zip", [])
    zips = [zips] if isinstance(zips, dict) else list(zips)
    axes: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []   # axis -> [(label, options)]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key} in {where} must be a non-empty list of values")
        axes.append((key, [(_label(v), {key: v}) for v in values]))
    for k, z in enumerate(zips):
        z = dict(z)
        axis = z.pop("axis", None) or f"zip{k + 1}"
        labels = z.pop("labels", None)
        lists = {key: v for key, v in z.items()}
        lengths = {len(v) for v in lists.values() if isinstance(v, list)}
        if not lists or any(not isinstance(v, list) for v in lists.values()) or len(lengths) != 1:
            raise ConfigError(f"[[zip]] #{k + 1} ({axis}) in {where}: every key needs a list, all of the same length")
        n = lengths.pop()
        labels = labels or [_label(v) for v in next(iter(lists.values()))]
        if len(labels) != n:
            raise ConfigError(f"[[zip]] {axis} in {where}: {len(labels)} labels for {n} values")
        axes.append((axis, [(str(labels[i]), {key: v[i] for key, v in lists.items()}) for i in range(n)]))
    names = [a for a, _ in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep {where} has the axis {names} twice")
    swept = [k for _, vals in axes for k in vals[0][1]]
    clash = sorted(set(swept) & set(base)) + sorted({k for k in swept if swept.count(k) > 1})
    if clash:
        raise ConfigError(f"sweep {where}: key(s) {sorted(set(clash))} are set in [base] and swept, or swept twice")
    if "out" in base or "out" in swept:
        raise ConfigError(f"sweep {where}: drop 'out' (each cell runs in OUT/cells/<cell>)")
    cells = []
    for combo in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
        opts = dict(base)
        labels: dict[str, Any] = {}
        for (axis, _), (label, o) in zip(axes, combo):
            opts.update(o)
            labels[axis] = label
        name = "_".join(f"{a}-{_safe(v)}" for a, v in labels.items()) or "cell"
        cells.append(Cell(name, labels, opts))
    summary = dict(cfg.get("summary", {}))
    bad = sorted(set(summary) - set(SUMMARY_KEYS))
    if bad:
        raise ConfigError(f"unknown [summary] key(s) {bad} in {where}; known: {', '.join(SUMMARY_KEYS)}")
    expect = cfg.get("expect", [])
    expect = [expect] if isinstance(expect, dict) else list(expect)
    for e in expect:
        bad = sorted(set(e) - set(EXPECT_KEYS))
        if bad or "metric" not in e or not ({"mean_min", "mean_max"} & set(e)):
            raise ConfigError(f"[[expect]] in {where} needs metric and mean_min or mean_max (and may have where); "
                              f"unexpected {bad}")
        for axis in e.get("where", {}):
            if axis not in names:
                raise ConfigError(f"[[expect]] in {where}: 'where' names {axis!r}, not an axis ({names})")
    metrics = summary.get("metrics")
    return Sweep(cfg["name"], cfg["command"], tuple(cells), tuple(names), tuple(metrics) if metrics else None,
                 tuple(expect), str(cfg.get("description", "")))


def read_sweep(path: str | Path) -> Sweep:
    from experiments.config import read_toml

    return parse_sweep(read_toml(path), repr(str(path)))


def check_cells(sweep: Sweep) -> None:
    """Every cell's options must parse for the command (before any cell runs)."""
    from experiments.cli import build_parser
    from experiments.commands.run import runnable
    from experiments.config import namespace_from_config

    _, commands = build_parser()
    if sweep.command not in runnable(commands) or sweep.command == "sweep":
        raise ConfigError(f"sweep command {sweep.command!r}: use one of "
                          f"{', '.join(c for c in runnable(commands) if c != 'sweep')}")
    for c in sweep.cells:
        namespace_from_config(commands[sweep.command], c.options, f"sweep cell {c.name!r}")


# --- one cell --------------------------------------------------------------------------------

def run_cell(task: CellTask) -> dict[str, Any]:
    """Run one cell's command into ``task.out`` (resuming it) and return its metrics."""
    from experiments.cli import build_parser
    from experiments.config import namespace_from_config

    out = Path(task.out)
    done = out / "cell.json"
    if done.is_file():
        d = json.loads(done.read_text(encoding="utf-8"))
        if d.get("digest") == task.digest:
            return d["metrics"]
    _, commands = build_parser()
    ns = namespace_from_config(commands[task.command], task.options, f"sweep cell {out.name!r}")
    ns.out, ns.quiet, ns.device = str(out), True, task.device
    if task.threads is not None:
        ns.threads = task.threads
    if hasattr(ns, "workers"):
        ns.workers = 1
    rc = ns.func(ns)
    if rc:
        raise ConfigError(f"sweep cell {out.name!r}: `bastion {task.command}` exited with status {rc}")
    metrics = cell_metrics(task.command, out)
    tmp = done.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"digest": task.digest, "command": task.command, "options": task.options,
                               "metrics": metrics}, indent=1, sort_keys=True, default=str), encoding="utf-8")
    tmp.replace(done)
    return metrics


def _scalars(d: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, dict) and depth < 3:
        for k, v in d.items():
            out |= _scalars(v, f"{prefix}{k}." if prefix or depth else f"{k}.", depth + 1)
    elif isinstance(d, bool):
        out[prefix.rstrip(".")] = float(d)
    elif isinstance(d, (int, float)) and math.isfinite(d):
        out[prefix.rstrip(".")] = float(d)
    return out


def cell_metrics(command: str, out: Path) -> dict[str, float | None]:
    """Scalar metrics of a finished cell, named per command (train: `run_summary` of its history;
    evaluate: clean and robust accuracy; certify: per setting ACR, abstention, certified accuracy;
    others: the scalars of every section)."""
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    secs = doc.get("sections", [])
    if command == "train":
        from defenses.training_report import run_summary

        hist = next((s["data"]["history"] for s in secs if s.get("type") == "training"), [])
        s = run_summary(hist)
        m: dict[str, float | None] = {k: (float(v) if v is not None else None) for k, v in s.items()
                                      if isinstance(v, (int, float, bool)) or v is None}
        last = hist[-1] if hist else {}
        for k in ("train_loss", "train_acc", "val_clean", "val_fgsm", "val_pgd"):
            if isinstance(last.get(k), (int, float)):
                m.setdefault(k, float(last[k]))
        return m
    if command == "evaluate":
        d = next(s["data"] for s in secs if s.get("type") == "robustness")
        m = {"clean": d["clean"]["accuracy"]}
        m |= {f"robust@{t}": b["accuracy"] for t, b in d["robust"].items()}
        return m
    if command == "certify":
        d = next(s["data"] for s in secs if s.get("type") == "certification")
        m = {}
        for s in d["settings"]:
            p = s["name"]
            m |= {f"{p}.acr": s.get("acr"), f"{p}.abstention": s.get("abstention_rate")}
            m |= {f"{p}.cert@{r:g}": a for r, a in zip(s.get("radii", []), s.get("certified_accuracy", []))}
        return m
    m = {}
    for s in secs:
        m |= _scalars(s.get("data", {}), f"{s.get('type')}.")
    return m


# --- the whole sweep -------------------------------------------------------------------------

def run_sweep(sweep: Sweep, out: str | Path, *, device: str = "cpu", backend: str = "local", workers: int = 1,
              threads: int | None = None, address: str | None = None, retries: int = 2, num_gpus: float = 0.0,
              only: set[str] | None = None, log=print) -> dict[str, Any]:
    """Run every cell (or the cells named in ``only``) and write the summary; returns it."""
    from bastion.parallel import run_tasks
    from bastion.records import config_digest

    check_cells(sweep)
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = [c for c in sweep.cells if only is None or c.name in only]
    if only is not None and len(cells) != len(only):
        raise ConfigError(f"unknown cell(s) {sorted(only - {c.name for c in sweep.cells})}; cells are named like "
                          f"{sweep.cells[0].name!r}")
    tasks = [CellTask(sweep.command, c.options, str(out / "cells" / c.name),
                      config_digest({"command": sweep.command, "options": c.options}), device, threads)
             for c in cells]
    results: dict[str, dict[str, Any]] = {}

    def on_result(i: int, metrics: dict[str, Any]) -> None:
        results[cells[i].name] = metrics
        log(f"[sweep] {cells[i].name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in list(metrics.items())[:6]))

    run_tasks(run_cell, tasks, backend=backend, workers=workers, threads=threads, address=address,
              retries=retries, num_gpus=num_gpus, on_result=on_result)
    rows = [{"cell": c.name, "axes": c.axes, "metrics": results[c.name]} for c in cells]
    summary = summarize(sweep, rows)
    write_outputs(sweep, summary, out)
    return summary


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def summarize(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Group cells by every axis but seed; mean, sample std, min, max and n per metric."""
    names = list(sweep.metrics) if sweep.metrics else sorted({k for r in rows for k in r["metrics"]})
    group_axes = [a for a in sweep.axes if a != SEED]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    seed_order = (lambda r: float(r["axes"][SEED])) if SEED in sweep.axes else (lambda r: 0.0)
    for r in sorted(rows, key=seed_order):   # values listed in seed order
        groups.setdefault(tuple(r["axes"][a] for a in group_axes), []).append(r)
    out = []
    for key, rs in groups.items():
        stats = {}
        for m in names:
            vals = [float(r["metrics"][m]) for r in rs if r["metrics"].get(m) is not None]
            if not vals:
                stats[m] = {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": []}
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            stats[m] = {"n": len(vals), "mean": mean, "std": std, "min": min(vals), "max": max(vals), "values": vals}
        out.append({"axes": dict(zip(group_axes, key)), "cells": [r["cell"] for r in rs], "stats": stats})
    checks = check_expectations(sweep, rows)
    return {"name": sweep.name, "command": sweep.command, "description": sweep.description, "axes": list(sweep.axes),
            "group_axes": group_axes, "metrics": names, "cells": rows, "groups": out,
            "expect": [{"what": w, "met": ok} for w, ok in checks]}


def check_expectations(sweep: Sweep, rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Each ``[[expect]]``: the mean of ``metric`` over the matching cells against mean_min/mean_max
    (cells not run are skipped, so a partial sweep is checked on what it ran)."""
    checks = []
    for e in sweep.expect:
        where = {k: str(v) for k, v in e.get("where", {}).items()}
        vals = [float(r["metrics"][e["metric"]]) for r in rows
                if all(r["axes"].get(k) == v for k, v in where.items()) and r["metrics"].get(e["metric"]) is not None]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        cond = " and ".join(f"{'>=' if k == 'mean_min' else '<='} {e[k]:g}" for k in ("mean_min", "mean_max")
                            if k in e)
        ok = ("mean_min" not in e or mean >= e["mean_min"] - 1e-12) and \
             ("mean_max" not in e or mean <= e["mean_max"] + 1e-12)
        sel = ", ".join(f"{k}={v}" for k, v in where.items()) or "all cells"
        checks.append((f"{e['metric']} over {sel}: mean {mean:.3g} of {len(vals)} cell(s) {cond}", ok))
    return checks


def summary_markdown(summary: dict[str, Any]) -> str:
    from bastion.report import md_table

    names = summary["metrics"]
    ga = summary["group_axes"]
    lines = [f"# Sweep {summary['name']} (`bastion {summary['command']}`)", ""]
    if summary.get("description"):
        lines += [summary["description"].strip(), ""]
    lines += ["Mean ± sample standard deviation over seeds (min–max), per group:", ""]
    rows = []
    for g in summary["groups"]:
        cells = [g["axes"][a] for a in ga] + [len(g["cells"])]
        for m in names:
            s = g["stats"][m]
            cells.append("–" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f} "
                         f"({s['min']:.3f}–{s['max']:.3f})")
        rows.append(cells)
    lines.append(md_table(ga + ["cells"] + names, rows))
    if SEED in summary["axes"]:
        lines += ["", "Values per group, in seed order:", ""]
        lines.append(md_table(ga + names, [[g["axes"][a] for a in ga]
                                           + [" ".join(f"{v:.3g}" for v in g["stats"][m]["values"]) for m in names]
                                           for g in summary["groups"]]))
    lines += ["", "Per cell:", ""]
    lines.append(md_table(summary["axes"] + names, [[r["axes"][a] for a in summary["axes"]]
                                                     + [_fmt(r["metrics"].get(m)) for m in names]
                                                     for r in summary["cells"]]))
    if summary["expect"]:
        lines += ["", md_table(["expectation", "met"], [[e["what"], "yes" if e["met"] else "NO"]
                                                        for e in summary["expect"]])]
    return "\n".join(lines) + "\n"


def render_sweep(sec: dict[str, Any]) -> tuple[str, list]:
    """Report renderer: the summary tables and, per metric, mean ± std per group (seeds as dots)."""
    from bastion.report import pyplot

    s = sec["data"]
    md = summary_markdown(s).split("\n", 2)[2]
    figs = []
    plt = pyplot()
    for m in s["metrics"][:8]:
        groups = [g for g in s["groups"] if g["stats"][m]["mean"] is not None]
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) + 2), 3.2))
        labels = [", ".join(str(v) for v in g["axes"].values()) or "all" for g in groups]
        xs = range(len(groups))
        ax.bar(xs, [g["stats"][m]["mean"] for g in groups], yerr=[g["stats"][m]["std"] for g in groups],
               color="#4a78b5", alpha=0.6, capsize=3)
        for x, g in zip(xs, groups):
            ax.plot([x] * len(g["stats"][m]["values"]), g["stats"][m]["values"], "k.", ms=4)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(m)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        figs.append((f"{m}: mean ± std per group, one dot per seed", fig))
    return md, figs


def write_outputs(sweep: Sweep, summary: dict[str, Any], out: Path) -> None:
    from bastion.report import metrics_document, section, write_report

    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    doc = metrics_document([section("sweep", f"Sweep {sweep.name}", summary)], title=f"Bastion sweep: {sweep.name}")
    (out / "metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    write_report(out, doc)


def _register() -> None:
    from bastion.report import register_renderer

    register_renderer("sweep", render_sweep)


_register()
