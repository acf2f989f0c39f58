"""Leaderboard entries of kind ``detector`` (classifier + Mahalanobis detector): the detector fitted
once on the training split and reused, RobustBench fields plus the detector fields, the metric
definitions checked against the records, a saved detector given by path, one-line config errors,
and a killed run resumed to identical JSON (slow). Tiny sizes (1 epoch, 12 examples, 3 steps)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_when_written

from bastion.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tinydet"
dataset = "digits"
threats = ["linf:0.1"]
protocol = "fast"
steps = 3
max = 12
batch_size = 4
[train.std]
objective = "standard"
epochs = 1
[[entry]]
name = "maha"
train = "std"
defense = "detector"
detector = { kind = "mahalanobis", fpr = 0.05, calibration = 40, pool = 60 }
"""


def outputs(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("model_info/**/*.json")) + [out / "leaderboard.json"] + sorted(out.glob("site/*.html"))
    return {str(f.relative_to(out)): f.read_bytes() for f in files}


def run(folder: Path, text: str, out: Path):
    from experiments.leaderboard import Execution, read_config, run_leaderboard

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lb.toml").write_text(text)
    return run_leaderboard(read_config(folder / "lb.toml"), out, Execution(quiet=True), log=lambda m: None)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lbdet")
    t0 = time.perf_counter()
    doc = run(folder, TINY, folder / "out")
    return {"folder": folder, "out": folder / "out", "doc": doc, "seconds": time.perf_counter() - t0}


def test_detector_entry_has_robustbench_and_detector_fields(board):
    from experiments.leaderboard import validate_entry

    f = board["out"] / "model_info" / "digits" / "Linf" / "maha.json"
    d = json.loads(f.read_text())
    validate_entry(d, str(f))
    assert isinstance(d["clean_acc"], float) and isinstance(d["autoattack_acc"], float)
    assert d["autoattack_acc"] <= d["clean_acc"] and "detector" in d["footnote"]
    b = d["bastion"]
    assert b["defense"] == "detector"
    assert b["attacks"] == ["apgd-ce", "apgd-t", "detector-aware-apgd-margin", "detector-aware-apgd-selective",
                            "detector-aware-pgd-selective"]
    det = b["detector"]
    assert det["kind"] == "mahalanobis" and det["path"] == "detectors/maha.json" and det["fpr_target"] == 5.0
    assert det["calibration_n"] == 40 and det["calibration_fpr"] <= 5.0
    for key in ("threshold", "test_fpr", "classifier_clean_acc"):
        assert isinstance(det[key], float), key
    assert set(det["per_attack_detection"]) == set(b["attacks"])
    assert (board["out"] / "detectors" / "maha.safetensors").is_file()


def test_metrics_follow_the_records(board):
    """clean = accepted and correct; robust = no attack output misclassified AND undetected."""
    run_dir = board["out"] / "runs" / "maha" / "linf-0.1"
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines() if x.strip()]
    clean = {r["index"]: r for r in recs if r["threat"] is None}
    adv = {r["index"]: r for r in recs if r["threat"] == "linf:0.1"}
    assert len(clean) == len(adv) == 12
    for i, r in adv.items():
        c = clean[i]
        assert c["correct"] == (c["clean_pred"] == c["label"] and not c["clean_flagged"])
        wins = [o for o in r["outcomes"].values() if o["pred"] != r["label"] and not o["detected"]]
        assert r["correct"] == (c["correct"] and not wins)
        if c["clean_flagged"]:
            assert c["pred"] == -1 and not r["outcomes"]                     # a rejected input is not attacked
    d = json.loads((board["out"] / "model_info/digits/Linf/maha.json").read_text())
    assert d["clean_acc"] == round(100 * sum(c["correct"] for c in clean.values()) / 12, 2)
    assert d["autoattack_acc"] == round(100 * sum(r["correct"] for r in adv.values()) / 12, 2)
    assert d["bastion"]["detector"]["test_fpr"] == round(100 * sum(c["clean_flagged"] for c in clean.values()) / 12, 2)
    report = (run_dir / "report.md").read_text()
    assert "detection rate" in report and "misclassified AND not detected" in report


def test_rerun_reuses_the_detector_and_writes_same_bytes(board):
    before = outputs(board["out"])
    det = board["out"] / "detectors" / "maha.safetensors"
    stamp = det.stat().st_mtime_ns
    run(board["folder"], TINY, board["out"])
    assert det.stat().st_mtime_ns == stamp
    assert outputs(board["out"]) == before


