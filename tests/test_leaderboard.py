"""`bastion leaderboard`: four digits entries (standard, PGD-AT, single-step AT, Gaussian-smoothed)
from one config, RobustBench entry fields, published rows, resume after SIGKILL and 2 workers
giving the same bytes. Tiny sizes (1 epoch, 12 examples, few attack steps)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_when_written

from bastion.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
dataset = "digits"
threats = ["linf:0.1"]
curve_eps = { linf = [0.05, 0.2] }
protocol = "fast"
steps = 3
max = 12
batch_size = 4
published = "published"
[train.std]
objective = "standard"
epochs = 1
[train.pgd]
objective = "pgd"
eps = "0.1"
steps = 2
epochs = 1
[train.fgsm]
objective = "fgsm_rs"
eps = "0.1"
epochs = 1
monitor = "off"
[train.gauss]
objective = "gaussian"
sigma = 0.25
epochs = 1
[[entry]]
name = "standard"
train = "std"
[[entry]]
name = "pgd-at"
train = "pgd"
[[entry]]
name = "fgsm-rs"
train = "fgsm"
[[entry]]
name = "gauss"
train = "gauss"
defense = "smoothed"
sigma = 0.25
num_noise = 2
eot_iter = 2
certify = { n0 = 10, n = 40, alpha = 0.01 }
"""

PUBLISHED = {"link": "https://arxiv.org/abs/0000.00000", "name": "Some Published Model", "authors": "A. Author",
             "additional_data": False, "number_forward_passes": 1, "dataset": "cifar10", "venue": "ICML 2099",
             "architecture": "WideResNet-28-10", "eps": "8/255", "clean_acc": "89.69", "reported": "59.53",
             "autoattack_acc": "59.53", "unreliable": False, "footnote": None}


