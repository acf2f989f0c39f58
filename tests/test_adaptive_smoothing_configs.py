"""The adaptive-smoothing configs: the CIFAR-10 recipe runs end to end (bases, sweep, mixing network,
full adaptive suite, report) on a tiny CIFAR-format fixture with only sizes shrunk; every shipped
adaptive config parses; unknown keys are refused."""

import json
import tomllib
from pathlib import Path

import pytest
from test_aaer_configs import write_cifar_fixture

from bastion.errors import ConfigError
from experiments.commands.mix import merge_config, run_study

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.mark.parametrize("name", ["adaptive_digits.toml", "adaptive_cifar10.toml", "adaptive_cifar100.toml"])
def test_configs_parse(name):
    with open(CONFIGS / name, "rb") as f:
        c = merge_config(tomllib.load(f))
    assert c["operating_points"] and c["mixer"]["temperatures"]


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="mixer.widht"):
        merge_config({"mixer": {"widht": [1]}})
    with pytest.raises(ConfigError, match="unknown key 'tresh'"):
        merge_config({"tresh": 1})


def test_cifar10_config_runs_on_fixture(tmp_path):
    root = write_cifar_fixture(tmp_path / "data", per_batch=8, test=8)
    with open(CONFIGS / "adaptive_cifar10.toml", "rb") as f:
        cfg = tomllib.load(f)
    # only sizes shrink; the recipe (taps, objective copies, suites, temperatures) is as shipped
    cfg.update(data_root=str(root), max_examples=4, batch_size=4)
    cfg["bases"].update(epochs=1, arch_kwargs={"width": 4}, at_steps=1, batch_size=20)
    cfg["mixer"].update(epochs=1, widths=[4, 4, 4, 4], blocks=1, batch_size=20)
    cfg["mixer"]["objective"].update(steps_df=1, extra_clean=1, splits=2)
    cfg["sweep"] = {"alphas": [0.0, 0.9], "logit_alpha": 0.9}
    cfg["operating_points"] = cfg["operating_points"][:1]
    cfg["eval"].update(steps=1, weak_steps=1, n_target_classes=1, square_queries=2)
    cfg["margins"] = {"steps": 1}
    doc = run_study(cfg, tmp_path / "run", quiet=True)
    types = [s["type"] for s in doc["sections"]]
    assert types[:2] == ["adaptive_tradeoff", "robust_margins"]
    pts = doc["sections"][0]["data"]["points"]
    assert [p["kind"] for p in pts] == ["accurate", "fixed", "logit", "mixing"]
    card = json.loads((tmp_path / "run" / "mixed" / "model.json").read_text())
    assert card["composite"]["args"]["taps"]["robust"] == ["net.layers.1", "net.layers.3"]
    assert card["composite"]["args"]["temperatures"] == [1.2, 0.3]
    assert "bases bit-identical after mixing-network training: True" in doc["sections"][0]["data"]["notes"]
    assert (tmp_path / "run" / "report.md").is_file()
