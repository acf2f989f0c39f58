"""End-to-end CLI tests: one-line user errors, resume after SIGKILL, TOML configs, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import pausing_env, wait_for_pause

from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments", *args], cwd=cwd, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_at(args: list[str], log: Path, at_least: int, cwd: Path, meanwhile: Callable[[], None]) -> int:
    """Start ``bastion *args`` in a child process, do ``meanwhile()`` here while it runs, then SIGKILL the
    child once an append has left ``log`` with ``at_least`` lines (the run pauses right there,
    `conftest.pausing_env`); returns the log's line count at the kill."""
    proc = start(*args, cwd=cwd, env=pausing_env(_env(), log, at_least))
    paused = failure = None
    try:
        meanwhile()
        try:
            paused = wait_for_pause(proc, log)
        except AssertionError as exc:
            failure = str(exc)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert failure is None, f"{failure}: {err[-3000:]}"
    assert paused == proc.pid
    return lines(log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small CNN trained for 2 epochs on 400 digits through the CLI (no test here needs it accurate)."""
    d = tmp_path_factory.mktemp("cli")
    assert main(["train", "--quiet", "--epochs", "2", "--max", "400", "--threads", "1", "--out", str(d / "std")]) == 0
    assert (d / "std" / "model.safetensors").is_file() and (d / "std" / "report.html").is_file()
    return d


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bastion: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_user_errors_are_one_line(tmp_path, capsys, trained):
    model = str(trained / "std" / "model.safetensors")
    # unknown dataset
    one_line_error(capsys, ["train", "--quiet", "--dataset", "nope", "--out", str(tmp_path / "t")], "nope")
    one_line_error(capsys, ["evaluate", "--quiet", "--model", model, "--dataset", "nope",
                            "--out", str(tmp_path / "a")], "unknown dataset", "nope")
    # missing data file
    (tmp_path / "mnist").mkdir()
    one_line_error(capsys, ["evaluate", "--quiet", "--model", model, "--dataset", "mnist", "--data-root",
                            str(tmp_path / "mnist"), "--out", str(tmp_path / "b")], "t10k-images-idx3-ubyte")
    # bad threat model
    one_line_error(capsys, ["evaluate", "--quiet", "--model", model, "--eps", "8/zz", "--out", str(tmp_path / "c")],
                   "epsilon")
    # pickle checkpoint
    torch.save({"w": torch.zeros(2)}, tmp_path / "evil.safetensors")
    (tmp_path / "evil.json").write_text((trained / "std" / "model.json").read_text())
    one_line_error(capsys, ["evaluate", "--quiet", "--model", str(tmp_path / "evil.safetensors"),
                            "--out", str(tmp_path / "d")], "pickle")
    # corrupt safetensors (truncated)
    data = (trained / "std" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.json").write_text((trained / "std" / "model.json").read_text())
    one_line_error(capsys, ["evaluate", "--quiet", "--model", str(tmp_path / "cut.safetensors"),
                            "--out", str(tmp_path / "e")], "cut.safetensors")


def test_images_outside_unit_range_are_rejected(trained):
    from bastion.checkpoints import load_checkpoint
    from bastion.data import load_dataset
    from bastion.errors import DataError
    from bastion.evaluate import CleanProbe, evaluate_model

    model, _ = load_checkpoint(trained / "std" / "model.safetensors")
    ds = load_dataset("digits", "test", num_examples=8)
    ds.images = ds.images * 255  # a classic mistake: 0..255 pixels
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        evaluate_model(model, ds, [CleanProbe()], trained / "bad-range", {"x": 1})


@pytest.mark.slow
def test_evaluate_killed_midway_resumes_to_identical_metrics(trained):
    model = str(trained / "std" / "model.safetensors")
    n = 64
    args = ["evaluate", "--quiet", "--model", model, "--eps", "0.05,0.1", "--steps", "5", "--batch-size", "8",
            "--max", str(n), "--threads", "1"]

    def reference() -> None:   # the uninterrupted run, in this process while the killed one runs
        assert main([*args, "--out", str(trained / "full")]) == 0

    at_kill = kill_at([*args, "--out", "killed"], trained / "killed" / "records.jsonl", n + 20, trained, reference)
    total = lines(trained / "full" / "records.jsonl")
    assert total == 3 * n
    assert n + 20 <= at_kill < 2 * n   # killed inside the first attack's probe, clean all recorded
    assert main([*args, "--out", str(trained / "killed")]) == 0   # the rerun, in this process
    assert (trained / "killed" / "metrics.json").read_bytes() == (trained / "full" / "metrics.json").read_bytes()
    assert lines(trained / "killed" / "records.jsonl") == total


@pytest.mark.slow
def test_train_killed_midway_resumes_from_last_epoch(tmp_path, capsys):
    from safetensors.torch import load_file

    args = ["train", "--objective", "pgd", "--eps", "0.1", "--steps", "3", "--epochs", "4", "--max", "256",
            "--seed", "3", "--threads", "1"]

    def reference() -> None:   # the uninterrupted run, in this process while the killed one runs
        assert main([*args, "--quiet", "--out", str(tmp_path / "ref")]) == 0

    log = tmp_path / "run" / "train_log.jsonl"
    done = kill_at([*args, "--quiet", "--out", "run"], log, 2, tmp_path, reference)
    assert done == 2   # epochs 0 and 1 committed, the run stopped before epoch 2
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run")]) == 0   # the rerun, in this process
    assert f"resuming from epoch {done}" in capsys.readouterr().out
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in map(json.loads, log.read_text().splitlines())] == list(range(4))


def test_toml_config_and_unknown_key(tmp_path, capsys, trained):
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'command = "evaluate"\nmodel = "{trained / "std" / "model.safetensors"}"\neps = "0.1"\n'
                   f'steps = 2\nmax = 20\nout = "{tmp_path / "cfgrun"}"\n')
    assert main(["run", "--quiet", str(cfg)]) == 0
    doc = json.loads((tmp_path / "cfgrun" / "metrics.json").read_text())
    assert doc["schema_version"] == 1 and doc["sections"][0]["data"]["clean"]["n"] == 20
    bad = tmp_path / "bad.toml"
    bad.write_text('command = "evaluate"\nmodel = "m"\nepss = "0.1"\n')
    one_line_error(capsys, ["run", str(bad)], "unknown key 'epss'")


def test_report_command_rewrites_html(trained, capsys):
    (trained / "std" / "report.html").unlink()
    assert main(["report", "--quiet", str(trained / "std")]) == 0
    html = (trained / "std" / "report.html").read_text()
    assert "<table>" in html or "data:image/png;base64" in html
