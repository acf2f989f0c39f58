"""TOML run configs: ``command = "NAME"`` plus that command's options as keys.

    command = "train"
    dataset = "digits"
    objective = "pgd"
    eps = "0.1"

Keys are the long option names of the subcommand with ``-`` or ``_``; an unknown key is a
`ConfigError` that names it."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> action: each long option name (``--data-root`` -> ``data_root``) and each dest."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in ("help", "version"):
            continue
        out[a.dest] = a
        for opt in a.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = a
    return out


def namespace_from_config(parser: argparse.ArgumentParser, cfg: dict[str, Any], where: str) -> argparse.Namespace:
    """Defaults of ``parser`` overridden by ``cfg``; values are converted with the option's type."""
    ns = parser.parse_args([a for a in _required_stub(parser, cfg)])
    actions = _dests(parser)
    for key, value in cfg.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(actions))}")
        act = actions[dest]
        dest = act.dest
        if isinstance(value, list) and act.nargs is None and not isinstance(act, argparse._AppendAction):
            value = ",".join(str(v) for v in value)
        if isinstance(act, argparse._AppendAction) and isinstance(value, dict):
            value = [f"{k}={_literal(v)}" for k, v in value.items()]
        elif isinstance(act, argparse._AppendAction) and not isinstance(value, list):
            value = [value]
        elif act.type is not None and not isinstance(value, bool) and not isinstance(value, list):
            try:
                value = act.type(str(value)) if act.type in (int, float, str) else act.type(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad value {value!r} for key {key!r} in {where}: {exc}") from None
        if act.choices is not None and value not in act.choices:
            raise ConfigError(f"bad value {value!r} for key {key!r} in {where}: choose from {list(act.choices)}")
        setattr(ns, dest, value)
    return ns


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _required_stub(parser: argparse.ArgumentParser, cfg: dict[str, Any]) -> list[str]:
    """Positional/required arguments must be present for parse_args; take them from cfg."""
    out: list[str] = []
    for a in parser._actions:
        if a.required or (not a.option_strings and a.nargs is None):
            key = a.dest
            val = cfg.get(key, cfg.get(key.replace("_", "-")))
            if val is None:
                raise ConfigError(f"config lacks the required key {key!r}")
            if a.option_strings:
                out += [a.option_strings[-1], str(val)]
            else:
                out.append(str(val))
    return out


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict with values parsed as bool/int/float/fraction/str."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"bad parameter {item!r}: use KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_value(v.strip())
    return out


def parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if "/" in v:
        from bastion.threat import parse_eps

        try:
            return parse_eps(v)
        except Exception:
            return v
    return v
