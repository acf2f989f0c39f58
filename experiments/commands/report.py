"""``bastion report RUN_DIR``: (re)write report.md and report.html from metrics.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.common import add_command


def register(sub, common) -> None:
    p = add_command(sub, common, "report", help="write report.md/report.html of a run",
                    description="Render a run directory's metrics.json into report.md and a "
                                "self-contained report.html.",
                    epilog="example:\n  bastion report runs/quickstart")
    p.add_argument("run_dir", help="a run directory holding metrics.json")
    p.set_defaults(func=run)


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json, checked for the shape reports need (one-line `RunError` otherwise)."""
    from bastion.errors import RunError

    path = Path(run_dir) / "metrics.json"
    if not Path(run_dir).is_dir():
        raise RunError(f"{str(run_dir)!r} is not a run directory")
    if not path.is_file():
        raise RunError(f"no metrics.json in {str(run_dir)!r}: run an evaluation there first")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{str(path)!r} is not text (binary data); rerun the command that wrote it") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{str(path)!r} is damaged ({exc.msg} at line {exc.lineno}); rerun the command that "
                       f"wrote it") from None
    sections = doc.get("sections") if isinstance(doc, dict) else None
    if not isinstance(sections, list) or not all(
            isinstance(s, dict) and isinstance(s.get("type"), str) and isinstance(s.get("data", {}), dict)
            for s in sections):
        raise RunError(f"{str(path)!r} is not a Bastion metrics document (want an object with a list of "
                       f"sections, each with a type and a data object)")
    return doc


def run(args: argparse.Namespace) -> int:
    from bastion.errors import RunError
    from bastion.report import write_report

    doc = read_metrics(args.run_dir)
    try:
        paths = write_report(args.run_dir, doc)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        # a section whose data lacks what its renderer reads: the file was edited or is foreign
        raise RunError(f"{str(Path(args.run_dir) / 'metrics.json')!r} has a malformed section "
                       f"({type(exc).__name__}: {exc}); rerun the command that wrote it") from None
    if not args.quiet:
        print(f"wrote {paths['md']} and {paths['html']}")
    return 0
