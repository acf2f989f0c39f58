"""`bastion sweep`: grids and zips over any command's keys, seeds as an axis, one run directory per
cell, summary with mean and spread, resume, expectations; the CO study as a sweep reproduces the
study runner's numbers (checked on one cell with 2 epochs; the full 30-cell command is in the README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bastion.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny", "command": "train",
    "base": {"dataset": "synthetic", "model": "mlp", "epochs": 1, "batch_size": 32, "monitor": "off"},
    "grid": {"seed": [0, 1]},
    "zip": [{"axis": "method", "labels": ["std", "fgsm"], "objective": ["standard", "fgsm"],
             "param": [[], ["eps=0.1"]]}],
    "summary": {"metrics": ["train_loss", "train_acc"]},
    "expect": [{"where": {"method": "std"}, "metric": "train_acc", "mean_min": 0.0}],
}


def test_cells_are_the_product_of_grid_and_zip():
    from experiments.sweep import parse_sweep

    s = parse_sweep(TINY, "t")
    assert [c.name for c in s.cells] == ["seed-0_method-std", "seed-0_method-fgsm", "seed-1_method-std",
                                         "seed-1_method-fgsm"]
    assert s.cells[1].options == TINY["base"] | {"seed": 0, "objective": "fgsm", "param": ["eps=0.1"]}
    assert s.axes == ("seed", "method")


def test_bad_configs_are_one_line_errors():
    from experiments.sweep import check_cells, parse_sweep

    with pytest.raises(ConfigError, match="unknown key"):
        parse_sweep(TINY | {"bogus": 1}, "t")
    with pytest.raises(ConfigError, match="set in \\[base\\] and swept"):
        parse_sweep(TINY | {"grid": {"epochs": [1, 2]}}, "t")
    with pytest.raises(ConfigError, match="same length"):
        parse_sweep(TINY | {"zip": [{"objective": ["a", "b"], "param": [[]]}]}, "t")
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        check_cells(parse_sweep(TINY | {"grid": {"lrr": [0.1]}}, "t"))
    with pytest.raises(ConfigError, match="'where' names"):
        parse_sweep(TINY | {"expect": [{"where": {"x": 1}, "metric": "m", "mean_min": 0}]}, "t")


def test_summary_lists_each_groups_values_in_seed_order():
    from experiments.sweep import parse_sweep, summarize, summary_markdown

    s = parse_sweep(TINY, "t")
    acc = {(1, "std"): 0.5, (0, "std"): 0.25, (1, "fgsm"): 0.75, (0, "fgsm"): 0.125}
    rows = [{"cell": c.name, "axes": {"seed": str(c.options["seed"]), "method": m},
             "metrics": {"train_acc": acc[(c.options["seed"], m)], "train_loss": 1.0}}
            for c, m in reversed(list(zip(s.cells, ["std", "fgsm", "std", "fgsm"])))]
    summary = summarize(s, rows)
    assert {g["axes"]["method"]: g["stats"]["train_acc"]["values"] for g in summary["groups"]} == {
        "std": [0.25, 0.5], "fgsm": [0.125, 0.75]}
    md = summary_markdown(summary)
    assert "Values per group, in seed order:" in md and "| std | 1 1 | 0.25 0.5 |" in md


def test_sweep_runs_summarizes_and_resumes(tmp_path):
    from experiments.sweep import parse_sweep, run_sweep

    s = parse_sweep(TINY, "t")
    out = tmp_path / "sw"
    summary = run_sweep(s, out, log=lambda m: None)
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(c.name for c in s.cells)
    for c in s.cells:
        assert (out / "cells" / c.name / "model.safetensors").is_file()
        assert (out / "cells" / c.name / "cell.json").is_file()
    groups = {g["axes"]["method"]: g for g in summary["groups"]}
    st = groups["std"]["stats"]["train_acc"]
    assert st["n"] == 2 and st["min"] <= st["mean"] <= st["max"] and st["std"] >= 0
    assert summary["expect"][0]["met"]
    for name in ("summary.md", "summary.json", "report.html", "metrics.json"):
        assert (out / name).is_file()
    assert "±" in (out / "summary.md").read_text()
    before = (out / "summary.json").read_bytes()
    # a finished cell is reused; a cell without its marker (killed) is run again to the same numbers
    (out / "cells" / s.cells[0].name / "cell.json").unlink()
    shutil.rmtree(out / "cells" / s.cells[1].name)
    seen = []
    run_sweep(s, out, log=seen.append)
    assert (out / "summary.json").read_bytes() == before


def test_cli_exit_status_follows_expectations(tmp_path):
    import tomllib  # noqa: F401  (the config below is TOML)

    from experiments.cli import main

    cfg = tmp_path / "s.toml"
    cfg.write_text("""name = "t"
command = "train"
[base]
dataset = "synthetic"
model = "mlp"
epochs = 1
monitor = "off"
[grid]
seed = [0]
[[expect]]
metric = "train_acc"
mean_min = 2.0
""")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert main(["sweep", str(cfg), "--list"]) == 0


def test_co_study_is_the_sweep_config():
    from experiments.co_study import read_config, study_to_sweep
    from experiments.sweep import parse_sweep, read_sweep

    study = parse_sweep(study_to_sweep(read_config(ROOT / "experiments/configs/co_study_digits.toml")), "study")
    sweep = read_sweep(ROOT / "experiments/configs/sweep_co_digits.toml")
    assert study.cells == sweep.cells and study.expect == sweep.expect
    assert len(sweep.cells) == 30


def test_co_sweep_cell_reproduces_the_study_runner(tmp_path):
    """One cell of the CO sweep (FGSM, seed 0, 2 epochs) and the study runner's run give the same curves."""
    import experiments.plugins  # noqa: F401
    from experiments.co_study import CURVE_KEYS, load_data, run_one
    from experiments.config import read_toml
    from experiments.sweep import parse_sweep, run_sweep

    raw = read_toml(ROOT / "experiments/configs/sweep_co_digits.toml")
    raw["base"]["epochs"] = 2
    raw["grid"]["seed"] = [0]
    sweep = parse_sweep(raw, "co")
    cell = "seed-0_method-fgsm"
    summary = run_sweep(sweep, tmp_path / "sweep", only={cell}, threads=1, log=lambda m: None)
    swept = json.loads((tmp_path / "sweep" / "cells" / cell / "metrics.json").read_text())
    hist_sweep = next(s for s in swept["sections"] if s["type"] == "training")["data"]["history"]

    study = read_toml(ROOT / "experiments/configs/co_study_digits.toml")
    study["train"]["epochs"] = 2
    train, test = load_data(study)
    ref = run_one(study, "fgsm", 0, train, test, tmp_path / "study")
    keys = [k for k in CURVE_KEYS if k != "epoch_seconds"]
    assert [{k: r.get(k) for k in keys} for r in hist_sweep] == [{k: r.get(k) for k in keys} for r in ref["history"]]
    row = summary["cells"][0]["metrics"]
    assert row["final_pgd"] == ref["summary"]["final_pgd"] and row["peak_pgd"] == ref["summary"]["peak_pgd"]


@pytest.mark.slow
def test_two_local_workers_give_the_same_summary(tmp_path):
    from experiments.sweep import parse_sweep, run_sweep

    s = parse_sweep(TINY, "t")
    a = run_sweep(s, tmp_path / "one", log=lambda m: None)
    b = run_sweep(s, tmp_path / "two", workers=2, threads=1, log=lambda m: None)
    assert a["cells"] == b["cells"] and a["groups"] == b["groups"]
