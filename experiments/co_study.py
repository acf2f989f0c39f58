"""Catastrophic-overfitting study: several single-step objectives x seeds, each trained by
`bastion.train.fit` with the `defenses.co_monitor.COMonitor` callback, from one TOML config
(see experiments/configs/co_study_*.toml).

The study is a sweep: `study_to_sweep` turns a study config into the equivalent `bastion sweep`
config (objectives zipped with their parameters x seeds, one `bastion train` run per cell, the
``[expect]`` claims as ``[[expect]]`` mean checks), and experiments/configs/sweep_co_digits.toml is
co_study_digits.toml written that way. Run it with one command:

    bastion sweep experiments/configs/sweep_co_digits.toml --workers 2

or ``python -m experiments.co_study CONFIG --sweep --out DIR``. The runner below is kept so
earlier study directories (results.json) still resume and merge.

    python -m experiments.co_study experiments/configs/co_study_digits.toml --out runs/co_study_digits

Writes OUT/<method>_s<seed>/ (fit's run directory: train_log.jsonl, checkpoints), OUT/results.json
(per run: summary + per-epoch curves), OUT/summary.md, OUT/metrics.json (one ``training`` report
section per method, seeds side by side) and OUT/report.md / report.html / fig_*.png. Resumable:
finished runs are read back, an interrupted one resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bastion.data import ImageDataset, load_dataset
from bastion.errors import BastionError, ConfigError
from bastion.models import create_model
from bastion.train import TrainConfig, create_objective, fit

KEYS = ("name", "dataset", "data_root", "image_size", "model", "model_kwargs", "eps", "seeds", "train", "monitor",
        "methods", "train_examples", "test_examples", "threads", "description", "expect")
MONITOR_KEYS = ("pgd_steps", "every", "every_examples", "co_stop", "pgd_alpha")
CURVE_KEYS = ("epoch", "train_loss", "train_acc", "val_clean", "val_fgsm", "val_pgd", "val_aae_frac", "aae_frac",
              "v_gap", "gate_open_frac", "co", "co_event", "train_reg", "train_mixed", "train_v_a", "train_v_n",
              "epoch_seconds", "stopped", "train_aae_frac", "train_reg_grad")


def read_config(path: str | Path) -> dict[str, Any]:
    from experiments.config import read_toml

    cfg = read_toml(path)
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {str(path)!r}; known keys: {', '.join(KEYS)}")
    for key in ("dataset", "model", "eps", "methods", "train"):
        if key not in cfg:
            raise ConfigError(f"study config {str(path)!r} lacks the key {key!r}")
    bad = sorted(set(cfg.get("monitor", {})) - set(MONITOR_KEYS))
    if bad:
        raise ConfigError(f"unknown [monitor] key(s) {bad} in {str(path)!r}; known: {', '.join(MONITOR_KEYS)}")
    for name, m in cfg["methods"].items():
        extra = sorted(set(m) - {"objective", "params", "train"})
        if extra or "objective" not in m:
            raise ConfigError(f"[methods.{name}] in {str(path)!r} needs 'objective' and may have 'params', 'train'; "
                              f"unexpected {extra}")
    return cfg


def load_data(cfg: dict[str, Any]) -> tuple[ImageDataset, ImageDataset]:
    kw = {"image_size": cfg.get("image_size")}
    train = load_dataset(cfg["dataset"], "train", cfg.get("data_root"), **kw)
    test = load_dataset(cfg["dataset"], "test", cfg.get("data_root"), **kw)
    if cfg.get("train_examples"):
        train = train.subset(slice(0, int(cfg["train_examples"])))
    if cfg.get("test_examples"):
        test = test.subset(slice(0, int(cfg["test_examples"])))
    return train, test


def run_one(cfg: dict[str, Any], method: str, seed: int, train: ImageDataset, test: ImageDataset, out: Path,
            device: str = "cpu", quiet: bool = True) -> dict[str, Any]:
    from defenses.co_monitor import COMonitor
    from defenses.training_report import run_summary

    m = cfg["methods"][method]
    tcfg = TrainConfig(**{**cfg["train"], **m.get("train", {}), "seed": seed})
    eps = cfg["eps"]
    objective = create_objective(m["objective"], eps=eps, **m.get("params", {}))
    torch.manual_seed(seed)
    c, h, _ = train.input_shape
    model = create_model(cfg["model"], train.num_classes, c, h, **cfg.get("model_kwargs", {})).to(device)
    run_dir = out / f"{method}_s{seed}"
    mon = COMonitor(test, eps, seed=seed, run_dir=run_dir, quiet=quiet, **cfg.get("monitor", {}))
    t0 = time.perf_counter()
    try:
        res = fit(model, train, objective, tcfg, run_dir=run_dir, callbacks=[mon], device=device, quiet=True)
        history, stopped, diverged = res.history, res.stopped_early, None
    except ConfigError as exc:   # fit's "loss became nan/inf": record the divergence, keep the epochs done
        if "loss became" not in str(exc):
            raise
        from bastion.records import JsonlLog

        history, stopped, diverged = JsonlLog(run_dir / "train_log.jsonl").read(), True, str(exc)
    hist = [{k: r.get(k) for k in CURVE_KEYS if k in r} for r in history]
    return {"method": method, "seed": seed, "objective": objective.config(), "summary": run_summary(history),
            "history": hist, "seconds": time.perf_counter() - t0, "stopped_early": stopped, "diverged": diverged}


def _mean_last(hist: list[dict[str, Any]], key: str, n: int = 5) -> float | None:
    vals = [r[key] for r in hist[-n:] if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(cfg: dict[str, Any], results: list[dict[str, Any]]) -> str:
    from bastion.report import md_table

    lines = [f"# CO study: {cfg.get('name', '')}", "", str(cfg.get("description", "")).strip(), ""]
    rows = []
    for r in results:
        s, h = r["summary"], r["history"]
        pre = h[:s["co_first_epoch"] - 1] if s["co"] else h       # epochs before the first CO flag
        pre_gate = [x.get("gate_open_frac") or 0.0 for x in pre]
        pre_gap = [x["v_gap"] for x in pre if x.get("v_gap") is not None]
        if not s:
            rows.append([r["method"], r["seed"], "diverged before the first epoch"] + ["–"] * 9)
            continue
        label = r["method"] + (" (diverged)" if r.get("diverged") else "")
        rows.append([label, r["seed"], f"{s['peak_pgd']:.3f} (ep {s['peak_epoch']})", f"{s['final_pgd']:.3f}",
                     f"{s['final_fgsm']:.3f}", f"{s['final_clean']:.3f}",
                     f"CO @ {s['co_first_epoch']}" if s["co"] else "no",
                     _fmt(_mean_last(h, "aae_frac")), _fmt(max((x.get("aae_frac") or 0) for x in h)),
                     _fmt(sum(pre_gap) / len(pre_gap) if pre_gap else None, 2),
                     _fmt(sum(pre_gate) / len(pre_gate) if pre_gate else None, 2),
                     _fmt(_mean_last(h, "v_gap"), 2), f"{r['seconds']:.0f}"])
    lines.append(md_table(["method", "seed", "peak PGD", "final PGD", "final FGSM", "final clean", "CO flagged",
                           "AAE frac (last 5)", "max AAE frac", "V_A−V_N before CO", "gate open before CO",
                           "V_A−V_N (last 5)", "seconds"], rows))
    lines += ["", "'before CO': mean over the epochs before the first CO flag (all epochs if none) of the "
              "epoch's mean V_A − V_N over mixed batches and of the fraction of mixed batches whose gate "
              "V_A > V_N was open (the reference regularizer carries gradient only through open gates)."]
    lines += ["", "Per method: runs with CO flagged / runs"]
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    for meth, rs in by.items():
        rs = [r for r in rs if r["summary"]]
        if not rs:
            continue
        n_co = sum(r["summary"]["co"] for r in rs)
        fin = [r["summary"]["final_pgd"] for r in rs]
        lines.append(f"- {meth}: CO in {n_co}/{len(rs)}; final PGD mean {sum(fin) / len(fin):.3f} "
                     f"(min {min(fin):.3f}, max {max(fin):.3f})")
    return "\n".join(lines) + "\n"


def check_expectations(cfg: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The claims a config states in ``[expect]``: ``co_min_fraction = {method = f}`` (CO flagged in
    at least that fraction of the method's runs) and ``co_max_fraction = {method = f}``. Fractions,
    so a shard over some of the seeds is checked on its own runs; methods not run are skipped."""
    expect = cfg.get("expect", {})
    unknown = sorted(set(expect) - {"co_min_fraction", "co_max_fraction"})
    if unknown:
        raise ConfigError(f"unknown [expect] key(s) {unknown}; known: co_min_fraction, co_max_fraction")
    checks = []
    for kind, table in expect.items():
        for meth, f in table.items():
            rs = [r for r in results if r["method"] == meth and r["summary"]]
            if not rs:
                continue
            n_co = sum(bool(r["summary"]["co"]) for r in rs)
            ok = n_co >= f * len(rs) if kind == "co_min_fraction" else n_co <= f * len(rs)
            checks.append((f"{meth}: CO flagged in {n_co}/{len(rs)} runs "
                           f"({'>=' if kind == 'co_min_fraction' else '<='} {f:g} of them)", ok))
    return checks


