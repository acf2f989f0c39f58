"""Scale-out throughput: 2 local worker processes vs 1, side by side in one run, for certification
(``bastion certify``) and AutoAttack evaluation (``bastion evaluate --attacks autoattack-native``, and the
official pyautoattack through ``--attacks autoattack``).

Each configuration is the real command (run loop, shards, spawn pool) on a small CNN trained for one
epoch on digits; wall-clock seconds include the worker start-up. Thread split: every worker runs
``torch.set_num_threads(1)`` (``--threads 1``), so 1 worker uses 1 core and 2 workers use 2.
The two configurations alternate (1, 2, 1, 2, ...) so load from other processes on the machine
hits both alike; the median of ``--repeats`` is reported.

    OMP_NUM_THREADS=1 python benchmarks/scaleout.py [--repeats 3] [--certify-examples 128] [--aa-examples 96]
        [--out scaleout.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"command failed: {' '.join(args)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def workloads(model: str, n_cert: int, n_aa: int) -> dict[str, tuple[list[str], int]]:
    """name -> (command, examples)."""
    return {
        "certification (Cohen, n=10000, sigma 0.25)": (
            ["certify", "--quiet", "--model", model, "--sigma", "0.25", "--dataset", "digits", "--max", str(n_cert),
             "--n0", "100", "--n", "10000", "--batch", "1000", "--shard-size", "4"], n_cert),
        "AutoAttack (native, standard, linf 0.1)": (
            ["evaluate", "--quiet", "--model", model, "--dataset", "digits", "--max", str(n_aa), "--eps", "0.1",
             "--attacks", "autoattack-native", "--batch-size", "4", "--shard-size", "4"], n_aa),
        "AutoAttack (pyautoattack, standard, linf 0.1)": (
            ["evaluate", "--quiet", "--model", model, "--dataset", "digits", "--max", str(n_aa), "--eps", "0.1",
             "--attacks", "autoattack", "--batch-size", "4", "--shard-size", "4"], n_aa),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny workloads (a smoke run, not a measurement)")
    p.add_argument("--certify-examples", type=int, default=128,
                   help="test images certified (default 128: enough work that start-up is a small share)")
    p.add_argument("--aa-examples", type=int, default=96, help="test images attacked (default 96)")
    p.add_argument("--only", default=None, help="run only the workloads whose name contains this text")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="scaleout"))
    _cli(["train", "--quiet", "--dataset", "digits", "--epochs", "1", "--out", "std"], work)
    model = str(work / "std" / "model.safetensors")
    rows = []
    sizes = (8, 8) if a.quick else (a.certify_examples, a.aa_examples)
    for name, (cmd, n) in workloads(model, *sizes).items():
        if a.only and a.only not in name:
            continue
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(a.repeats):
            for w in (1, 2):
                out = work / f"{cmd[0]}-{w}-{r}"
                times[w].append(_cli([*cmd, "--workers", str(w), "--threads", "1", "--out", str(out)], work))
        t1, t2 = statistics.median(times[1]), statistics.median(times[2])
        rows.append((name, n, t1, t2, t1 / t2))
        print(f"{name}: 1 worker {t1:.1f} s, 2 workers {t2:.1f} s, speed-up {t1 / t2:.2f}x", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"Scale-out on this machine ({os.cpu_count()} cores, load average {load:.1f} at the end; "
             f"median of {a.repeats}; 1 torch thread per worker)", "",
             "| workload | examples | 1 worker (s) | 2 workers (s) | speed-up |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {t1:.1f} | {t2:.1f} | {s:.2f}x |" for name, n, t1, t2, s in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
