"""TOML run configs: ``command = "NAME"`` plus that command's options as keys.

    command = "train"
    dataset = "digits"
    objective = "pgd"
    eps = "0.1"

Keys are the long option names of the subcommand with ``-`` or ``_``. Every option can be
written: flags as booleans (``quiet = true``), options with several values (``certify``'s
``model``, ``sigma``) as a list or a single value, repeatable ``K=V`` options (``param``,
``attack-param``) as a list of strings or a table. Values are type-checked like the command
line does; an unknown key or a wrong type is a `ConfigError` that names the key."""

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
        return tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None


def config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> action: each long option name (``--data-root`` -> ``data_root``) and each dest."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in ("help", "version") or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        out[a.dest] = a
        for opt in a.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = a
    return out


_dests = config_keys  # the former private name


def _is_flag(act: argparse.Action) -> bool:
    return isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _is_append(act: argparse.Action) -> bool:
    return isinstance(act, argparse._AppendAction)


def _is_multi(act: argparse.Action) -> bool:
    return act.nargs in ("+", "*") or isinstance(act.nargs, int) and act.nargs > 1


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _scalar(act: argparse.Action, key: str, value: Any, where: str) -> Any:
    """One value of option ``act``, checked and converted like the command line would."""
    if isinstance(value, (bool, list, dict)) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"key {key!r} in {where} takes a single value, got {_type_name(value)} {value!r}")
    conv = act.type
    if conv is None:
        value = str(value)
    else:
        if conv is int and isinstance(value, float):
            raise ConfigError(f"key {key!r} in {where} takes an integer, got {value!r}")
        try:
            value = conv(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"bad value {value!r} for key {key!r} in {where}: {exc}") from None
    if act.choices is not None and value not in act.choices:
        raise ConfigError(f"bad value {value!r} for key {key!r} in {where}: choose from {list(act.choices)}")
    return value


def convert_value(act: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A TOML value for option ``act``, as parse_args would have stored it.

    A ``--no-X`` flag written by its option name (``no_cycle_momentum = true``) is inverted; written
    by its destination (``cycle_momentum = false``) it is taken as is."""
    if _is_flag(act):
        if not isinstance(value, bool):
            raise ConfigError(f"key {key!r} in {where} is a flag: write true or false, not {value!r}")
        by_dest = key.replace("-", "_") == act.dest
        return value if isinstance(act, argparse._StoreTrueAction) or by_dest else not value
    if _is_append(act):
        if isinstance(value, dict):
            value = [f"{k}={_literal(v)}" for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        return [_scalar(act, key, v, where) for v in items]
    if _is_multi(act):
        items = value if isinstance(value, list) else [value]
        if not items and act.nargs == "+":
            raise ConfigError(f"key {key!r} in {where} needs at least one value")
        return [_scalar(act, key, v, where) for v in items]
    if isinstance(value, list):
        if act.type not in (None, str):
            raise ConfigError(f"key {key!r} in {where} takes a single value, got a list {value!r}")
        # a list for a comma-separated option (eps = ["8/255", "16/255"], attacks = ["pgd", "apgd-ce"])
        return _scalar(act, key, ",".join(str(_literal(v)) for v in value), where)
    return _scalar(act, key, value, where)


def namespace_from_config(parser: argparse.ArgumentParser, cfg: dict[str, Any], where: str) -> argparse.Namespace:
    """Defaults of ``parser`` overridden by ``cfg``; values are checked and converted per option."""
    actions = config_keys(parser)
    values: dict[str, Any] = {}
    for key, value in cfg.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(actions))}")
        act = actions[dest]
        values[act.dest] = convert_value(act, key, value, where)
    for a in parser._actions:
        if a.required and a.dest not in values:
            name = a.option_strings[-1][2:] if a.option_strings else a.dest
            raise ConfigError(f"{where} lacks the required key {name!r}")
    ns = parser.parse_args(_required_stub(parser, values))
    for dest, value in values.items():
        setattr(ns, dest, value)
    return ns


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _required_stub(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """Required options and positionals with placeholder values (overwritten right after parsing)."""
    out: list[str] = []
    for a in parser._actions:
        if not (a.required or (not a.option_strings and a.nargs is None)):
            continue
        val = values.get(a.dest)
        if val is None:
            raise ConfigError(f"config lacks the required key {a.dest!r}")
        first = val[0] if isinstance(val, list) else val
        stub = [str(first)]
        out += [a.option_strings[-1], *stub] if a.option_strings else stub
    return out


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict with values parsed as bool/int/float/fraction/str."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"bad parameter {item!r}: use KEY=VALUE")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"bad parameter {item!r}: the key is empty; use KEY=VALUE")
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
        from bastion.errors import BastionError
        from bastion.threat import parse_eps

        try:
            return parse_eps(v)
        except BastionError:
            return v
    return v


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The TOML-ready config (without ``command``) that reproduces ``args`` for ``parser``."""
    out: dict[str, Any] = {}
    for a in parser._actions:
        if a.dest in ("help", "version", "func") or isinstance(a, argparse._HelpAction):
            continue
        v = getattr(args, a.dest, None)
        if v is None or v == a.default and not a.required:
            continue
        key = a.option_strings[-1][2:].replace("-", "_") if a.option_strings else a.dest
        if isinstance(a, argparse._StoreFalseAction):
            v = not v
        out[key] = v
    return out
