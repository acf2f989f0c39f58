"""EPS-AD throughput benchmark, side by side in one run (CPU by default, one torch thread).

A. EPS extraction (K levels) of the same N digits with the same noise draws:
   - *reference-style loop*: one image and one level per forward pass;
   - *per-level batches*: a batch of images per forward pass, looping over the K levels (the
     official code's loop);
   - *Bastion batched* (`eps_features`): the per-level loop on batches of 256 images (its first
     version stacked all K levels into one K*B forward pass, which was slower on CPU);
   in images/s, with the largest difference between the three results (same noise: equal up to
   float rounding).
B. Score-model training (the UNet epsilon-model of the digits recipe): images/s at batch 128 vs one
   image per step (the same loop, `train_eps_model`).

    python benchmarks/detection.py --out runs/bench-detection
    python benchmarks/detection.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.data import load_dataset  # noqa: E402
from detection.diffusers_backend import EpsTrainConfig, build_scheduler, build_unet, train_eps_model  # noqa: E402
from detection.eps import draw_noise, eps_features, eps_features_loop  # noqa: E402
from detection.score_model import EpsilonScoreModel, load_score_model  # noqa: E402


@torch.no_grad()
def eps_per_level(model, x: torch.Tensor, levels: int, noise: torch.Tensor, batch: int) -> torch.Tensor:
    """The official code's loop: for each batch of images, one forward pass per level."""
    out = []
    for lo in range(0, x.shape[0], batch):
        u = x[lo:lo + batch] * 2 - 1
        acc = torch.zeros_like(u)
        for k in range(1, levels + 1):
            kk = torch.full((u.shape[0],), k, dtype=torch.long)
            a = model.alpha_bar(kk).view(-1, 1, 1, 1)
            acc += model.score(a.sqrt() * u + (1 - a).sqrt() * noise[lo:lo + batch, k - 1], kk)
        out.append(acc / levels)
    return torch.cat(out)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_eps(model, x: torch.Tensor, levels: int, batch: int, loop_n: int) -> dict:
    noise = draw_noise(x, levels, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, t_fast = timed(lambda: eps_features(model, x, levels, noise=noise, batch=batch))
    lvl, t_lvl = timed(lambda: eps_per_level(model, x, levels, noise, batch))
    ref, t_ref = timed(lambda: eps_features_loop(model, x[:loop_n], levels, noise=noise[:loop_n]))
    return {"images": x.shape[0], "levels": levels, "batch": batch,
            "reference_loop": {"images": loop_n, "seconds": round(t_ref, 3), "images_per_s": round(loop_n / t_ref, 1)},
            "per_level_batches": {"seconds": round(t_lvl, 3), "images_per_s": round(x.shape[0] / t_lvl, 1)},
            "bastion_batched": {"seconds": round(t_fast, 3), "images_per_s": round(x.shape[0] / t_fast, 1)},
            "speedup_vs_reference_loop": round((x.shape[0] / t_fast) / (loop_n / t_ref), 1),
            "speedup_vs_per_level": round(t_lvl / t_fast, 2),
            "max_abs_diff": {"per_level": float((fast - lvl).abs().max()),
                             "reference_loop": float((fast[:loop_n] - ref).abs().max())},
            "max_abs_eps": float(fast.abs().max())}


def bench_train(x: torch.Tensor, steps_batched: int, steps_single: int) -> dict:
    out = {}
    for name, steps, b in (("batched_128", steps_batched, 128), ("one_image_per_step", steps_single, 1)):
        torch.manual_seed(0)
        unet = build_unet(1, x.shape[-1])
        _, stats = train_eps_model(unet, build_scheduler(), x, EpsTrainConfig(steps=steps, batch_size=b, seed=0))
        out[name] = {"steps": steps, "batch": b, "seconds": round(stats.seconds, 2),
                     "images_per_s": round(stats.images_per_s, 1)}
    out["speedup"] = round(out["batched_128"]["images_per_s"] / out["one_image_per_step"]["images_per_s"], 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-detection")
    ap.add_argument("--score-model", default=None, help="a trained score-model directory (default: a fresh UNet)")
    ap.add_argument("--images", type=int, default=450)
    ap.add_argument("--levels", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, loop_n, steps_b, steps_1 = (40, 8, 5, 40) if args.quick else (args.images, 50, 60, 600)
    x = load_dataset("digits", "test").images[:n]
    if args.score_model:
        model = load_score_model(args.score_model)
    else:
        torch.manual_seed(0)
        unet = build_unet(1, 8).eval()
        model = EpsilonScoreModel(unet, build_scheduler().alphas_cumprod).eval()
    model.requires_grad_(False)
    results = {"device": "cpu", "threads": args.threads, "torch": torch.__version__}
    results["A_eps"] = bench_eps(model, x, args.levels, 256, loop_n)
    print(json.dumps(results["A_eps"], indent=1), flush=True)
    results["B_train"] = bench_train(load_dataset("digits", "train").images, steps_b, steps_1)
    print(json.dumps(results["B_train"], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection_bench.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'detection_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
