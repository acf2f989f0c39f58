"""The ``bastion`` command line. Each subcommand lives in experiments/commands/<name>.py and
defines ``register(subparsers, common)``; user errors print one line and exit with status 2.

Building the parser imports no torch (``bastion --help`` is instant): command modules import
their heavy dependencies inside their ``run`` functions."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import NoReturn

from bastion.errors import BastionError, ConfigError

COMMANDS = [
    "experiments.commands.train",
    "experiments.commands.evaluate",
    "experiments.commands.certify",
    "experiments.commands.conformal",
    "experiments.commands.detect",
    "experiments.commands.mix",
    "experiments.commands.smoothing_compare",
    "experiments.commands.run",
    "experiments.commands.report",
    "experiments.commands.quickstart",
    "experiments.commands.leaderboard",
    "experiments.commands.sweep",
]


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one-line `ConfigError`s (see `main`)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def common_parser() -> argparse.ArgumentParser:
    """The options every command takes (a fresh parser per command: a command may redefine one)."""
    from experiments.common import add_threads_arg

    common = Parser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    g.add_argument("--device", default="auto", type=device_name,
                   help="cpu, cuda, cuda:N, mps or auto (default: auto = cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    add_threads_arg(g)
    return common


def device_name(text: str) -> str:
    """A device name as the user wrote it; checked against the machine by `resolve_device`."""
    name = str(text).strip().lower()
    base, _, index = name.partition(":")
    if base not in ("auto", "cpu", "cuda", "mps") or (index and (base != "cuda" or not index.isdigit())) \
            or (name == "auto" and index):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N, mps or auto")
    return name


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = Parser(prog="bastion",
                    description="Bastion: adversarial robustness evaluation, certification and defenses.")
    parser.add_argument("--version", action="version", version="bastion 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    before = set(sub.choices)
    for mod in COMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue  # command not shipped in this build
            raise
        module.register(sub, common_parser())
    commands = {k: v for k, v in sub.choices.items() if k not in before}
    return parser, commands


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BastionError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise BastionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BastionError("--device mps: MPS is not available on this machine; use --device cpu")
    return name


def _error(message: str) -> int:
    print(f"bastion: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    try:
        args = parser.parse_args(argv)
    except BastionError as exc:
        return _error(str(exc))
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.quiet or not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import experiments.plugins  # noqa: F401  (registers objectives, attacks, renderers)
        from experiments.common import apply_threads

        args.device = resolve_device(args.device)
        if getattr(args, "command", None) != "run":  # `run` applies its config's threads
            apply_threads(args.threads)
        return int(args.func(args) or 0)
    except BastionError as exc:
        return _error(str(exc))
    except UnicodeDecodeError as exc:
        return _error(f"a file is not valid UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return _error(f"a JSON file is damaged: {exc}")
    except OSError as exc:  # the file system refused what the user asked (permissions, full disk, ...)
        where = f" {exc.filename!r}" if exc.filename else ""
        return _error(f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        print("bastion: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
