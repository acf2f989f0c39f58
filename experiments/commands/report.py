"""``bastion report RUN_DIR``: (re)write report.md and report.html from metrics.json."""

from __future__ import annotations

import argparse

from experiments.common import add_command


def register(sub, common) -> None:
    p = add_command(sub, common, "report", help="write report.md/report.html of a run",
                    description="Render a run directory's metrics.json into report.md and a "
                                "self-contained report.html.",
                    epilog="example:\n  bastion report runs/quickstart")
    p.add_argument("run_dir", help="a run directory holding metrics.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion.report import write_report

    paths = write_report(args.run_dir)
    if not args.quiet:
        print(f"wrote {paths['md']} and {paths['html']}")
    return 0