def study_to_sweep(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `experiments.sweep` config of a study config: ``bastion train`` with the CO monitor on,
    seeds x methods (objective and params zipped), ``[expect]`` fractions as mean checks of ``co``."""
    bad = sorted(k for k in cfg.get("monitor", {}) if k not in ("pgd_steps", "every"))
    if bad or cfg.get("train_examples") or cfg.get("test_examples"):
        raise ConfigError(f"study options {bad or ['train_examples/test_examples']} have no `bastion train` "
                          f"option; run this study with python -m experiments.co_study")
    base: dict[str, Any] = {"dataset": cfg["dataset"], "model": cfg["model"], "eps": str(cfg["eps"]),
                            "monitor": "on"}
    for key in ("data_root", "image_size"):
        if cfg.get(key) is not None:
            base[key] = cfg[key]
    if cfg.get("model_kwargs"):
        base["model_arg"] = [f"{k}={v}" for k, v in cfg["model_kwargs"].items()]
    base |= dict(cfg["train"])
    mon = cfg.get("monitor", {})
    if "pgd_steps" in mon:
        base["monitor_pgd_steps"] = mon["pgd_steps"]
    if "every" in mon:
        base["monitor_every"] = mon["every"]
    methods = cfg["methods"]
    if any(m.get("train") for m in methods.values()):
        raise ConfigError("per-method [train] overrides: run this study with python -m experiments.co_study")
    expect = []
    for kind, table in cfg.get("expect", {}).items():
        for meth, f in table.items():
            expect.append({"where": {"method": meth}, "metric": "co",
                           ("mean_min" if kind == "co_min_fraction" else "mean_max"): float(f)})
    return {"name": cfg.get("name", "co_study"), "command": "train", "description": str(cfg.get("description", "")),
            "base": base, "grid": {"seed": list(cfg.get("seeds", [0]))},
            "zip": [{"axis": "method", "labels": list(methods), "objective": [m["objective"] for m in methods.values()],
                     "param": [[f"{k}={_literal(v)}" for k, v in m.get("params", {}).items()]
                               for m in methods.values()]}],
            "summary": {"metrics": ["final_pgd", "peak_pgd", "peak_epoch", "co", "co_first_epoch", "final_fgsm",
                                    "final_clean"]},
            "expect": expect}


def _literal(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _fmt(v: float | None, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=None, help="comma-separated subset of the config's methods")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: config's, else 1)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--include", action="append", default=[], metavar="DIR",
                   help="reuse finished runs from another output directory of the same config (parallel shards)")
    p.add_argument("--sweep", action="store_true", help="run the study as a `bastion sweep` (cells in OUT/cells)")
    p.add_argument("--workers", type=int, default=1, help="with --sweep: cells at a time (local processes)")
    args = p.parse_args(argv)
    try:
        cfg = read_config(args.config)
        if args.sweep:
            from experiments.sweep import parse_sweep, run_sweep

            sweep = parse_sweep(study_to_sweep(cfg), repr(args.config))
            summary = run_sweep(sweep, args.out, device=args.device, workers=args.workers, threads=args.threads,
                                log=(lambda m: None) if args.quiet else print)
            for e in summary["expect"]:
                print(f"| {e['what']} | {'yes' if e['met'] else 'NO'} |")
            return 0 if all(e["met"] for e in summary["expect"]) else 1
        torch.set_num_threads(args.threads or int(cfg.get("threads", 1)))
        if args.epochs:
            cfg["train"]["epochs"] = args.epochs
        methods = args.methods.split(",") if args.methods else list(cfg["methods"])
        missing = [m for m in methods if m not in cfg["methods"]]
        if missing:
            raise ConfigError(f"methods {missing} are not in {args.config!r}; it has {list(cfg['methods'])}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(cfg.get("seeds", [0]))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        train, test = load_data(cfg)
        results_path = out / "results.json"
        done: dict[str, dict] = {}
        if results_path.is_file():
            done = {f"{r['method']}_s{r['seed']}": r for r in json.loads(results_path.read_text())["runs"]}
        for other in args.include:
            for r in json.loads((Path(other) / "results.json").read_text())["runs"]:
                done.setdefault(f"{r['method']}_s{r['seed']}", r)
        results = []
        for seed in seeds:               # seed-major: partial results cover every method
            for meth in methods:
                key = f"{meth}_s{seed}"
                if key not in done or len(done[key]["history"]) < cfg["train"]["epochs"] and \
                        not done[key]["stopped_early"]:
                    done[key] = run_one(cfg, meth, seed, train, test, out, args.device)
                    s = done[key]["summary"]
                    if done[key]["diverged"]:
                        print(f"{key}: DIVERGED ({done[key]['diverged']})", flush=True)
                    if s:
                        print(f"{key}: peak PGD {s['peak_pgd']:.3f} final PGD {s['final_pgd']:.3f} "
                              f"FGSM {s['final_fgsm']:.3f} clean {s['final_clean']:.3f} CO "
                              f"{'@' + str(s['co_first_epoch']) if s['co'] else 'no'} ({done[key]['seconds']:.0f}s)",
                              flush=True)
                    results_path.write_text(json.dumps({"config": cfg, "runs": list(done.values())}, indent=1))
                results.append(done[key])
        write_outputs(cfg, results, out)
        checks = check_expectations(cfg, results)
    except BastionError as exc:
        print(f"error: {exc}")
        return 2
    if checks:
        print("\n| expectation | met |\n|---|---|")
        for what, ok in checks:
            print(f"| {what} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for _, ok in checks) else 1


def mean_history(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Epoch-wise mean of the monitor curves of several seeds; ``co`` where most seeds are flagged."""
    out = []
    for e in range(min(len(h) for h in histories)):
        rows = [h[e] for h in histories]
        rec: dict[str, Any] = {"epoch": e}
        for k in ("val_clean", "val_fgsm", "val_pgd", "aae_frac", "v_gap", "gate_open_frac"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            rec[k] = sum(vals) / len(vals) if vals else None
        if rec["val_pgd"] is None:
            break
        rec["co"] = sum(bool(r.get("co")) for r in rows) > len(rows) / 2
        out.append(rec)
    return out


def write_outputs(cfg: dict[str, Any], results: list[dict[str, Any]], out: Path) -> None:
    import defenses.training_report  # noqa: F401  (registers the renderer)
    from bastion.report import metrics_document, section, write_report

    (out / "summary.md").write_text(summarize(cfg, results))
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    secs = [section("training", f"{meth} (eps {cfg['eps']}, {cfg['model']})",
                    {"runs": [{"name": f"seed {r['seed']}", "history": r["history"], "objective": r["objective"]}
                              for r in rs], "per_epoch_tables": False})
            for meth, rs in by.items()]
    overview = [{"name": f"{meth} (mean of {len(rs)})", "history": mean_history([r["history"] for r in rs])}
                for meth, rs in by.items()]
    secs.insert(0, section("training", "All methods, mean over seeds (CO marked where most seeds are flagged)",
                           {"runs": overview, "per_epoch_tables": False}))
    doc = metrics_document(secs, title=f"CO study: {cfg.get('name', '')}")
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))
    write_report(out, doc)


if __name__ == "__main__":
    raise SystemExit(main())
