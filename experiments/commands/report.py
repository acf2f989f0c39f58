"""``bastion report RUN_DIR``: (re)write report.md and report.html from metrics.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.common import add_command


def register(sub, common) -> None:
    p = add_command(sub, common, "report", help="write report.md/report.html of a run (or a certified report)",
                    description="Render a run directory's metrics.json into report.md and a "
                                "self-contained report.html. With --certified: one certified-accuracy report "
                                "over several certify runs (methods x sigmas) and Cohen-format TSV logs.",
                    epilog="examples:\n  bastion report runs/quickstart\n"
                           "  bastion report --certified runs/certify-g25 runs/certify-g50 "
                           "cohen=published/noise_0.25/test/sigma_0.25 --out runs/certified\n"
                           "  bastion report --certified gauss=runs/certify-gauss-sigma0.25_0.5 --radii 0,0.5,1")
    p.add_argument("run_dir", nargs="+", help="a run directory holding metrics.json; with --certified, certify run "
                                              "directories or CERTIFY TSV logs, each optionally METHOD=PATH")
    c = p.add_argument_group("certified report")
    c.add_argument("--certified", action="store_true", help="certified-accuracy report over the given runs/logs")
    c.add_argument("--radii", default=None, help="comma-separated table radii (default: 0 to 4 x max sigma)")
    c.add_argument("--alpha", type=float, default=0.001, help="alpha of the high-probability table (default 0.001)")
    c.add_argument("--out", default=None, help="output folder of --certified (default runs/certified-report)")
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


def run_certified(args: argparse.Namespace) -> int:
    from bastion.errors import ConfigError
    from experiments.certified_report import write_certified_report

    radii = None
    if args.radii:
        try:
            radii = [float(r) for r in str(args.radii).split(",") if r.strip()]
        except ValueError:
            raise ConfigError(f"--radii {args.radii!r}: give comma-separated numbers such as 0,0.25,0.5") from None
    out = Path(args.out or "runs/certified-report")
    doc = write_certified_report(args.run_dir, out, radii=radii, alpha=args.alpha)
    if not args.quiet:
        d = doc["sections"][0]["data"]
        for s in d["settings"]:
            table = ", ".join(f"r={r:g}: {100 * a:.1f}%" for r, a in zip(d["radii"], s["certified_accuracy"]))
            print(f"{s['method']} / {s['name']}: {table} | ACR {s['acr']:.3f}")
        print(f"report: {out / 'report.html'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from bastion.errors import ConfigError, RunError
    from bastion.report import write_report

    if args.certified:
        return run_certified(args)
    if len(args.run_dir) != 1 or args.out or args.radii:
        raise ConfigError("give one run directory (several, --out and --radii go with --certified)")
    args.run_dir = args.run_dir[0]
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
