"""The ``smoothing_comparison`` section: fold certify records of several methods x sigmas x seeds.

- certified accuracy at the table radii, ACR and abstention per (method, sigma): mean over seeds,
  95% percentile bootstrap interval over the certified images (images resampled, all seeds kept);
- the best-over-sigma envelope per method, and paired bootstrap differences rRCM - other method on
  the envelope at each radius ("no difference" when the interval contains 0);
- the predicted-class histogram of every model (all seeds pooled per method x sigma, and per seed),
  with ``collapsed`` set when one class takes more than half of the non-abstained predictions;
- training cost (seconds, FLOPs) and inference cost (FLOPs and wall time per noise sample).

`predicted_class_histogram` / `collapse_flags` also work on the records of any certify run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bastion.records import parse_record
from bastion.report import md_table, pct, pyplot, register_renderer, section
from certify.class_histogram import COLLAPSE_SHARE, predicted_class_histogram  # noqa: F401  (re-exported)


def _radius_matrix(recs_by_seed: dict[int, list[Any]]) -> tuple[list[int], np.ndarray]:
    """(image indices, (seeds, images) certified radius, -inf where wrong or abstained)."""
    seeds = sorted(recs_by_seed)
    idx = sorted({r.index for r in recs_by_seed[seeds[0]]})
    mat = np.full((len(seeds), len(idx)), -np.inf)
    pos = {i: j for j, i in enumerate(idx)}
    for si, s in enumerate(seeds):
        for r in recs_by_seed[s]:
            if r.correct and r.pred >= 0:
                mat[si, pos[r.index]] = r.radius
    return idx, mat


def _curves(mat: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(radii,) certified accuracy, mean over seeds and images."""
    return (mat[:, :, None] >= radii[None, None, :]).mean(axis=(0, 1))


def _acr(mat: np.ndarray) -> float:
    return float(np.where(np.isfinite(mat), mat, 0.0).mean())


