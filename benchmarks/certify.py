"""Randomized-smoothing benchmark, side by side in one run (CPU by default).

A. Throughput on one base model and the same examples: the *limit* (bare forward + argmax of the
   model on pre-drawn noise at the same batch size), Bastion *exact* mode, and a faithful
   *straightforward loop* (one example at a time, batches of the reference size, fresh
   ``randn`` per batch, counts moved to the host after every batch), in samples per second, plus
   each one's outcome distribution (they draw different noise, so outcomes agree statistically).
   Exact mode and the loop alternate within each repetition; besides the best wall time, each one's
   process CPU time is kept per repetition (far less disturbed by other jobs on a shared machine)
   and exact/loop is also checked on the median of the per-repetition CPU-time ratios.
B. Sequential vs exact mode at n = 100,000 with a report grid up to 2 sigma: samples used and
   certified accuracy at the reported radii.
C. 1 worker vs 2 local workers (speedup, wall time including worker start-up).
D. Anytime vs exact mode at n = 100,000 on the quickstart's digits model (Gaussian-augmented
   ``small_cnn``, sigma 0.25, the report's table radii 0 .. 1.0): samples used, wall time and
   certified accuracy at every table radius side by side, in the same run. Every (example, radius)
   where the two differ is listed with its cause (declined by the futility rule, ran to the cap
   without its test passing, certified by anytime mode only) and whether the radius's threshold on
   pA lies within exact mode's sampling error (its two-sided (1 - 2 alpha) Clopper-Pearson interval
   at n, widened by half its width): there exact mode's own answer is a coin flip of the noise.
A and C run with one torch thread per worker and with torch's default thread count.

    python benchmarks/certify.py --out runs/bench-certify            # full (several minutes on 2 cores)
    python benchmarks/certify.py --quick                              # a smoke run

Base models are trained here with Gaussian augmentation (sigma 0.25) on the embedded digits:
``small_cnn`` (width 16) for A and C, the 64-256-256-10 ``mlp`` for B (n = 1e5 on 100 examples is
10M forward samples per mode, affordable on a shared CPU only for a fast base model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.data import load_dataset  # noqa: E402
from bastion.models import create_model  # noqa: E402
from bastion.train import TrainConfig, create_objective, fit  # noqa: E402
from certify.stats import ABSTAIN, certify_decision  # noqa: E402


def train_model(arch: str, kwargs: dict, sigma: float, epochs: int, seed: int = 0):
    import defenses.gaussian  # noqa: F401

    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    m = create_model(arch, 10, 1, 8, **kwargs)
    fit(m, train, create_objective("gaussian", sigma=sigma), TrainConfig(epochs=epochs, batch_size=64, lr=0.05,
                                                                        seed=seed), quiet=True)
    return m.eval()


def train_quickstart_model(sigma: float, epochs: int, seed: int = 0):
    """The quickstart's Gaussian-augmented digits model (experiments/quickstart/certification.py)."""
    import defenses.gaussian  # noqa: F401

    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    m = create_model("small_cnn", 10, 1, 8)
    res = fit(m, train, create_objective("gaussian", sigma=sigma),
              TrainConfig(epochs=epochs, batch_size=64, lr=0.05, schedule="cosine", seed=seed), quiet=True)
    return res.model.eval()


# --- A: the three samplers --------------------------------------------------------------------

def bare_forward(model, shape, total: int, batch: int) -> float:
    """Seconds for ``total`` samples of forward + argmax on pre-drawn noise (the limit)."""
    noise = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(noise).argmax(1)
        t0 = time.perf_counter()
        done = 0
        while done < total:
            b = min(batch, total - done)
            model(noise[:b]).argmax(1)
            done += b
    return time.perf_counter() - t0


def straightforward_certify(model, x, n0: int, n: int, alpha: float, batch: int, sigma: float, k: int,
                            gen: torch.Generator) -> tuple[int, float]:
    """The spec's CERTIFY written the plain way: per example, batches of ``batch``, counts on the host."""

    def sample(num: int) -> np.ndarray:
        counts = np.zeros(k, dtype=np.int64)
        remaining = num
        with torch.no_grad():
            while remaining > 0:
                b = min(batch, remaining)
                remaining -= b
                xb = x.unsqueeze(0).repeat(b, 1, 1, 1)
                noise = torch.randn(xb.shape, generator=gen) * sigma
                pred = model(xb + noise).argmax(1)
                counts += np.bincount(pred.cpu().numpy(), minlength=k)
        return counts

    c0 = sample(n0)
    c_a = int(c0.argmax())
    c = sample(n)
    pred, rad, _ = certify_decision(c_a, int(c[c_a]), n, alpha, sigma)
    return pred, rad


