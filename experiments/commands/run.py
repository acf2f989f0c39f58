"""``bastion run CONFIG.toml``: execute a TOML config (``command = "..."`` + that command's options)."""

from __future__ import annotations

import argparse

from experiments.common import add_command


def register(sub, common) -> None:
    p = add_command(sub, common, "run", help="run a TOML config",
                    description="Run a TOML config: a top-level key `command` names the subcommand "
                                "(train, evaluate, certify, ...) and the other keys are its options. "
                                "Unknown keys are an error.",
                    epilog="example:\n  bastion run experiments/configs/digits_pgd.toml")
    p.add_argument("config", help="path to a .toml file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bastion.errors import ConfigError
    from experiments.cli import build_parser
    from experiments.config import namespace_from_config, read_toml

    cfg = read_toml(args.config)
    command = cfg.pop("command", None)
    _, commands = build_parser()
    if command is None:
        raise ConfigError(f"{args.config!r} lacks `command = \"NAME\"` (one of {', '.join(sorted(commands))})")
    if command not in commands or command in ("run", "quickstart"):
        raise ConfigError(f"unknown command {command!r} in {args.config!r}; use one of "
                          f"{', '.join(sorted(c for c in commands if c not in ('run', 'quickstart')))}")
    ns = namespace_from_config(commands[command], cfg, args.config)
    for key in ("quiet", "device"):
        if key not in cfg:
            setattr(ns, key, getattr(args, key))
    if "seed" not in cfg:
        ns.seed = args.seed
    return int(ns.func(ns) or 0)
