"""Anytime mode against a Bernoulli oracle: wrong-decision rates and samples over a grid of pA.

For each pA (0.5 .. 0.9999, plus the thresholds of the table radii themselves, the hardest case)
and many seeds, run the stopping rule of `certify.anytime` (the very `AnytimeRun` the certifier
drives) with Binomial draws between looks, and report

- the rate of *wrong certificates* (certified at a table radius whose threshold is above pA: the
  event the guarantee bounds by alpha), and of *wrong decisions* of any kind (also "not certified"
  decided by the upper bound U < p_j while pA >= p_j), with the maximum over the grid;
- mean estimation samples per example, next to exact mode's fixed n and today's doubling
  sequential mode (`certify.smoothing.Sequential`, stop radius = the largest table radius),
  replicated here on the same oracle.

    python benchmarks/anytime_sim.py                      # full table (alpha 0.001 and 0.05, 2000 seeds)
    python benchmarks/anytime_sim.py --seeds 200 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta, norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certify.analysis import table_radii  # noqa: E402
from certify.anytime import Anytime, _cp_lower_vec, simulate  # noqa: E402
from certify.smoothing import NOISE_BLOCK, Sequential  # noqa: E402

GRID = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999]


def doubling_samples(p_a: float, seeds: int, n: int, alpha: float, sigma: float, radii: list[float],
                     rng: np.random.Generator) -> np.ndarray:
    """Estimation samples used by today's sequential mode (the rules of `Smooth.certify_many`)."""
    seq = Sequential(stop_radius=radii[-1], start=1000, radii=tuple(radii))
    sizes = seq.schedule(n, NOISE_BLOCK)
    alphas = seq.alphas(alpha, len(sizes))
    s = np.zeros(seeds, dtype=np.int64)
    best = np.zeros(seeds)
    used = np.full(seeds, n, dtype=np.int64)
    active = np.ones(seeds, dtype=bool)
    prev = 0
    for j, (nj, aj) in enumerate(zip(sizes, alphas)):
        s = s + rng.binomial(nj - prev, p_a, seeds)
        prev = nj
        if j == len(sizes) - 1:
            break
        best = np.maximum(best, _cp_lower_vec(s, np.full(seeds, nj), aj))
        with np.errstate(invalid="ignore"):
            up = np.where(s < nj, beta.ppf(1 - aj, s + 1, nj - s), 1.0)
        r_lo = sigma * norm.ppf(np.clip(best, 0.5, 1))
        r_hi = np.where(up < 1, sigma * norm.ppf(np.clip(up, 0.5, 1)), np.inf)
        bucket = np.array([seq.bucket_settled(a, b) for a, b in zip(r_lo, r_hi)])
        stop = active & (((best >= 0.5) & (r_lo >= seq.stop_radius)) | (up < 0.5) | ((best >= 0.5) & bucket))
        used[stop] = nj
        active &= ~stop
        if not active.any():
            break
    return used


def table(alpha: float, seeds: int, n: int, n0: int, sigma: float, grid: list[float], seed: int) -> dict:
    radii = table_radii(4 * sigma)
    rule = Anytime(radii=tuple(radii))
    thr = rule.thresholds(sigma)
    ps = sorted(set(grid) | {float(t) for t in thr if t < 1})
    rng = np.random.default_rng(seed)
    rows = []
    for p in ps:
        t0 = time.perf_counter()
        r = simulate(rule, p, seeds, n, alpha, sigma, rng)
        dbl = doubling_samples(p, min(seeds, 500), n, alpha, sigma, radii, rng)
        rows.append({"p_a": p, "wrong_certified": float(r.wrong_certified.mean()), "wrong_any": float(r.wrong.mean()),
                     "mean_samples": float(r.samples.mean() + n0), "doubling_mean_samples": float(dbl.mean() + n0),
                     "fixed_samples": n0 + n, "at_cap": float((r.samples >= n).mean()),
                     "seconds": time.perf_counter() - t0})
        x = rows[-1]
        print(f"alpha {alpha:g} pA {p:.6f}: wrong cert {x['wrong_certified']:.4f} any {x['wrong_any']:.4f} | samples "
              f"anytime {x['mean_samples']:.0f} doubling {x['doubling_mean_samples']:.0f} fixed {n0 + n} "
              f"(at cap {x['at_cap']:.2f})", flush=True)
    return {"alpha": alpha, "seeds": seeds, "n": n, "n0": n0, "sigma": sigma, "radii": radii, "rows": rows,
            "max_wrong_certified": max(x["wrong_certified"] for x in rows),
            "max_wrong_any": max(x["wrong_any"] for x in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2000)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--alphas", default="0.001,0.05")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--quick", action="store_true", help="a coarse grid")
    ap.add_argument("--out", default="docs/results-certify/anytime_sim.json")
    args = ap.parse_args(argv)
    grid = [0.5, 0.8, 0.99, 0.9999] if args.quick else GRID
    out = {"tables": [table(float(a), args.seeds, args.n, 100, args.sigma, grid, seed=k)
                      for k, a in enumerate(args.alphas.split(","))]}
    ok = True
    print("\n| alpha | seeds | max wrong-certificate rate | max wrong-decision rate | <= alpha |")
    print("|---|---|---|---|---|")
    for t in out["tables"]:
        # "<= alpha" up to the sampling error of the seeds (one-sided binomial test at 1e-3)
        from scipy.stats import binom
        k = round(t["max_wrong_any"] * t["seeds"])
        fine = binom.sf(k - 1, t["seeds"], t["alpha"]) > 1e-3
        ok &= fine
        print(f"| {t['alpha']:g} | {t['seeds']} | {t['max_wrong_certified']:.4f} | {t['max_wrong_any']:.4f} | "
              f"{'yes' if fine else 'NO'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