def outcome(preds, radii, labels, radii_grid):
    preds, radii, labels = np.array(preds), np.array(radii), np.array(labels)
    ok = preds == labels
    return {"abstain": float(np.mean(preds == ABSTAIN)), "correct": float(np.mean(ok)),
            "mean_radius_correct": float(np.mean(radii[ok])) if ok.any() else 0.0,
            "certified_accuracy": {f"{r:g}": float(np.mean(ok & (radii >= r))) for r in radii_grid}}


def part_a(model, xs, ys, idx, *, n0, n, alpha, batch, sigma, threads, reps):
    from certify.smoothing import Smooth, chunk_size

    torch.set_num_threads(threads)
    total = len(xs) * (n0 + n)
    shape = tuple(xs.shape[1:])
    smooth = Smooth(model, 10, sigma, seed=0)
    m = chunk_size(n0, n, batch)
    # warm-up
    smooth.certify_many(xs[:1], [-1], n0, min(n, 1000), alpha, batch)
    best = {"limit": 1e9, "exact": 1e9, "loop": 1e9}
    cpu: dict[str, list[float]] = {"exact": [], "loop": []}
    res_exact = res_loop = None

    def run_exact():
        certs = []
        for c in range(0, len(xs), m):
            certs += smooth.certify_many(xs[c:c + m], idx[c:c + m], n0, n, alpha, batch)
        return certs

    def run_loop():
        gen = torch.Generator().manual_seed(1)
        return [straightforward_certify(model, x, n0, n, alpha, batch, sigma, 10, gen) for x in xs]

    for rep in range(reps):                      # interleaved, alternating order, best of reps (the machine is shared)
        best["limit"] = min(best["limit"], bare_forward(model, shape, total, batch))
        for name in (("exact", "loop") if rep % 2 == 0 else ("loop", "exact")):
            t0, c0 = time.perf_counter(), time.process_time()
            out = run_exact() if name == "exact" else run_loop()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)   # CPU time: far less disturbed by other jobs than wall time
            if name == "exact":
                res_exact = out
            else:
                res_loop = out
    sps = {k: total / v for k, v in best.items()}
    grid = [0.0, 0.25, 0.5]
    return {"threads": threads, "samples": total, "samples_per_s": sps,
            "exact_vs_limit": sps["exact"] / sps["limit"], "exact_vs_loop": sps["exact"] / sps["loop"],
            "cpu_s": cpu, "exact_vs_loop_cpu": float(np.median(np.array(cpu["loop"]) / np.array(cpu["exact"]))),
            "outcomes": {"exact": outcome([c.prediction for c in res_exact], [c.radius for c in res_exact], ys, grid),
                         "loop": outcome([p for p, _ in res_loop], [r for _, r in res_loop], ys, grid)}}


# --- B: sequential vs exact -------------------------------------------------------------------

def part_b(model, xs, ys, idx, *, n0, n, alpha, batch, sigma, threads):
    from bastion.metrics import certified_accuracy
    from certify.logs import format_radius
    from certify.smoothing import Sequential, Smooth, chunk_size

    torch.set_num_threads(threads)
    smooth = Smooth(model, 10, sigma, seed=0)
    radii = [k * 0.25 * sigma for k in range(9)]            # 0 .. 2 sigma
    out = {}
    for mode in ("exact", "sequential"):
        seq = Sequential(stop_radius=radii[-1], start=1000, radii=tuple(radii)) if mode == "sequential" else None
        m = chunk_size(n0, n, batch)
        t0 = time.perf_counter()
        certs = []
        for c in range(0, len(xs), m):
            certs += smooth.certify_many(xs[c:c + m], idx[c:c + m], n0, n, alpha, batch, sequential=seq)
        wall = time.perf_counter() - t0
        rad = [float(format_radius(c.radius)) for c in certs]
        ok = [c.prediction == y for c, y in zip(certs, ys)]
        acc = certified_accuracy(rad, ok, radii)
        stops: dict[str, int] = {}
        for c in certs:
            stops[c.stopped] = stops.get(c.stopped, 0) + 1
        out[mode] = {"samples_total": int(sum(c.samples for c in certs)), "wall_s": wall,
                     "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, acc)},
                     "abstain": float(np.mean([c.prediction == ABSTAIN for c in certs])), "stopped": stops}
    e, s = out["exact"], out["sequential"]
    out["sample_ratio"] = e["samples_total"] / s["samples_total"]
    out["max_accuracy_gap_points"] = max(abs(e["certified_accuracy"][k] - s["certified_accuracy"][k]) * 100
                                         for k in e["certified_accuracy"])
    out["examples"] = len(xs)
    return out


