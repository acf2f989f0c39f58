"""``bastion sweep CONFIG.toml``: an ablation grid of any command, one run directory per cell."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_command
from experiments.execution import add_execution_args

HELP = """examples:
  bastion sweep experiments/configs/sweep_co_digits.toml                # the CO study: objectives x seeds
  bastion sweep experiments/configs/sweep_co_digits.toml --workers 2    # two cells at a time
  bastion sweep CONFIG.toml --list                                      # the cells, nothing run
  bastion sweep CONFIG.toml --cells method-fgsm_seed-0 method-n_fgsm_seed-0
  bastion sweep CONFIG.toml --backend ray --address auto

Cells run in OUT/cells/<cell>/; finished cells are reused and a killed sweep continues when the
same command is run again. Outputs: OUT/summary.md, OUT/summary.json, OUT/report.html. The exit
status is 1 when an [[expect]] claim of the config is not met."""


def register(sub, common) -> None:
    p = add_command(sub, common, "sweep", help="ablation grid over any command's options (resumable, parallel)",
                    description="Run a command over the cartesian product (and zips) of option values in a TOML "
                                "config, seeds as an axis, one run directory per cell, cells in parallel; then a "
                                "summary with mean and spread over seeds and plots per metric.", epilog=HELP)
    p.add_argument("config", help="sweep TOML (see experiments/configs/sweep_*.toml)")
    p.add_argument("--cells", nargs="+", default=None, metavar="CELL", help="run only these cells (see --list)")
    p.add_argument("--list", action="store_true", help="print the cells and their options; run nothing")
    add_execution_args(p, shard_size=256)
    p.add_argument("--out", default=None, help="output folder (default runs/sweep-<name>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.sweep import check_cells, read_sweep, run_sweep

    sweep = read_sweep(args.config)
    if args.list:
        check_cells(sweep)
        for c in sweep.cells:
            print(f"{c.name}: {c.options}")
        return 0
    out = Path(args.out or f"runs/sweep-{sweep.name}")
    summary = run_sweep(sweep, out, device=args.device, backend=args.backend, workers=args.workers,
                        threads=args.threads, address=args.address, retries=args.retries, num_gpus=args.num_gpus,
                        only=set(args.cells) if args.cells else None, log=(lambda m: None) if args.quiet else print)
    if not args.quiet:
        print(f"summary: {out / 'summary.md'} (report {out / 'report.html'})")
    for e in summary["expect"]:
        print(f"expectation {'met' if e['met'] else 'NOT MET'}: {e['what']}")
    return 0 if all(e["met"] for e in summary["expect"]) else 1
