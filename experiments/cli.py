"""The ``bastion`` command line. Each subcommand lives in experiments/commands/<name>.py and
defines ``register(subparsers, common)``; user errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bastion.errors import BastionError

COMMANDS = [
    "experiments.commands.train",
    "experiments.commands.evaluate",
    "experiments.commands.certify",
    "experiments.commands.run",
    "experiments.commands.report",
    "experiments.commands.quickstart",
]


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    return common


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="bastion", description="Bastion: adversarial robustness evaluation, certification and defenses.")
    parser.add_argument("--version", action="version", version="bastion 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_parser()
    before = set(sub.choices)
    for mod in COMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue  # command not shipped in this build
            raise
        module.register(sub, common)
    commands = {k: v for k, v in sub.choices.items() if k not in before}
    return parser, commands


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BastionError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.quiet or not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import experiments.plugins  # noqa: F401  (registers objectives, attacks, renderers)

        args.device = resolve_device(args.device)
        return int(args.func(args) or 0)
    except BastionError as exc:
        print(f"bastion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bastion: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