# --- D: anytime vs exact -----------------------------------------------------------------------

def part_d(model, xs, ys, idx, *, n0, n, alpha, batch, sigma, threads):
    from certify.analysis import table_radii
    from certify.anytime import Anytime
    from certify.logs import format_radius
    from certify.smoothing import Smooth, chunk_size
    from certify.stats import cp_upper

    torch.set_num_threads(threads)
    smooth = Smooth(model, 10, sigma, seed=0)
    radii = table_radii(4 * sigma)
    rule = Anytime(radii=tuple(radii))
    out: dict = {"radii": radii}
    certs: dict = {}
    for mode in ("anytime", "exact"):
        m = chunk_size(n0, n, batch)
        t0 = time.perf_counter()
        cs = []
        for c in range(0, len(xs), m):
            cs += smooth.certify_many(xs[c:c + m], idx[c:c + m], n0, n, alpha, batch,
                                      anytime=rule if mode == "anytime" else None)
        wall = time.perf_counter() - t0
        rad = np.array([float(format_radius(c.radius)) for c in cs])
        ok = np.array([c.prediction == y for c, y in zip(cs, ys)])
        stops: dict[str, int] = {}
        for c in cs:
            stops[c.stopped] = stops.get(c.stopped, 0) + 1
        out[mode] = {"samples_total": int(sum(c.samples for c in cs)), "wall_s": wall,
                     "certified_accuracy": [float(np.mean(ok & (rad >= r))) for r in radii],
                     "samples_per_example": [int(c.samples) for c in cs], "stopped": stops}
        certs[mode] = (cs, ok, rad)
    (ex, ok_e, rad_e), (an, ok_a, rad_a) = certs["exact"], certs["anytime"]
    # every (example, radius) where the two modes' certificates differ, by cause: anytime declined by the
    # futility rule (a bet that exact mode would not reach it), ran to the cap without its test passing
    # (the price of validity at every t), or certified where exact mode did not (exact mode's own coin
    # flip near the threshold); "near" = the threshold lies within exact mode's two-sided (1 - 2 alpha)
    # Clopper-Pearson interval widened by its half-width (the sampling error at n)
    causes: dict[str, int] = {}
    per_radius = [0] * len(radii)
    near = 0
    diffs = []
    for e, a, oe, oa, re, ra in zip(ex, an, ok_e, ok_a, rad_e, rad_a):
        for j, r in enumerate(radii):
            ce, ca = bool(oe and re >= r), bool(oa and ra >= r)
            if ce == ca:
                continue
            cause = ("anytime only" if ca else "declined (futility)" if a.stopped == "futile"
                     else "cap, test not passed" if a.stopped == "final" else "provably not")
            causes[cause] = causes.get(cause, 0) + 1
            per_radius[j] += 1
            thr = 0.5 if r == 0 else norm_cdf(r / sigma)
            lo, hi = e.p_lower, cp_upper(e.n_a, e.n, alpha)
            is_near = lo - (hi - lo) / 2 <= thr <= hi + (hi - lo) / 2
            near += int(is_near)
            diffs.append({"index": e.index, "radius": r, "exact": ce, "cause": cause, "near_threshold": is_near,
                          "n_a_exact": e.n_a, "anytime_samples": a.samples})
    disagree, allowed = len(diffs), near
    for mode, cs in (("exact", ex), ("anytime", an)):
        out[mode]["per_example"] = [{"index": c.index, "p_lower": c.p_lower, "n_a": c.n_a, "n": c.n,
                                     "stopped": c.stopped} for c in cs]
    out.update(examples=len(xs), n=n, sample_ratio=out["exact"]["samples_total"] / out["anytime"]["samples_total"],
               wall_ratio=out["exact"]["wall_s"] / out["anytime"]["wall_s"],
               max_accuracy_gap_points=max(abs(a - b) * 100 for a, b in zip(out["exact"]["certified_accuracy"],
                                                                           out["anytime"]["certified_accuracy"])),
               disagreements=disagree, disagreements_near_threshold=allowed, disagreement_causes=causes,
               disagreements_per_radius=per_radius, disagreement_list=diffs)
    print("\n| radius | exact | anytime |\n|---|---|---|")
    for r, a, b in zip(radii, out["exact"]["certified_accuracy"], out["anytime"]["certified_accuracy"]):
        print(f"| {r:g} | {100 * a:.1f}% | {100 * b:.1f}% |")
    print(f"| samples | {out['exact']['samples_total']} | {out['anytime']['samples_total']} "
          f"({out['sample_ratio']:.2f}x fewer) |")
    print(f"| wall s | {out['exact']['wall_s']:.1f} | {out['anytime']['wall_s']:.1f} "
          f"({out['wall_ratio']:.2f}x faster) |")
    print(f"disagreements (example, radius): {disagree} ({allowed} near the threshold), per radius {per_radius}, "
          f"causes {causes}")
    return out


