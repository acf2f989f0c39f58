"""Seconds per training epoch of FGSM-RS, N-FGSM, RS-AAER, N-AAER and PGD-10 adversarial training
(and FGSM) on the same model, data and schedule, side by side in one process.

Timing on a shared machine is noisy, so the methods are interleaved: each repetition trains one
epoch of every method in turn (each method continues its own model), and the per-method median
over repetitions is reported, with the ratios the AAER claim is about (AAER / FGSM-RS,
AAER / N-FGSM, AAER / PGD-10). On CPU the ratios use the process CPU time of each epoch
(``time.process_time``; with one torch thread this is the compute the epoch took, unaffected by
other processes competing for the cores); wall-clock seconds are reported too. On CUDA the
ratios use wall-clock time with synchronization.

    python -m benchmarks.training                       # narrow PreAct-ResNet-18 on digits 16x16
    python -m benchmarks.training --model conv_linear --image-size 32 --reps 5
    python -m benchmarks.training --dataset cifar10 --data-root ~/data --model preact_resnet18 \
        --width 64 --image-size 32 --device cuda --max 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

METHODS = {
    "fgsm": ("fgsm", {}),
    "fgsm_rs": ("fgsm_rs", {}),
    "n_fgsm": ("n_fgsm", {}),
    "rs_aaer": ("rs_aaer", {"lambda2": 2.5, "lambda3": 1.5}),
    "n_aaer": ("n_aaer", {"lambda2": 1.5, "lambda3": 0.15}),
    "pgd10": ("pgd", {"steps": 10}),
}


def main(argv: list[str] | None = None) -> int:
    import defenses.single_step  # noqa: F401  (registers the objectives)
    from bastion.data import load_dataset
    from bastion.models import create_model
    from bastion.train import TrainConfig, create_objective, fit

    p = argparse.ArgumentParser(description="per-epoch cost of single-step AT, AAER and PGD-10 AT")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--max", type=int, default=None, help="use at most N training images")
    p.add_argument("--model", default="preact_resnet18")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--eps", default="0.2")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench_training")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, "train", args.data_root, image_size=args.image_size)
    if args.max:
        data = data.subset(slice(0, args.max))
    c, h, _ = data.input_shape
    methods = args.methods.split(",")
    models, objectives = {}, {}
    for m in methods:
        name, params = METHODS[m]
        torch.manual_seed(0)
        kw = {"width": args.width} if args.model in ("preact_resnet18", "conv_linear", "small_cnn") else {}
        models[m] = create_model(args.model, data.num_classes, c, h, **kw).to(args.device)
        objectives[m] = create_objective(name, eps=args.eps, **params)
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="constant")
    fit(models[methods[0]], data.subset(slice(0, args.batch_size)), objectives[methods[0]], cfg, quiet=True,
        device=args.device)  # warm-up (allocator, kernels)
    for rep in range(args.reps):
        for m in methods:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fit(models[m], data, objectives[m], TrainConfig(**{**cfg.__dict__, "seed": rep}), quiet=True,
                device=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
        print(f"rep {rep + 1}/{args.reps}: " + "  ".join(f"{m} {times[m][-1]:.2f}s wall {cpu[m][-1]:.2f}s cpu"
                                                         for m in methods), flush=True)
    gpu = args.device.startswith("cuda")
    med_wall = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    med = med_wall if gpu else med_cpu
    basis = "wall-clock" if gpu else "process CPU time"
    ratios = {}
    for a, b in (("rs_aaer", "fgsm_rs"), ("n_aaer", "n_fgsm"), ("rs_aaer", "pgd10"), ("n_aaer", "pgd10"),
                 ("fgsm_rs", "pgd10")):
        if a in med and b in med:
            ratios[f"{a}/{b}"] = med[a] / med[b]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "n_train": len(data), "wall_seconds_per_epoch": times,
              "cpu_seconds_per_epoch": cpu, "median_wall": med_wall, "median_cpu": med_cpu, "ratio_basis": basis,
              "ratios": ratios, "torch": torch.__version__}
    (out / "training_bench.json").write_text(json.dumps(result, indent=1))
    lines = [f"model {args.model} (width {args.width}), {args.dataset} {len(data)} images {args.image_size}px, "
             f"batch {args.batch_size}, eps {args.eps}, {args.reps} interleaved reps, {args.threads} thread(s), "
             f"{args.device}", "", "| method | median CPU s/epoch | median wall s/epoch | CPU s, all reps |",
             "|---|---|---|---|"]
    lines += [f"| {m} | {med_cpu[m]:.2f} | {med_wall[m]:.2f} | {', '.join(f'{t:.2f}' for t in cpu[m])} |"
              for m in methods]
    lines += ["", f"| ratio ({basis}) | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    limits = {"rs_aaer/fgsm_rs": 1.2, "n_aaer/n_fgsm": 1.2, "rs_aaer/pgd10": 0.35, "n_aaer/pgd10": 0.35}
    checks = [(f"{k} {ratios[k]:.3f} <= {v}", ratios[k] <= v) for k, v in limits.items() if k in ratios]
    lines += ["", "| target | met |", "|---|---|"] + [f"| {w} | {'yes' if ok else 'NO'} |" for w, ok in checks]
    (out / "training_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
