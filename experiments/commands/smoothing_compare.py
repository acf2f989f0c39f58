"""``bastion smoothing-compare CONFIG``: rRCM vs Gaussian, Gaussian + consistency and denoised smoothing.

Trains every method for every seed, certifies them through the one certifier on the same
index-strided subset, and writes OUT/report.md (+ comparison.json, figures, per-seed certify run
directories). Also runnable without the CLI wiring:
``python -m experiments.commands.smoothing_compare CONFIG --out DIR``.
"""

from __future__ import annotations

import argparse
import sys

from experiments.common import add_command

HELP = """examples:
  bastion smoothing-compare experiments/configs/consistency_digits.toml --out runs/consistency-digits
  bastion smoothing-compare experiments/configs/consistency_cifar10.toml --device cuda --out runs/consistency-cifar10

Writes OUT/report.md, OUT/comparison.json, OUT/comparison-0.png, OUT/seed<S>/certify/ (certify logs,
records, metrics.json, report) and OUT/seed<S>/models/ (composite checkpoints: bastion certify --model
OUT/seed0/models/rrcm-sigma0.25.json)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="comparison TOML (experiments/configs/consistency_*.toml)")
    p.add_argument("--out", default=None, help="output directory (default runs/<config stem>)")
    p.add_argument("--device", default=None, help="override the config's device (cpu, cuda)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's training seeds")
    p.add_argument("--quiet", action="store_true")


def register(sub, common) -> None:
    p = add_command(sub, common, "smoothing-compare", help="consistency-model smoothing vs baselines",
                    description="rRCM consistency-model smoothing against Gaussian augmentation, Gaussian + "
                                "consistency regularisation and diffusion denoised smoothing: same split, same "
                                "certified subset and CERTIFY settings, compute-matched training, several seeds "
                                "with bootstrap intervals, class histograms, inference cost.", epilog=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from defenses.consistency_compare import config_from_dict, run_comparison
    from experiments.config import read_toml

    raw = read_toml(args.config)
    if args.device:
        raw["device"] = args.device
    if args.seeds:
        raw["seeds"] = list(args.seeds)
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    sec = run_comparison(config_from_dict(raw), out, quiet=args.quiet)
    if not args.quiet:
        cr = sec["data"].get("cost_ratio")
        if cr:
            print(f"denoised / rRCM per noise sample: {cr['wall_ratio']:.1f}x wall, {cr['flops_ratio']:.1f}x FLOPs")
        print(f"report in {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoothing-compare", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