def norm_cdf(z: float) -> float:
    from scipy.stats import norm

    return float(norm.cdf(z))


# --- C: workers ---------------------------------------------------------------------------------

def part_c(model, data, tmp: Path, *, n0, n, alpha, batch, sigma, threads):
    from bastion.checkpoints import make_card, save_checkpoint
    from certify.runner import CertifyOptions, Setting, run_certification

    ck = tmp / "model"
    save_checkpoint(ck, model, make_card(model, "small_cnn", 10, (1, 8, 8), {"width": 16}, dataset="digits"))
    opts = CertifyOptions(n0=n0, n=n, alpha=alpha, batch=batch, shard_size=max(1, len(data) // 4))
    out = {}
    rows = {}
    for w in (1, 2):
        run = tmp / f"w{w}-t{threads}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        run_certification([Setting("s", str(ck) + ".safetensors", sigma, 10)], data, run, opts, workers=w,
                          threads=threads, quiet=True, write_reports=False)
        out[f"wall_s_{w}_workers"] = time.perf_counter() - t0
        rows[w] = [line.split("\t")[:5] for line in (run / "certify-s.tsv").read_text().splitlines()]
    out["speedup"] = out["wall_s_1_workers"] / out["wall_s_2_workers"]
    out["same_rows"] = rows[1] == rows[2]
    out["threads_per_worker"] = threads or "default"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-certify")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--parts", default="A,B,C,D")
    ap.add_argument("--examples-d", type=int, default=30, help="test examples of part D (default 30)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_threads = torch.get_num_threads()
    sigma, alpha, n0, batch = 0.25, 0.001, 100, 1000
    q = args.quick
    test = load_dataset("digits", "test")
    results: dict = {"machine": {"torch_threads_default": default_threads, "torch": torch.__version__},
                     "config": {"sigma": sigma, "alpha": alpha, "n0": n0, "batch": batch}}
    parts = set(args.parts.upper().split(","))
    t_all = time.perf_counter()
    if parts & {"A", "C"}:
        cnn = train_model("small_cnn", {"width": 16}, sigma, 2 if q else 10)
    if "A" in parts:
        # a small n (quickstart-sized: the loop's n0 and n batches are small, exact mode packs
        # several examples per forward pass) and the reference-sized n = 10,000
        results["A"] = []
        for n, count in ((1000, 2 if q else 40), (2000 if q else 10_000, 2 if q else 8)):
            sub = test.every(max(1, len(test) // count), count)
            results["A"].append({"model": "small_cnn(width=16)", "n": n, "examples": len(sub), "runs": [
                part_a(cnn, sub.images, sub.labels.tolist(), sub.indices.tolist(), n0=n0, n=n, alpha=alpha,
                       batch=batch, sigma=sigma, threads=t, reps=1 if q else 5)
                for t in sorted({1, default_threads})]})
            print(json.dumps(results["A"][-1], indent=1), flush=True)
    if "B" in parts:
        mlp = train_model("mlp", {}, sigma, 2 if q else 15)
        sub = test.every(4, 10 if q else 100)
        n = 10_000 if q else 100_000
        results["B"] = {"model": "mlp(64-256-256-10)", "n": n, **part_b(
            mlp, sub.images, sub.labels.tolist(), sub.indices.tolist(), n0=n0, n=n, alpha=alpha, batch=batch,
            sigma=sigma, threads=1)}
        print(json.dumps(results["B"], indent=1), flush=True)
    if "C" in parts:
        torch.set_num_threads(default_threads)   # parts A and B changed it; "default" must mean torch's own
        sub = test.every(4, 8 if q else 112)   # ~1.1M samples: enough to amortize worker start-up (~5 s)
        n = 2000 if q else 10_000
        results["C"] = {"model": "small_cnn(width=16)", "n": n, "examples": len(sub), "runs": [
            part_c(cnn, sub, out / "workers", n0=n0, n=n, alpha=alpha, batch=batch, sigma=sigma, threads=t)
            for t in (1, None)]}
        print(json.dumps(results["C"], indent=1), flush=True)
    if "D" in parts:
        torch.set_num_threads(1)                 # the model's last bits depend on the thread count: train on one
        qs = train_quickstart_model(sigma, 3 if q else 15)
        sub = test.every(max(1, len(test) // args.examples_d), 4 if q else args.examples_d)
        results["D"] = {"model": "small_cnn (quickstart: width 32, 15 epochs, Gaussian sigma 0.25)", **part_d(
            qs, sub.images, sub.labels.tolist(), sub.indices.tolist(), n0=n0, n=10_000 if q else 100_000,
            alpha=alpha, batch=batch, sigma=sigma, threads=1)}
        print(json.dumps({k: v for k, v in results["D"].items() if k not in ("exact", "anytime")}, indent=1),
              flush=True)
    results["total_s"] = time.perf_counter() - t_all
    results["targets"] = checks = targets(results)
    (out / "certify_bench.json").write_text(json.dumps(results, indent=2))
    print("\n| target | met |\n|---|---|")
    for what, ok in checks:
        print(f"| {what} | {'yes' if ok else 'NO'} |")
    print(f"wrote {out / 'certify_bench.json'} ({results['total_s']:.0f} s)")
    return 0 if all(ok for _, ok in checks) else 1


# Run-to-run noise of throughput on the shared 2-core machine, measured as the spread of repeated
# best-of-3 runs: "never slower than the loop" is checked up to this tolerance.
NOISE = 0.05


def targets(results: dict) -> list[tuple[str, bool]]:
    """The issue's targets, checked on what this run measured."""
    checks = []
    for a in results.get("A", []):
        for r in a["runs"]:
            tag = f"A n={a['n']} threads={r['threads']}"
            checks.append((f"{tag}: exact/limit {r['exact_vs_limit']:.3f} >= 0.90", r["exact_vs_limit"] >= 0.90))
            checks.append((f"{tag}: exact/loop {r['exact_vs_loop']:.3f} >= 1 - {NOISE} (noise)",
                           r["exact_vs_loop"] >= 1 - NOISE))
            if "exact_vs_loop_cpu" in r:
                checks.append((f"{tag}: exact/loop in CPU time (median of reps) {r['exact_vs_loop_cpu']:.3f} >= 1 - "
                               f"{NOISE}", r["exact_vs_loop_cpu"] >= 1 - NOISE))
    if "B" in results:
        b = results["B"]
        checks.append((f"B: sequential uses {b['sample_ratio']:.2f}x fewer samples (>= 3)", b["sample_ratio"] >= 3))
        checks.append((f"B: largest certified-accuracy gap {b['max_accuracy_gap_points']:.1f} pts (<= 1)",
                       b["max_accuracy_gap_points"] <= 1.0))
    if "D" in results:
        d = results["D"]
        checks.append((f"D: anytime uses {d['sample_ratio']:.2f}x fewer samples than exact (>= 10)",
                       d["sample_ratio"] >= 10))
        checks.append((f"D: anytime is {d['wall_ratio']:.2f}x faster in wall time (>= 5)", d["wall_ratio"] >= 5))
        checks.append((f"D: {d['disagreements']} (example, radius) disagreements with exact, "
                       f"{d['disagreements_near_threshold']} with the threshold within exact mode's sampling "
                       "error (all)",
                       d["disagreements"] == d["disagreements_near_threshold"]))
    for r in results.get("C", {}).get("runs", []):
        checks.append((f"C threads={r['threads_per_worker']}: 2 workers give the same rows as 1", r["same_rows"]))
    return checks


if __name__ == "__main__":
    sys.exit(main())
