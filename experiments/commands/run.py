"""``bastion run CONFIG.toml``: execute a TOML config (``command = "..."`` + that command's options)."""

from __future__ import annotations

import argparse

from experiments.common import add_command


def register(sub, common) -> None:
    p = add_command(sub, common, "run", help="run a TOML config",
                    description="Run a TOML config: a top-level key `command` names the subcommand "
                                "(train, evaluate, certify, ...) and the other keys are its options, "
                                "written as on the command line without the dashes. Flags are booleans "
                                "(quiet = true); options with several values take a list or one value "
                                "(sigma = [0.25, 0.5]); repeatable K=V options take a table "
                                "(param = {lambda3 = 1.5}). Unknown keys and wrong types are an error. "
                                "Common options given on the command line (--quiet, --device, --seed, "
                                "--threads) apply where the config does not set them.",
                    epilog="example:\n  bastion run experiments/configs/digits_pgd.toml")
    p.add_argument("config", help="path to a .toml file")
    p.set_defaults(func=run)


def runnable(commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """The commands a config may name."""
    return sorted(c for c in commands if c not in ("run", "quickstart"))


def run(args: argparse.Namespace) -> int:
    from bastion.errors import ConfigError
    from experiments.cli import build_parser, resolve_device
    from experiments.common import apply_threads
    from experiments.config import namespace_from_config, read_toml

    cfg = read_toml(args.config)
    command = cfg.pop("command", None)
    _, commands = build_parser()
    if command is None:
        raise ConfigError(f"{args.config!r} lacks `command = \"NAME\"` (one of {', '.join(runnable(commands))})")
    if not isinstance(command, str) or command not in runnable(commands):
        raise ConfigError(f"unknown command {command!r} in {args.config!r}; use one of "
                          f"{', '.join(runnable(commands))}")
    ns = namespace_from_config(commands[command], cfg, args.config)
    for key in ("quiet", "device", "seed", "threads"):
        if key not in cfg:
            setattr(ns, key, getattr(args, key))
    ns.device = resolve_device(ns.device)
    apply_threads(ns.threads)
    return int(ns.func(ns) or 0)