def compare(runs: dict[int, dict[str, Any]], costs: dict[str, Any], cfg: Any, subset: Any,
            ablations: list[dict[str, Any]], radii: Sequence[float] | None = None) -> dict[str, Any]:
    """Fold the runs into the ``smoothing_comparison`` section (see module docstring)."""
    from defenses.consistency_compare import level_table

    seeds = sorted(runs)
    k = subset.num_classes
    rad = np.array(radii if radii is not None else [0.0, 0.25, 0.5, 0.75, 1.0])
    rng = np.random.default_rng(0)
    recs: dict[str, dict[int, list[Any]]] = {}
    for s in seeds:
        for r in map(parse_record, runs[s]["records"]):
            recs.setdefault(r.probe, {})[s] = sorted([*recs.get(r.probe, {}).get(s, []), r], key=lambda q: q.index)
    n_img = len(next(iter(recs.values()))[seeds[0]])
    boots = rng.integers(0, n_img, size=(int(cfg.bootstrap), n_img))
    rows, boot_curves = [], {}
    for name, by_seed in recs.items():
        train = [runs[s]["train"].get(name, {}) for s in seeds]
        method, sigma = train[0].get("method", name), train[0].get("sigma")
        _, mat = _radius_matrix(by_seed)
        bc = np.stack([_curves(mat[:, b], rad) for b in boots])
        boot_curves[name] = bc
        acr_b = np.array([_acr(mat[:, b]) for b in boots])
        all_recs = [r for s in seeds for r in by_seed[s]]
        hist = predicted_class_histogram(all_recs, k)
        per_seed = {s: predicted_class_histogram(by_seed[s], k) for s in seeds}
        times = [r.time_s for r in all_recs if r.time_s is not None]
        cost = costs.get(name, {})
        rows.append({
            "name": name, "method": method, "sigma": sigma, "seeds": seeds, "num_images": n_img,
            "certified_accuracy": _curves(mat, rad).tolist(),
            "ci_low": np.percentile(bc, 2.5, axis=0).tolist(), "ci_high": np.percentile(bc, 97.5, axis=0).tolist(),
            "per_seed": [_curves(mat[i:i + 1], rad).tolist() for i in range(len(seeds))],
            "acr": _acr(mat), "acr_ci": [float(np.percentile(acr_b, 2.5)), float(np.percentile(acr_b, 97.5))],
            "abstention": float(np.mean([r.pred == -1 for r in all_recs])),
            "histogram": hist, "histogram_per_seed": {str(s): h for s, h in per_seed.items()},
            "collapsed": hist["collapsed"] or any(h["collapsed"] for h in per_seed.values()),
            "train_s": float(np.mean([t.get("train_s", 0.0) for t in train])),
            "train_flops": float(np.mean([t.get("train_flops", 0.0) for t in train])),
            "val_noisy_acc": _mean([t.get("val_noisy_acc") for t in train]),
            "notes": {k2: v for k2, v in train[0].items() if k2 not in ("method", "sigma", "train_s", "train_flops",
                                                                         "val_noisy_acc")},
            "cert_s_per_image": float(np.mean(times)) if times else None,
            "flops_per_sample": cost.get("flops"), "wall_s_per_sample": cost.get("wall_s_per_sample")})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    envelopes = {}
    for m in methods:
        names = [r["name"] for r in rows if r["method"] == m]
        env_b = np.max(np.stack([boot_curves[n] for n in names]), axis=0)
        point = np.max(np.stack([r["certified_accuracy"] for r in rows if r["method"] == m]), axis=0)
        envelopes[m] = {"certified_accuracy": point.tolist(), "ci_low": np.percentile(env_b, 2.5, axis=0).tolist(),
                        "ci_high": np.percentile(env_b, 97.5, axis=0).tolist(), "boot": env_b}
    verdicts = _verdicts(envelopes, rad)
    for e in envelopes.values():
        e.pop("boot")
    cost_ratio = _cost_ratio(rows)
    ab_rows = []
    for ab in ablations:
        _, mat = _radius_matrix({0: [parse_record(r) for r in ab["records"]]})
        ab_rows.append({"name": ab["name"], "sigma": ab["sigma"], "certified_accuracy": _curves(mat, rad).tolist(),
                        "acr": _acr(mat), "train_s": ab["train_s"], "val_noisy_acc": ab["val_noisy_acc"],
                        "pretrain": ab["pretrain"], "finetune": ab["finetune"],
                        "histogram": predicted_class_histogram(ab["records"], k)})
    c = cfg.certify
    data = {"dataset": cfg.dataset, "radii": rad.tolist(), "rows": rows, "envelopes": envelopes,
            "verdicts": verdicts, "cost_ratio": cost_ratio, "ablations": ab_rows, "levels": level_table(cfg.sigmas),
            "protocol": {"n0": c.get("n0", 100), "n": c.get("n", 1000), "alpha": c.get("alpha", 0.001),
                         "certify_seed": c.get("seed", 0), "training_seeds": seeds, "skip": c.get("skip", 4),
                         "indices": subset.indices.tolist(), "bootstrap": cfg.bootstrap,
                         "encoder": cfg.encoder, "pretrain": cfg.pretrain, "finetune": cfg.finetune,
                         "baselines": cfg.baselines, "denoiser": cfg.denoiser, "classifier": cfg.classifier,
                         "device": cfg.device}}
    return section("smoothing_comparison", f"Smoothing comparison on {cfg.dataset}", data)


def _mean(vals: list[Any]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _verdicts(envelopes: dict[str, dict[str, Any]], rad: np.ndarray) -> list[dict[str, Any]]:
    """Per radius: the best envelope and rRCM - other (paired bootstrap 95% interval)."""
    out = []
    real = {m: e for m, e in envelopes.items() if m != "constant"}
    for j, r in enumerate(rad):
        best = max(real, key=lambda m: real[m]["certified_accuracy"][j]) if real else None
        row: dict[str, Any] = {"radius": float(r), "best": best, "vs_rrcm": {}}
        if "rrcm" in real:
            for m, e in real.items():
                if m == "rrcm":
                    continue
                d = real["rrcm"]["boot"][:, j] - e["boot"][:, j]
                lo, hi = float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))
                point = real["rrcm"]["certified_accuracy"][j] - e["certified_accuracy"][j]
                word = "no difference" if lo <= 0 <= hi else ("rrcm better" if lo > 0 else f"{m} better")
                row["vs_rrcm"][m] = {"diff": point, "ci": [lo, hi], "verdict": word}
        out.append(row)
    return out


