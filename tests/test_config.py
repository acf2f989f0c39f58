"""TOML configs: every option of every command can be written in one (built from the parsers),
values are type-checked, and a run's config digest ignores where and how it runs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import build_parser, main
from experiments.commands.run import runnable
from experiments.config import config_keys, namespace_from_config

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = build_parser()[1]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def _one_value(act: argparse.Action):
    """A value (not the default) that the option accepts, as a TOML value."""
    if act.choices is not None:
        return list(act.choices)[-1]
    for candidate in (3, 0.5, "0.1", "cpu", "robustness", "x.safetensors"):
        try:
            if act.type is None:
                return "x.safetensors" if act.dest in ("model", "config", "run_dir") else "some-value"
            act.type(str(candidate))
            return candidate
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
    raise AssertionError(f"no test value for {act.dest}")


def _config_and_argv(parser: argparse.ArgumentParser) -> tuple[dict, list[str]]:
    cfg: dict = {}
    argv: list[str] = []
    for act in parser._actions:
        if isinstance(act, argparse._HelpAction) or act.dest == "help":
            continue
        opt = act.option_strings[-1] if act.option_strings else None
        key = opt[2:].replace("-", "_") if opt else act.dest
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            cfg[key] = True
            argv.append(opt)
        elif isinstance(act, argparse._AppendAction):
            cfg[key] = ["a=1", "b=x"]
            argv += [opt, "a=1", opt, "b=x"]
        elif act.nargs in ("+", "*"):
            v = _one_value(act)
            cfg[key] = [v, v]
            argv += ([opt] if opt else []) + [str(v), str(v)]
        else:
            v = _one_value(act)
            cfg[key] = v
            argv += [opt, str(v)] if opt else [str(v)]
    return cfg, argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_is_expressible_in_toml(command, tmp_path):
    import tomllib

    parser = COMMANDS[command]
    cfg, argv = _config_and_argv(parser)
    text = "".join(f"{k} = {_toml(v)}\n" for k, v in cfg.items())
    parsed = tomllib.loads(text)
    from_toml = vars(namespace_from_config(parser, parsed, "test.toml"))
    from_cli = vars(parser.parse_args(argv))
    assert from_toml == from_cli
    keys = config_keys(parser)
    assert all(k in keys for k in cfg)


def test_runnable_commands_are_the_ones_with_a_parser():
    assert set(runnable(COMMANDS)) >= {"train", "evaluate", "certify", "report"}


def test_several_values_as_list_or_scalar_and_strings_are_not_split():
    p = COMMANDS["certify"]
    ns = namespace_from_config(p, {"model": "runs/a/model.safetensors", "sigma": 0.25}, "t")
    assert ns.model == ["runs/a/model.safetensors"] and ns.sigma == [0.25]
    ns = namespace_from_config(p, {"model": ["a.safetensors", "b.safetensors"], "sigma": [0.25, 0.5]}, "t")
    assert ns.model == ["a.safetensors", "b.safetensors"] and ns.sigma == [0.25, 0.5]


def test_lists_tables_and_flags_convert_like_the_command_line():
    p = COMMANDS["train"]
    ns = namespace_from_config(p, {"param": {"lambda3": 1.5, "variant": "rs", "aaer": False}, "eps": "8/255",
                                   "co_stop": True, "no_cycle_momentum": True, "max": 10}, "t")
    assert ns.param == ["lambda3=1.5", "variant=rs", "aaer=false"] and ns.eps == "8/255"
    assert ns.co_stop is True and ns.cycle_momentum is False and ns.max_examples == 10
    assert namespace_from_config(p, {"cycle_momentum": False}, "t").cycle_momentum is False
    assert namespace_from_config(p, {"lr": 1}, "t").lr == 1.0


def test_help_texts_render_and_say_no_default_none():
    for name, p in COMMANDS.items():
        text = p.format_help()
        assert "default None" not in text, name
    train = COMMANDS["train"].format_help()
    for opt in ("--epochs", "--lr", "--batch-size", "--momentum", "--weight-decay", "--schedule", "--optimizer",
                "--augment", "--threads"):
        block = train.split(f"\n  {opt} ", 1)[1].split("\n  --", 1)[0]
        assert "default" in block, opt
    assert "pgd" in train and "gaussian" in train  # objectives listed from the registry
    assert all(s in COMMANDS["quickstart"].format_help() for s in ("robustness", "aaer", "certification"))


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from experiments.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'attacks', 'certify') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_out_and_execution_options_are_not_in_the_digest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--quiet", "--epochs", "1", "--max", "64", "--threads", "1"]
    assert main(args + ["--out", "rel"]) == 0
    stamp = (tmp_path / "rel" / "config.json").read_text()
    assert "rel" not in json.loads(stamp)["config"].values() and "threads" not in json.loads(stamp)["config"]
    # the same run by an absolute path, with other execution options, and after a move: all resume
    assert main(args[:-1] + ["2", "--device", "cpu", "--out", str(tmp_path / "rel")]) == 0
    (tmp_path / "rel").rename(tmp_path / "moved")
    assert main(args + ["--out", str(tmp_path / "moved")]) == 0
    assert capsys.readouterr().err == ""
    # a different result-determining option is refused
    assert main(args + ["--lr", "0.01", "--out", "moved"]) == 2
    assert "different config" in capsys.readouterr().err
    # so is another global batch (the stamp holds the global batch, --batch-size x processes)
    assert main(args + ["--batch-size", "32", "--out", "moved"]) == 2
    assert "different config" in capsys.readouterr().err


def test_run_config_applies_device_auto_and_cli_common_options(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'command = "train"\ndevice = "auto"\nepochs = 1\nmax = 64\nthreads = 1\nquiet = true\n'
                   f'out = "{tmp_path / "run"}"\n')
    assert main(["run", str(cfg)]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_threads_default_and_option(monkeypatch):
    import torch

    from experiments.common import apply_threads, default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.getloadavg", lambda: (99.0, 0.0, 0.0))
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