def test_saved_detector_by_path_gives_the_same_numbers(board):
    """The fitted detector given as a saved file (its own threshold) on the same checkpoint."""
    out = board["out"]
    text = TINY.split("[train.std]")[0] + f"""
[[entry]]
name = "maha"
checkpoint = "{out / 'train' / 'std' / 'model.safetensors'}"
defense = "detector"
detector = {{ path = "{out / 'detectors' / 'maha'}" }}
"""
    folder = board["folder"] / "by_path"
    run(folder, text, folder / "out")
    a = json.loads((out / "model_info/digits/Linf/maha.json").read_text())
    b = json.loads((folder / "out/model_info/digits/Linf/maha.json").read_text())
    assert (a["clean_acc"], a["autoattack_acc"]) == (b["clean_acc"], b["autoattack_acc"])
    assert a["bastion"]["detector"]["threshold"] == b["bastion"]["detector"]["threshold"]
    assert b["bastion"]["detector"]["path"] == str(out / "detectors" / "maha")


def test_detector_config_errors_are_one_line(tmp_path):
    from experiments.leaderboard import read_config, run_leaderboard
    from experiments.leaderboard.run import Execution

    def check(text, match, name):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "lb.toml").write_text(text)
        with pytest.raises(ConfigError, match=match) as exc:
            run_leaderboard(read_config(folder / "lb.toml"), folder / "out", Execution(), log=lambda m: None)
        assert "\n" not in str(exc.value)

    check(TINY.replace("fpr = 0.05", "fpr = 0.05, bogus = 1"), "unknown key", "a")
    check(TINY.replace("fpr = 0.05", "fpr = 1.5"), "fpr must be", "b")
    check(TINY.replace('defense = "detector"', 'defense = "plain"'), "needs defense = \"detector\"", "c")
    check(TINY.replace('kind = "mahalanobis", fpr = 0.05, calibration = 40, pool = 60', 'path = "nope"'),
          "not found", "d")
    check(TINY.replace('kind = "mahalanobis", fpr = 0.05, calibration = 40, pool = 60', 'path = "x", fpr = 0.1'),
          "keeps its own", "e")


@pytest.mark.slow
def test_killed_and_resumed_to_identical_json(board):
    import shutil

    out = board["folder"] / "out_killed"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(board["out"] / "train", out / "train")      # training and fitting are not under test here
    shutil.copytree(board["out"] / "detectors", out / "detectors")
    cmd = [sys.executable, "-m", "experiments.cli", "leaderboard", str(board["folder"] / "lb.toml"), "--out", str(out),
           "--quiet", "--device", "cpu", "--threads", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    kill_when_written(cmd, out / "runs" / "maha" / "linf-0.1" / "records.jsonl", ROOT, env)
    assert not (out / "leaderboard.json").exists()
    from experiments.cli import main

    assert main(cmd[3:]) == 0   # the rerun, in this process (as the reference was)
    assert outputs(out) == outputs(board["out"])


@pytest.mark.slow
def test_two_local_workers_give_identical_json(board):
    import shutil

    from experiments.leaderboard import Execution, read_config, run_leaderboard

    out = board["folder"] / "out_workers"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(board["out"] / "train", out / "train")
    run_leaderboard(read_config(board["folder"] / "lb.toml"), out, Execution(quiet=True, workers=2, shard_size=4),
                    log=lambda m: None)
    assert outputs(out) == outputs(board["out"])


@pytest.mark.slow
def test_standard_protocol_runs_autoattack_then_the_detector_aware_attacks(board):
    import shutil

    folder = board["folder"] / "standard"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "out").mkdir(parents=True)
    shutil.copytree(board["out"] / "train", folder / "out" / "train")
    run(folder, TINY.replace('protocol = "fast"', 'protocol = "standard"').replace("max = 12", "max = 8"),
        folder / "out")
    d = json.loads((folder / "out/model_info/digits/Linf/maha.json").read_text())
    assert d["bastion"]["attacks"] == ["autoattack", "detector-aware-apgd-margin", "detector-aware-apgd-selective",
                                       "detector-aware-pgd-selective"]
    assert all(k.startswith(("autoattack/", "detector-aware-")) for k in d["bastion"]["attack_attribution"])
    assert d["autoattack_acc"] <= d["clean_acc"]
