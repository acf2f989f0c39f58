"""``bastion quickstart``: the main job on the embedded digits data (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_command


def register(sub, common) -> None:
    p = add_command(sub, common, "quickstart", help="train, attack, certify on embedded digits; write a report",
                    description="Run every quickstart section on scikit-learn's embedded digits and write "
                                "OUT/report.html. Rerunning reuses finished models and recorded results.",
                    epilog="example:\n  bastion quickstart --out runs/quickstart")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--only", default=None, help="comma-separated section names to run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from experiments.quickstart import SECTIONS, QuickstartContext, run_quickstart

    if args.threads:
        torch.set_num_threads(args.threads)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only:
        from bastion.errors import ConfigError

        known = [n for n, _ in SECTIONS]
        bad = [s for s in only if s not in known]
        if bad:
            raise ConfigError(f"unknown quickstart section(s) {bad}; available: {', '.join(known)}")
    t0 = time.perf_counter()
    ctx = QuickstartContext(Path(args.out), device=args.device, seed=args.seed, quiet=args.quiet)
    run_quickstart(ctx, only)
    if not args.quiet:
        print(f"[quickstart] finished in {time.perf_counter() - t0:.1f} s; report: {Path(args.out) / 'report.html'}")
    return 0
