"""The comparison runner end to end on fixtures: the CIFAR-10 config (shrunk) on synthetic 32x32
RGB data, and the digits config's structure."""

import json

import pytest

from defenses.consistency_compare import config_from_dict, run_comparison
from experiments.config import read_toml

pytest.importorskip("diffusers")


def shrink(d, **over):
    d = dict(d)
    d.update(seeds=[0, 1], bootstrap=20, device="cpu", root=None,
             pretrain={**d["pretrain"], "steps": 2, "batch": 32, "proj_hidden": 8, "proj_out": 4},
             finetune={**d["finetune"], "epochs": 1, "batch": 32},
             denoiser={**d["denoiser"], "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                       "match_compute": False, "steps": 2, "batch": 8},
             classifier={**d["classifier"], "epochs": 1, "batch": 32},
             baselines={**d["baselines"], "match_compute": False, "gaussian_epochs": 1, "consistency_epochs": 1},
             certify={**d["certify"], "n0": 5, "n": 20, "batch": 20, "skip": 8, "max_radius": 1.0},
             ablations=d["ablations"][:1], **over)
    return d


def test_cifar10_config_end_to_end_on_a_fixture(tmp_path):
    raw = read_toml("experiments/configs/consistency_cifar10.toml")
    assert raw["dataset"] == "cifar10" and raw["certify"]["skip"] == 20 and len(raw["seeds"]) >= 3
    d = shrink(raw, dataset="synthetic", data_options={"channels": 3, "size": 32, "num_examples_total": 48},
               encoder={"kind": "vit", "patch": 8, "dim": 8, "depth": 1, "heads": 2},
               methods=["gaussian", "consistency", "denoised", "rrcm", "constant"], sigmas=[0.25, 0.5])
    d["classifier"]["arch"] = "mlp"
    sec = run_comparison(config_from_dict(d), tmp_path / "out", quiet=True)
    data = sec["data"]
    assert {r["method"] for r in data["rows"]} == {"gaussian", "consistency", "denoised", "rrcm", "constant"}
    const = [r for r in data["rows"] if r["method"] == "constant"]
    assert const and all(r["collapsed"] for r in const)
    assert data["cost_ratio"]["flops_ratio"] > 1
    assert data["ablations"][0]["name"] == "no-Lcon"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "COLLAPSED" in report and "Who wins where" in report and "rrcm - gaussian" in report
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["type"] == "smoothing_comparison"
    assert (tmp_path / "out" / "seed1" / "certify" / "certify-rrcm-sigma0.5.tsv").is_file()


def test_digits_config_parses_and_is_index_strided():
    cfg = config_from_dict(read_toml("experiments/configs/consistency_digits.toml"))
    assert len(cfg.seeds) >= 3 and cfg.certify["skip"] > 1 and cfg.baselines["match_compute"]
    assert {"gaussian", "consistency", "denoised", "rrcm"} <= set(cfg.methods)
