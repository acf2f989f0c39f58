"""The ``conformal`` fold: per-example conformal score records -> the ``conformal`` section.

A pure function of the records and the probes' descriptions. Per probe (model), per score (HPS,
APS, their PTT versions, ...) and per method, over ``splits`` calibration/test splits of the
non-holdout examples (split 0 is the records' declared split, the others seeded random
re-splits with the same calibration size):

- ``split``: plain split conformal on the unsmoothed base score (clean inputs only);
- ``smoothed``: the smoothed score calibrated at 1 - alpha, no robust margin (what an attack does
  to an unprotected smoothed conformal predictor);
- ``rscp``: Gendler et al.'s robust threshold on the MC estimate: NOT provably valid (its MC
  error is uncontrolled, spec section 5), reported for comparison;
- ``rscp+``: calibrated at alpha - 2 beta, Hoeffding width on the threshold, eps/sigma shift,
  Bernstein (or Hoeffding) lower bound on the test score (spec section 6): provably valid.

Reported per method: coverage and average set size on clean and on attacked test inputs (mean,
std, min, max over splits), size over covered points, full-set and empty-set rates, the
threshold and the limit U, and per-class coverage under attack (mean over splits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bastion.folds import FoldContext, register_fold
from bastion.records import BaseRecord
from bastion.report import md_table, register_renderer, section
from certify.conformal import conformal_threshold
from certify.rscp import hoeffding_width, rscp_bound, rscp_plus_bound

METHODS = ("split", "smoothed", "rscp", "rscp+")
VALIDITY = {"split": "clean only", "smoothed": "no robust guarantee", "rscp": "not provably valid (MC error)",
            "rscp+": "provably robust"}


def _stats(values: list[float]) -> dict[str, float] | None:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max())}


def _array(rows: list[BaseRecord], field: str, name: str, k: int) -> np.ndarray:
    out = np.full((len(rows), k), np.nan)
    for i, r in enumerate(rows):
        d = getattr(r, field) or {}
        if name in d:
            out[i] = d[name]
    return out


def split_positions(split: np.ndarray, holdout_cal: bool, r: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration positions, test positions) of split ``r`` (0 = declared, else random)."""
    pool = np.flatnonzero(split != "holdout")
    declared_cal = np.flatnonzero(split == "calibration")
    n_cal = len(declared_cal) if len(declared_cal) else len(pool) // 2
    if r == 0 and len(declared_cal):
        cal, test = declared_cal, np.flatnonzero(split == "test")
    else:
        perm = np.random.default_rng([int(seed), int(r)]).permutation(pool)
        cal, test = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    if holdout_cal:
        cal = np.sort(np.concatenate([cal, np.flatnonzero(split == "holdout")]))
    return cal, test