def _cost_ratio(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    by = {}
    for r in rows:
        if r["wall_s_per_sample"] is not None:
            by.setdefault(r["method"], []).append(r)
    if "rrcm" not in by or "denoised" not in by:
        return None
    w = lambda m, key: float(np.mean([r[key] for r in by[m]]))  # noqa: E731
    return {"wall_ratio": w("denoised", "wall_s_per_sample") / w("rrcm", "wall_s_per_sample"),
            "flops_ratio": w("denoised", "flops_per_sample") / w("rrcm", "flops_per_sample"),
            "rrcm_wall_s": w("rrcm", "wall_s_per_sample"), "denoised_wall_s": w("denoised", "wall_s_per_sample"),
            "rrcm_flops": w("rrcm", "flops_per_sample"), "denoised_flops": w("denoised", "flops_per_sample")}


def _best(envelopes: dict[str, Any], j: int) -> str:
    """The method(s) with the highest envelope point at radius j ("tie" when every method shares it)."""
    vals = {m: e["certified_accuracy"][j] for m, e in envelopes.items() if m != "constant"}
    top = max(vals.values())
    best = [m for m, v in vals.items() if v == top]
    return f"tie ({100 * top:.1f})" if len(best) == len(vals) else " = ".join(best)


def _ci(v: float, lo: float, hi: float) -> str:
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def render_comparison(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    rad = d["radii"]
    p = d["protocol"]
    parts = [f"Certified subset: {len(p['indices'])} test images (every {p['skip']}th index); n0={p['n0']}, "
             f"n={p['n']}, alpha={p['alpha']}, certify seed {p['certify_seed']}; training seeds {p['training_seeds']}; "
             f"intervals: 95% bootstrap over images ({p['bootstrap']} resamples), all seeds pooled.", ""]
    hdr = ["method", "sigma"] + [f"r={r:g}" for r in rad] + ["ACR", "abstain", "val noisy acc", "train s",
                                                            "train GFLOPs", "flag"]
    body = []
    for r in d["rows"]:
        cells = [_ci(a, lo, hi) for a, lo, hi in zip(r["certified_accuracy"], r["ci_low"], r["ci_high"])]
        flag = (f"COLLAPSED (class {r['histogram']['top_class']}: {100 * r['histogram']['top_share']:.0f}%)"
                if r["collapsed"] else "")
        body.append([r["method"], f"{r['sigma']:g}", *cells, f"{r['acr']:.3f} [{r['acr_ci'][0]:.3f}, "
                     f"{r['acr_ci'][1]:.3f}]", pct(r["abstention"]),
                     "-" if r["val_noisy_acc"] is None else pct(r["val_noisy_acc"]), f"{r['train_s']:.1f}",
                     f"{r['train_flops'] / 1e9:.1f}", flag])
    parts += ["### Certified accuracy (%) per sigma, mean over seeds [95% CI]", "", md_table(hdr, body), ""]
    ehdr = ["method"] + [f"r={r:g}" for r in rad]
    ebody = [[m] + [_ci(a, lo, hi) for a, lo, hi in zip(e["certified_accuracy"], e["ci_low"], e["ci_high"])]
             for m, e in d["envelopes"].items()]
    parts += ["### Envelope (best over sigma)", "", md_table(ehdr, ebody), ""]
    if d["verdicts"] and d["verdicts"][0]["vs_rrcm"]:
        others = list(d["verdicts"][0]["vs_rrcm"])
        vb = [[f"{v['radius']:g}", _best(d["envelopes"], j)] + [f"{100 * v['vs_rrcm'][m]['diff']:+.1f} "
                                                 f"[{100 * v['vs_rrcm'][m]['ci'][0]:+.1f}, "
                                                 f"{100 * v['vs_rrcm'][m]['ci'][1]:+.1f}]: {v['vs_rrcm'][m]['verdict']}"
                                                 for m in others] for j, v in enumerate(d["verdicts"])]
        parts += ["### Who wins where (envelopes; rRCM minus other, points, paired bootstrap)", "",
                  md_table(["radius", "best"] + [f"rrcm - {m}" for m in others], vb), ""]
    cr = d.get("cost_ratio")
    crow = [[r["method"], f"{r['sigma']:g}", f"{(r['flops_per_sample'] or 0) / 1e6:.3f}",
             f"{1e6 * (r['wall_s_per_sample'] or 0):.2f}",
             "-" if r["cert_s_per_image"] is None else f"{r['cert_s_per_image']:.3f}"]
            for r in d["rows"] if r["flops_per_sample"] is not None]
    parts += ["### Inference cost per noise sample (measured side by side, one process, first seed's models)", "",
              md_table(["method", "sigma", "MFLOPs/sample", "us/sample", "certify s/image"], crow), ""]
    if cr:
        parts += [f"Denoised smoothing / rRCM: {cr['wall_ratio']:.1f}x wall time, {cr['flops_ratio']:.1f}x FLOPs "
                  f"per noise sample.", ""]
    hb = [[r["method"], f"{r['sigma']:g}", " ".join(str(c) for c in r["histogram"]["counts"]),
           str(r["histogram"]["abstain"]), f"{100 * r['histogram']['top_share']:.0f}% (class "
           f"{r['histogram']['top_class']})", "COLLAPSED" if r["collapsed"] else "ok"] for r in d["rows"]]
    parts += ["### Predicted classes (certify predictions, seeds pooled; flag: one class > 50%)", "",
              md_table(["method", "sigma", "counts per class", "abstain", "top share", "flag"], hb), ""]
    if d["ablations"]:
        ab = [[a["name"], f"{a['sigma']:g}", *[pct(v) for v in a["certified_accuracy"]], f"{a['acr']:.3f}",
               pct(a["val_noisy_acc"]), f"{a['train_s']:.1f}",
               "COLLAPSED" if a["histogram"]["collapsed"] else ""] for a in d["ablations"]]
        parts += ["### rRCM ablations (first seed only, no interval)", "",
                  md_table(["ablation", "sigma"] + [f"r={r:g}" for r in rad] + ["ACR", "val noisy acc", "train s",
                                                                                "flag"], ab), ""]
    lv = [[f"{x['sigma']:g}", x["index"], f"{x['t']:.6f}", f"{x['c_in']:.6f}", f"{x['c_noise']:.3f}"]
          for x in d["levels"]]
    parts += ["### sigma -> EDM level (N = 81)", "", md_table(["sigma", "index", "t", "c_in", "c_noise"], lv), ""]
    return "\n".join(parts), _figures(d)


def _figures(d: dict[str, Any]) -> list:
    plt = pyplot()
    figs = []
    sigmas = sorted({r["sigma"] for r in d["rows"]})
    fig, axes = plt.subplots(1, len(sigmas) + 1, figsize=(4 * (len(sigmas) + 1), 3.2), squeeze=False)
    for ax, s in zip(axes[0], sigmas):
        for r in (r for r in d["rows"] if r["sigma"] == s):
            ax.plot(d["radii"], r["certified_accuracy"], marker="o", label=r["method"])
            ax.fill_between(d["radii"], r["ci_low"], r["ci_high"], alpha=0.15)
        ax.set_title(f"sigma = {s:g}")
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy")
    ax = axes[0][-1]
    for m, e in d["envelopes"].items():
        ax.plot(d["radii"], e["certified_accuracy"], marker="o", label=m)
        ax.fill_between(d["radii"], e["ci_low"], e["ci_high"], alpha=0.15)
    ax.set_title("envelope (best over sigma)")
    ax.set_xlabel("L2 radius")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs.append(("Certified accuracy per sigma and envelope (bands: 95% bootstrap)", fig))
    return figs


register_renderer("smoothing_comparison", render_comparison)


def write_report(sec: dict[str, Any], out: str | Path) -> Path:
    """``out/report.md`` plus the figure PNGs beside it."""
    out = Path(out)
    md, figs = render_comparison(sec)
    lines = [f"## {sec['title']}", md]
    for i, (cap, fig) in enumerate(figs):
        name = f"comparison-{i}.png"
        fig.savefig(out / name, dpi=110)
        lines.append(f"![{cap}]({name})")
    path = out / "report.md"
    path.write_text("\n\n".join(lines) + "\n")
    return path
