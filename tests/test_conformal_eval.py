"""The conformal probe and fold through the common evaluator (certify.conformal_eval,
certify.conformal_fold): records, splits, independence of attack and scoring noise, resume, and
folds as pure functions of records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bastion.data import load_dataset
from bastion.errors import ConfigError
from bastion.folds import FoldContext, fold_records
from bastion.models import create_model
from bastion.records import RunDir, parse_record
from bastion.report import renderer
from certify.conformal_eval import ConformalProbe, ConformalSettings, plan_splits, references_for, run_conformal
from certify.conformal_fold import METHODS, split_positions

SETTINGS = ConformalSettings(n_mc=16, attack_noise=2, attack_steps=2, splits=5, chunk=16, eps=0.25, sigma=0.25)


@pytest.fixture(scope="module")
def model_and_data():
    data = load_dataset("synthetic", "test", num_examples_total=80)
    torch.manual_seed(0)
    model = create_model("mlp", 4, 1, 8, hidden=(16,)).eval()
    return model, data


def test_run_records_and_fold(model_and_data, tmp_path):
    model, data = model_and_data
    doc = run_conformal({"m": model}, data, tmp_path / "r", SETTINGS, holdout=20, write_reports=True)
    recs = [parse_record(r) for r in RunDir(tmp_path / "r").records.unique()]
    assert len(recs) == 80 and {r.kind for r in recs} == {"conformal"}
    split = {r.index: r.split for r in recs}
    assert sorted(np.unique(list(split.values()), return_counts=True)[1].tolist()) == [20, 30, 30]
    for r in recs:
        assert set(r.mean) == {"hps", "aps", "ptt-hps", "ptt-aps"} and len(r.mean["hps"]) == 4
        assert (r.adv_mean is None) == (r.split == "holdout")
        assert all(0 <= v <= 1 for v in r.mean["aps"])
    sec = next(s for s in doc["sections"] if s["type"] == "conformal")["data"]
    res = sec["probes"][0]["results"]
    assert [(x["score"], x["method"]) for x in res][:4] == [("hps", m) for m in METHODS]
    plus = [x for x in res if x["method"] == "rscp+"]
    # N = 16: b_H = 0.66, so tau+ + b_H >= 1 and RSCP+ is the full label set (the trivial baseline)
    assert all(x["adv"]["size"]["mean"] == 4 and x["adv"]["coverage"]["min"] == 1 for x in plus)
    md, figs = renderer("conformal")(next(s for s in doc["sections"] if s["type"] == "conformal"))
    assert "rscp+" in md and "not provably valid" in md
    assert (tmp_path / "r" / "report.md").is_file()
    # a rerun resumes (nothing recomputed) and writes the same metrics
    before = (tmp_path / "r" / "metrics.json").read_text()
    run_conformal({"m": model}, data, tmp_path / "r", SETTINGS, holdout=20, write_reports=False)
    assert (tmp_path / "r" / "metrics.json").read_text() == before


def test_fold_is_a_pure_function_of_records_and_split_zero_is_declared(model_and_data, tmp_path):
    model, data = model_and_data
    run_conformal({"m": model}, data, tmp_path / "r", SETTINGS, holdout=20, write_reports=False)
    rows = RunDir(tmp_path / "r").records.unique()
    desc = {"m": {"kind": "conformal", "scores": ["hps", "aps", "ptt-hps", "ptt-aps"], "splits": 5, "split_seed": 0,
                  "alpha": 0.1, "beta": 0.001, "eps": 0.25, "sigma": 0.25, "n_mc": 16}}
    ctx = FoldContext(class_names=data.class_names, probes=desc)
    a, b = fold_records(rows, ctx), fold_records(list(reversed(rows)), ctx)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    typed = sorted((parse_record(r) for r in rows), key=lambda r: r.index)
    split = np.asarray([r.split for r in typed])
    cal, test = split_positions(split, False, 0, 0)
    assert set(split[cal]) == {"calibration"} and set(split[test]) == {"test"}
    cal1, test1 = split_positions(split, True, 3, 0)
    assert len(cal1) == 50 and len(test1) == 30 and not set(cal1) & set(test1)


def test_attack_and_scoring_noise_are_independent(model_and_data):
    """The clean scores do not depend on the attack's settings: separate child generators."""
    model, data = model_and_data
    plan = plan_splits(data, 20)
    refs = references_for(model, data, plan, SETTINGS, 0, "m")
    x, y, idx = data.images[:16], data.labels[:16], data.indices[:16]
    out = []
    for steps in (1, 3):
        s = ConformalSettings(**{**SETTINGS.__dict__, "attack_steps": steps})
        probe = ConformalProbe("m", model, s, plan.split_of, refs)
        out.append(probe.run(model, x, y, idx, torch.Generator().manual_seed(5)))
    for a, b in zip(*out):
        assert a["mean"] == b["mean"] and a["bound"] == b["bound"]
    assert any(a.get("adv_mean") != b.get("adv_mean") for a, b in zip(*out))


def test_settings_errors():
    for bad in ({"alpha": 1.5}, {"beta": 0.2}, {"scores": ("nope",)}, {"n_mc": 1}, {"sigma": 0},
                {"test_bound": "x"}):
        with pytest.raises(ConfigError):
            ConformalSettings(**bad)
    with pytest.raises(ConfigError):
        ConformalProbe("m", None, ConformalSettings(), {})      # PTT without references