def _metrics(sets: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    n = len(labels)
    covered = sets[np.arange(n), labels]
    size = sets.sum(axis=1)
    per = [float(covered[labels == c].mean()) if np.any(labels == c) else None for c in range(k)]
    return {"coverage": float(covered.mean()), "size": float(size.mean()),
            "size_if_covered": float(size[covered].mean()) if covered.any() else math.nan,
            "full": float((size == k).mean()), "empty": float((size == 0).mean()), "per_class": per}


def evaluate_score(arrays: dict[str, np.ndarray], labels: np.ndarray, split: np.ndarray, method: str,
                   desc: dict[str, Any], ptt: bool) -> dict[str, Any]:
    """One (score, method) over all splits."""
    alpha, beta = float(desc.get("alpha", 0.1)), float(desc.get("beta", 0.001))
    eps, sigma, n_mc = float(desc.get("eps", 0.0)), float(desc.get("sigma", 1.0)), int(desc.get("n_mc", 2))
    k = arrays["mean"].shape[1]
    hold_cal = bool(desc.get("holdout_in_calibration", True)) and not ptt
    seed, splits = int(desc.get("split_seed", 0)), int(desc.get("splits", 1))
    use_h = desc.get("test_bound", "bernstein") == "hoeffding"
    b_h = hoeffding_width(n_mc, beta) if n_mc >= 1 else math.nan
    per_split: list[dict[str, Any]] = []
    taus, limits = [], []
    have_adv = ~np.isnan(arrays["adv_mean"][:, 0])
    for r in range(splits):
        cal, test = split_positions(split, hold_cal, r, seed)
        lab_t = labels[test]
        if method == "split":
            cs = arrays["base"][cal, labels[cal]]
            tau = conformal_threshold(cs, alpha)
            lim, clean, adv = tau, arrays["base"][test] <= tau, None
        else:
            cs = arrays["mean"][cal, labels[cal]]
            if method == "smoothed":
                tau = conformal_threshold(cs, alpha)
                lim = tau
                lo_c, lo_a = arrays["mean"][test], arrays["adv_mean"][test]
            elif method == "rscp":
                tau, lim = rscp_bound(cs, alpha, eps, sigma)
                lo_c, lo_a = arrays["mean"][test], arrays["adv_mean"][test]
            else:
                tau, lim = rscp_plus_bound(cs, alpha, eps, sigma, n_mc, beta)
                wc = b_h if use_h else arrays["bound"][test]
                wa = b_h if use_h else arrays["adv_bound"][test]
                lo_c, lo_a = arrays["mean"][test] - wc, arrays["adv_mean"][test] - wa
            clean, adv = lo_c <= lim, lo_a <= lim
        taus.append(tau)
        limits.append(lim)
        m = {"clean": _metrics(clean, lab_t, k)}
        t_adv = have_adv[test]
        if adv is not None and t_adv.any():
            m["adv"] = _metrics(adv[t_adv], lab_t[t_adv], k)
        per_split.append(m)

    def col(cond: str, key: str) -> dict[str, float] | None:
        return _stats([m[cond][key] for m in per_split if cond in m])

    out: dict[str, Any] = {"method": method, "validity": VALIDITY[method], "splits": splits,
                           "threshold": _stats([t for t in taus if math.isfinite(t)]),
                           "limit": _stats([x for x in limits if math.isfinite(x)]),
                           "infinite_threshold_rate": float(np.mean([not math.isfinite(t) for t in taus]))}
    for cond in ("clean", "adv"):
        if not any(cond in m for m in per_split):
            continue
        out[cond] = {key: col(cond, key) for key in ("coverage", "size", "size_if_covered", "full", "empty")}
        pcs = [m[cond]["per_class"] for m in per_split if cond in m]
        means = []
        for c in range(k):
            v = [p[c] for p in pcs if p[c] is not None]
            means.append(float(np.mean(v)) if v else None)
        out[cond]["per_class_coverage"] = means
        out[cond]["worst_class_coverage"] = min((v for v in means if v is not None), default=None)
    return out


def probe_section(name: str, rows: list[BaseRecord], desc: dict[str, Any]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r.index)
    labels = np.asarray([r.label for r in rows], dtype=np.int64)
    split = np.asarray([r.split for r in rows])
    first = rows[0]
    names = list(desc.get("scores") or (first.mean or {}).keys())
    k = len(next(iter((first.mean or {}).values()), [])) or int(labels.max()) + 1
    adv_rows = [r for r in rows if r.adv_pred is not None]
    pool = [r for r in rows if r.split != "holdout"]
    out: dict[str, Any] = {
        "name": name, "model": desc.get("model"), "attack": desc.get("attack"),
        "examples": {s: int(np.sum(split == s)) for s in ("holdout", "calibration", "test")},
        "smoothed_accuracy": float(np.mean([r.correct for r in pool])) if pool else None,
        "smoothed_accuracy_adv": float(np.mean([r.adv_pred == r.label for r in adv_rows])) if adv_rows else None,
        "results": []}
    for sc in names:
        arrays = {f: _array(rows, attr, sc, k) for f, attr in
                  (("base", "scores"), ("mean", "mean"), ("bound", "bound"), ("adv_mean", "adv_mean"),
                   ("adv_bound", "adv_bound"))}
        for method in METHODS:
            res = evaluate_score(arrays, labels, split, method, desc, ptt=sc.startswith("ptt-"))
            out["results"].append({"score": sc, **res})
    return out


def fold_conformal(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    by: dict[str, list[BaseRecord]] = {}
    for r in records:
        by.setdefault(r.probe, []).append(r)
    described = [n for n, d in ctx.probes.items() if d.get("kind") == "conformal"]
    order = [n for n in described if n in by] + sorted(n for n in by if n not in described)
    probes = []
    for n in order:
        desc = dict(ctx.probes.get(n) or {})
        if not desc:   # a run read back without its probes: what the records say, defaults otherwise
            r0 = by[n][0]
            desc = {"sigma": r0.sigma, "n_mc": r0.n_mc}
        probes.append(probe_section(n, by[n], desc))
    first = next((ctx.probes[n] for n in order if n in ctx.probes), {})
    data = {key: first.get(key) for key in ("alpha", "beta", "eps", "sigma", "n_mc", "splits", "attack_noise",
                                            "attack_steps", "test_bound", "holdout_in_calibration")}
    data |= {"dataset": ctx.data.get("name"), "split": ctx.data.get("split"), "class_names": list(ctx.class_names),
             "hoeffding_width": first.get("hoeffding_width"), "probes": probes}
    return [section("conformal", ctx.title, data)]


register_fold("conformal", fold_conformal, kinds=("conformal",))


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------

def _ms(s: dict[str, float] | None, pct: bool = False) -> str:
    if not s:
        return "–"
    f, unit, dp = (100.0, "%", 1) if pct else (1.0, "", 2)
    return f"{f * s['mean']:.{dp}f}{unit} ± {f * s['std']:.{dp}f} (min {f * s['min']:.{dp}f})"


def render_conformal(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    parts = [f"alpha = {d.get('alpha')}, L2 eps = {d.get('eps')}, sigma = {d.get('sigma')}, N_MC = {d.get('n_mc')}, "
             f"beta = {d.get('beta')} (Hoeffding width {d.get('hoeffding_width') or 0:.4f}), test-side bound "
             f"{d.get('test_bound')}; attack SmoothAdv, {d.get('attack_steps')} steps x {d.get('attack_noise')} draws, "
             f"scored with fresh noise; mean ± std (min) over {d.get('splits')} calibration/test splits."]
    for p in d.get("probes", []):
        ex = p["examples"]
        acc = p.get("smoothed_accuracy")
        acc_adv = p.get("smoothed_accuracy_adv")
        parts.append(f"**{p['name']}** (`{p.get('model')}`): {ex['holdout']} holdout, {ex['calibration']} "
                     f"calibration, {ex['test']} test examples declared; smoothed accuracy "
                     f"{'–' if acc is None else f'{100 * acc:.1f}%'} clean, "
                     f"{'–' if acc_adv is None else f'{100 * acc_adv:.1f}%'} under attack.")
        rows = []
        for r in p["results"]:
            adv = r.get("adv") or {}
            worst = adv.get("worst_class_coverage")
            clean = r.get("clean") or {}
            rows.append([r["score"], r["method"], r["validity"], _ms(clean.get("coverage"), True),
                         _ms(clean.get("size")), _ms(adv.get("coverage"), True), _ms(adv.get("size")),
                         "–" if adv.get("full") is None else f"{100 * adv['full']['mean']:.0f}%",
                         "–" if worst is None else f"{100 * worst:.1f}%"])
        parts.append(md_table(["score", "method", "guarantee", "clean coverage", "clean size", "attacked coverage",
                               "attacked size", "full sets (attacked)", "worst class (attacked)"], rows))
    return "\n\n".join(parts), []


register_renderer("conformal", render_conformal)
