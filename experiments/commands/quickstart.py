"""``bastion quickstart``: the main job on the embedded digits data (about a minute on 2 CPU cores)."""

from __future__ import annotations

import argparse

from experiments.common import add_command, check_out
from experiments.quickstart import section_names


def sections_arg(text: str) -> list[str]:
    """Comma-separated quickstart section names, each one of `section_names()`."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    known = section_names()
    bad = [s for s in names if s not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown quickstart section(s) {bad or [text]}; choose from "
                                         f"{', '.join(known)}")
    return names


def register(sub, common) -> None:
    p = add_command(sub, common, "quickstart", help="train, attack, certify on embedded digits; write a report",
                    description="Run every quickstart section on scikit-learn's embedded digits and write "
                                "OUT/report.html. Rerunning reuses finished models and recorded results.",
                    epilog="examples:\n  bastion quickstart --out runs/quickstart\n"
                           "  bastion quickstart --only robustness,certification --threads 1")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--only", default=None, type=sections_arg, metavar="SECTIONS",
                   help=f"comma-separated sections to run, of: {', '.join(section_names())} (default: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from experiments.quickstart import run_quickstart
    from experiments.quickstart.context import QuickstartContext

    out = check_out(args.out)
    t0 = time.perf_counter()
    ctx = QuickstartContext(out, device=args.device, seed=args.seed, quiet=args.quiet)
    run_quickstart(ctx, args.only)
    if not args.quiet:
        print(f"[quickstart] finished in {time.perf_counter() - t0:.1f} s; report: {out / 'report.html'}")
    return 0