def write_config(folder: Path, text: str = TINY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pub = folder / "published" / "cifar10" / "Linf"
    pub.mkdir(parents=True, exist_ok=True)
    (pub / "Published2099.json").write_text(json.dumps(PUBLISHED))
    cfg = folder / "lb.toml"
    cfg.write_text(text)
    return cfg


def outputs(out: Path) -> dict[str, bytes]:
    """Every JSON and HTML the leaderboard writes, by relative path."""
    files = sorted(out.glob("model_info/**/*.json")) + [out / "leaderboard.json"] + sorted(out.glob("site/*.html"))
    return {str(f.relative_to(out)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    from experiments.leaderboard import Execution, read_config, run_leaderboard

    folder = tmp_path_factory.mktemp("lb")
    cfg = read_config(write_config(folder))
    out = folder / "out"
    t0 = time.perf_counter()
    doc = run_leaderboard(cfg, out, Execution(quiet=True), log=lambda m: None)
    return {"folder": folder, "out": out, "doc": doc, "seconds": time.perf_counter() - t0}


def test_four_entries_validate_as_robustbench(board):
    from experiments.leaderboard import validate_entry

    out = board["out"]
    files = sorted((out / "model_info" / "digits" / "Linf").glob("*.json"))
    assert [f.stem for f in files] == ["fgsm-rs", "gauss", "pgd-at", "standard"]
    for f in files:
        d = json.loads(f.read_text())
        validate_entry(d, str(f))
        assert isinstance(d["clean_acc"], float) and isinstance(d["autoattack_acc"], float)
        assert d["autoattack_acc"] <= d["clean_acc"]
        assert d["eps"] == "0.1" and d["dataset"] == "digits"
        b = d["bastion"]
        assert b["source"] == "local" and b["threat_model"] == "Linf" and len(b["config_digest"]) == 16
        assert set(b["per_class_clean_acc"]) == {str(k) for k in range(10)}
        assert [c["eps"] for c in b["robust_acc_vs_eps"]] == [0.0, 0.05, 0.1, 0.2]
        assert sum(b["attack_attribution"].values()) <= b["n_examples"]
    gauss = json.loads((out / "model_info/digits/Linf/gauss.json").read_text())
    assert gauss["bastion"]["attacks"] == ["smoothadv", "eot-apgd"]
    assert gauss["number_forward_passes"] == 2
    assert gauss["bastion"]["certified"]["radius_l2"] == pytest.approx(0.8)   # 0.1 * sqrt(64)
    plain = json.loads((out / "model_info/digits/Linf/standard.json").read_text())
    assert plain["bastion"]["attacks"] == ["apgd-ce", "apgd-t"] and plain["number_forward_passes"] == 1


def test_published_rows_are_marked_and_numeric(board):
    pub = board["doc"]["published"]
    assert len(pub) == 1 and pub[0]["source"] == "published"
    assert pub[0]["clean_acc"] == 89.69 and pub[0]["autoattack_acc"] == 59.53 and pub[0]["norm"] == "linf"
    index = (board["out"] / "site" / "index.html").read_text()
    assert "published (RobustBench)" in index and "Some Published Model" in index
    assert "http://" not in index.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external assets
    for name in ("standard", "pgd-at", "fgsm-rs", "gauss"):
        assert f'href="{name}-linf-0.1.html"' in index
        assert (board["out"] / "site" / f"{name}-linf-0.1.html").is_file()


def test_rerun_reuses_everything_and_writes_same_bytes(board):
    from experiments.leaderboard import Execution, read_config, run_leaderboard

    before = outputs(board["out"])
    t0 = time.perf_counter()
    run_leaderboard(read_config(board["folder"] / "lb.toml"), board["out"], Execution(quiet=True), log=lambda m: None)
    assert time.perf_counter() - t0 < board["seconds"]
    assert outputs(board["out"]) == before


def _fresh_with_trained(board, name: str) -> Path:
    """A new output folder that reuses the module run's train steps (training is not under test)."""
    out = board["folder"] / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(board["out"] / "train", out / "train")
    return out


@pytest.mark.slow
def test_two_local_workers_give_identical_json(board):
    """2 workers on one entry of each defense kind (plain, smoothed: the plain entries differ only in their
    weights; each entry costs a process pool's start-up): the same entry JSON and pages, byte for byte."""
    from experiments.leaderboard import Execution, read_config, run_leaderboard

    head, *entries = TINY.split("[[entry]]")
    keep = [e for e in entries if 'name = "standard"' in e or 'name = "gauss"' in e]
    assert len(keep) == 2
    cfg = board["folder"] / "lb_two_kinds.toml"
    cfg.write_text("[[entry]]".join([head, *keep]))
    out = _fresh_with_trained(board, "out_workers")
    run_leaderboard(read_config(cfg), out, Execution(quiet=True, workers=2, shard_size=4), log=lambda m: None)
    got, want = outputs(out), outputs(board["out"])
    names = ["model_info/digits/Linf/standard.json", "model_info/digits/Linf/gauss.json",
             "site/standard-linf-0.1.html", "site/gauss-linf-0.1.html"]
    assert [n for n in names if n in got] == names
    assert {n: got[n] for n in names} == {n: want[n] for n in names}


@pytest.mark.slow
def test_killed_and_resumed_to_identical_json(board):
    out = _fresh_with_trained(board, "out_killed")
    cmd = [sys.executable, "-m", "experiments.cli", "leaderboard", str(board["folder"] / "lb.toml"), "--out", str(out),
           "--quiet", "--device", "cpu", "--threads", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    kill_when_written(cmd, out / "runs" / "pgd-at" / "linf-0.1" / "records.jsonl", ROOT, env)   # in the 2nd entry
    assert not (out / "leaderboard.json").exists()
    from experiments.cli import main

    assert main(cmd[3:]) == 0   # the rerun, in this process (as the reference was)
    assert outputs(out) == outputs(board["out"])


def test_config_errors_are_one_line(tmp_path):
    from experiments.leaderboard import read_config, run_leaderboard
    from experiments.leaderboard.run import Execution

    with pytest.raises(ConfigError, match="unknown key"):
        read_config(write_config(tmp_path / "a", TINY + "\nbogus = 1\n"))
    with pytest.raises(ConfigError, match="exactly one of 'train'"):
        read_config(write_config(tmp_path / "b", TINY.replace('train = "std"', 'checkpoint = "x"\ntrain = "std"')))
    with pytest.raises(ConfigError, match="not a \\[train"):
        read_config(write_config(tmp_path / "c", TINY.replace('train = "gauss"', 'train = "nope"')))
    det = TINY.split("[[entry]]")[0] + ('[[entry]]\nname = "det"\ntrain = "std"\ndefense = "detector"\n'
                                        'detector = { kind = "eps-deep" }\n')
    with pytest.raises(ConfigError, match="cannot be fitted here"):     # EPS-AD detectors come saved ('path')
        run_leaderboard(read_config(write_config(tmp_path / "d", det)), tmp_path / "d" / "out", Execution(),
                        log=lambda m: None)


@pytest.mark.parametrize("name", ["leaderboard_digits.toml", "leaderboard_digits_fast.toml"])
def test_shipped_config_parses(name):
    from experiments.leaderboard import read_config

    cfg = read_config(ROOT / "experiments" / "configs" / name)
    assert [e.defense for e in cfg.entries] == ["plain", "plain", "plain", "smoothed", "detector"]
    assert {e.train for e in cfg.entries} == set(cfg.train)
