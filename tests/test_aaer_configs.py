"""The shipped CIFAR-10 configs run end to end on a tiny CIFAR-format fixture (python-pickle
batches written here), and the study configs parse; so a GPU run with real data needs no code change."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from experiments.config import namespace_from_config, read_toml

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def write_cifar_fixture(root: Path, per_batch: int = 20, test: int = 40, seed: int = 0) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        k = test if n == "test_batch" else per_batch
        labels = [int(v) for v in rng.integers(0, 10, k)]
        data = rng.integers(0, 256, (k, 3072), dtype=np.uint8)
        with open(base / n, "wb") as f:
            pickle.dump({b"batch_label": n.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{n}_{i}.png".encode() for i in range(k)]}, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                               "frog", "horse", "ship", "truck")]}, f)
    return root


CIFAR = sorted(p.name for p in CONFIGS.glob("*cifar10*.toml"))


def test_cifar_configs_exist():
    assert {"aaer_cifar10_rs_8.toml", "aaer_cifar10_n_8.toml", "aaer_cifar10_rs_16.toml",
            "aaer_cifar10_n_16.toml"} <= set(CIFAR)


@pytest.mark.parametrize("name", ["aaer_cifar10_rs_16.toml", "aaer_cifar10_n_8.toml"])
def test_cifar_config_runs_on_fixture(tmp_path, name):
    import experiments.plugins  # noqa: F401
    from experiments.cli import build_parser

    root = write_cifar_fixture(tmp_path / "data")
    cfg = read_toml(CONFIGS / name)
    cfg.pop("command")
    # Only what a CPU test must shrink: data location, epochs, width, output; everything else as shipped.
    cfg.update(data_root=str(root), epochs=1, model_arg=["width=4"], out=str(tmp_path / "run"), quiet=True,
               monitor_pgd_steps=2)
    _, commands = build_parser()
    ns = namespace_from_config(commands["train"], cfg, name)
    ns.device = "cpu"
    assert ns.func(ns) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "val_pgd" in log[0] and "train_aae_frac" in log[0]
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["dataset"] == "cifar10" and card["arch"] == "preact_resnet18"
    assert card["recipe"]["lambda2"] > 0 and card["recipe"]["train"]["schedule"] == "cyclic"
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.parametrize("name", ["fgsm_rs_cifar10_8.toml", "n_fgsm_cifar10_16.toml", "aaer_cifar10_rs_8.toml",
                                  "aaer_cifar10_n_16.toml", "aaer_cifar10_n_8.toml", "fgsm_rs_cifar10_16.toml"])
def test_cifar_configs_parse(name):
    from experiments.cli import build_parser

    _, commands = build_parser()
    cfg = read_toml(CONFIGS / name)
    assert cfg.pop("command") == "train"
    ns = namespace_from_config(commands["train"], cfg, name)
    assert ns.model == "preact_resnet18" and ns.epochs == 30 and ns.schedule == "cyclic" and ns.lr == 0.2


STUDY_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.toml") if p.name.startswith(("co_study_", "aaer_ablation_")))


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_study_configs_parse(name):
    import experiments.plugins  # noqa: F401
    from bastion.train import create_objective
    from experiments.co_study import read_config

    cfg = read_config(CONFIGS / name)
    for m in cfg["methods"].values():
        create_objective(m["objective"], eps=cfg["eps"], **m.get("params", {}))


def test_co_study_runner_smoke(tmp_path):
    from experiments.co_study import main

    cfg = tmp_path / "s.toml"
    cfg.write_text("""name = "t"
dataset = "synthetic"
model = "conv_linear"
model_kwargs = { width = 4 }
eps = 0.1
seeds = [0]
test_examples = 32
[train]
epochs = 2
batch_size = 64
optimizer = "adam"
lr = 0.01
schedule = "cyclic"
[monitor]
pgd_steps = 2
[methods.fgsm]
objective = "fgsm"
[methods.n_aaer]
objective = "n_aaer"
params = { lambda3 = 5.0 }
""")
    assert main([str(cfg), "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"fgsm", "n_aaer"}
    assert "CO flagged" in (tmp_path / "o" / "summary.md").read_text()
    assert (tmp_path / "o" / "report.html").is_file()
    # resumable: a second call reuses the finished runs
    assert main([str(cfg), "--out", str(tmp_path / "o")]) == 0


def test_study_expectations_are_checked():
    from experiments.co_study import check_expectations, read_config

    cfg = read_config(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "co_study_digits.toml")
    assert cfg["expect"] == {"co_min_fraction": {"fgsm": 0.8}, "co_max_fraction": {"n_fgsm": 0.0}}

    def run(method, co):
        return {"method": method, "summary": {"co": co}}

    ok = [run("fgsm", True)] * 4 + [run("fgsm", False)] + [run("n_fgsm", False)] * 5
    assert all(met for _, met in check_expectations(cfg, ok))
    bad = [run("fgsm", True)] * 3 + [run("fgsm", False)] * 2 + [run("n_fgsm", True)] + [run("n_fgsm", False)] * 4
    assert [met for _, met in check_expectations(cfg, bad)] == [False, False]
