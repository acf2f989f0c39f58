"""One evaluator for everything: the library and the CLI write the same metrics.json, records are
the same on 1 process, 2 local workers and a 2-CPU Ray cluster, runs of the previous record schema
still fold and report, and the code base keeps one resume filter, part-file merge and PGD loop."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from attacks import AttackProbe
from bastion.checkpoints import load_checkpoint, make_card, save_checkpoint
from bastion.data import load_dataset
from bastion.errors import RunError
from bastion.evaluate import CleanProbe, evaluate, section_data
from bastion.folds import FoldContext, fold_records
from bastion.models import create_model
from bastion.records import CertifyRecord, CleanRecord, RecordLog, RobustRecord, RunDir, parse_record
from bastion.runner import RunOptions
from bastion.train import StandardObjective, TrainConfig, fit

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "schema_v1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    data = load_dataset("synthetic", "train", seed=0, num_examples_total=128)
    model = create_model("mlp", 4, 1, 8, hidden=(32,))
    fit(model, data, StandardObjective(), TrainConfig(epochs=2, batch_size=32, lr=0.1), quiet=True)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, make_card(model, "mlp", 4, (1, 8, 8), {"hidden": [32]}, dataset="synthetic",
                                           class_names=["a", "b", "c", "d"]))
    return str(path) + ".safetensors"


def _probes():
    return [CleanProbe()] + [AttackProbe(t, ["fgsm", "pgd"], attack_params={"pgd": {"steps": 3}}, cross_check=2)
                             for t in ("linf:0.05", "linf:0.1")]


def _data():
    return load_dataset("synthetic", "test", seed=0).every(1, 64)


def _records(out: Path) -> list[dict]:
    return sorted(RecordLog(out / "records.jsonl").read(), key=lambda r: (r["probe"], r["index"]))


def test_library_and_cli_write_byte_identical_metrics(ckpt, tmp_path):
    from experiments.cli import main

    cli = tmp_path / "cli"
    assert main(["evaluate", "--quiet", "--model", ckpt, "--dataset", "synthetic", "--attacks", "fgsm,pgd",
                 "--attack-param", "pgd.steps=3", "--eps", "0.05,0.1", "--cross-check", "2", "--batch-size", "16",
                 "--max", "64", "--seed", "5", "--out", str(cli)]) == 0
    model, card = load_checkpoint(ckpt)
    lib = tmp_path / "lib"
    evaluate(model, _data(), _probes(), lib, {"what": "library run"},
             opts=RunOptions(batch_size=16, seed=5, quiet=True), class_names=card["class_names"], title="tiny")
    assert (lib / "metrics.json").read_bytes() == (cli / "metrics.json").read_bytes()
    data = section_data(json.loads((lib / "metrics.json").read_text()), "robustness")
    assert data["flags"] and [a["threat"] for a in data["attacks"]] == ["linf:0.05", "linf:0.1"]
    assert (lib / "report.md").read_text() == (cli / "report.md").read_text()


@pytest.mark.slow
def test_one_two_workers_and_ray_give_identical_records(ckpt, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bastion-robustness[distributed]')")
    runs = {}
    for name, kw in [("one", {}), ("two", {"workers": 2, "threads": 1, "shard_size": 16}),
                     ("ray", {"backend": "ray", "threads": 1, "shard_size": 16})]:
        out = tmp_path / name
        tmp = None
        if name == "ray":
            tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short path: Ray's sockets live under it
            ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
        try:
            evaluate(ckpt, _data(), _probes(), out, {"m": "tiny"},
                     opts=RunOptions(batch_size=16, seed=5, quiet=True, **kw), title="tiny")
        finally:
            if tmp:
                ray.shutdown()
                shutil.rmtree(tmp, ignore_errors=True)
        runs[name] = out
        assert not (out / "parts").exists()
    for name in ("two", "ray"):
        assert _records(runs[name]) == _records(runs["one"])
        assert (runs[name] / "metrics.json").read_bytes() == (runs["one"] / "metrics.json").read_bytes()


def test_typed_records_round_trip_and_read_schema_1():
    r = RobustRecord(index=3, probe="pgd@linf:0.1", threat="linf:0.1", attack="pgd", label=1, pred=2, correct=False,
                     broken_by="pgd", step=4, flags=("zero_gradient",))
    d = r.to_record()
    assert d["kind"] == "robust" and d["schema"] == 2 and d["split"] == "test" and d["correct"] is False
    assert parse_record(json.loads(json.dumps(d))) == r
    old = json.loads((FIXTURES / "certify" / "records.jsonl").read_text().splitlines()[0])
    assert "predict" in old and old["correct"] in (0, 1)           # schema 1 as written by Bastion 0.1.0
    c = parse_record(old)
    assert isinstance(c, CertifyRecord) and c.pred == old["predict"] and c.correct is bool(old["correct"])
    with pytest.raises(RunError, match="unknown record kind"):
        parse_record({"index": 0, "probe": "x", "kind": "nonsense"})
    with pytest.raises(RunError, match="lacks a field"):
        parse_record({"index": 0, "probe": "x", "kind": "clean"})


def test_schema_1_run_directories_still_fold_and_report(tmp_path):
    from experiments.cli import main

    for name, section_type in [("eval", "robustness"), ("certify", "certification")]:
        run = tmp_path / name
        shutil.copytree(FIXTURES / name, run)
        old = section_data(json.loads((run / "metrics.json").read_text()), section_type)
        assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()
        ctx = FoldContext(class_names=[str(k) for k in range(10)], title=name,
                          data={"name": "digits", "split": "test"}, probes={} if name == "eval" else
                          {"sigma0.25": {"kind": "certify", "sigma": 0.25, "alpha": 0.01, "n0": 20, "n": 200}})
        new = section_data({"sections": fold_records(RunDir(run).records.unique(), ctx)}, section_type)
        if name == "eval":
            assert new["clean"] == old["clean"] and new["robust"] == old["robust"]
        else:
            assert _pick(new) == _pick(old)


def _pick(sec: dict) -> list[dict]:
    keys = ("certified_accuracy", "acr", "abstention_rate", "num_examples", "curve", "radii")
    return [{k: s[k] for k in keys} for s in sec["settings"]]


def test_folding_deduplicates_by_key(tmp_path):
    rec = [CleanRecord(index=i, probe="clean", label=0, pred=0 if i < 3 else 1, correct=i < 3).to_record()
           for i in range(4)]
    log = RecordLog(tmp_path / "records.jsonl")
    log.append(rec + rec[:2] + rec)       # what two concurrent writers of an older version could leave
    ctx = FoldContext(class_names=["0", "1"])
    m = section_data({"sections": fold_records(log.unique(), ctx)}, "robustness")
    assert m["clean"]["n"] == 4 and m["clean"]["accuracy"] == 0.75


def test_a_second_writer_gets_a_one_line_error_naming_the_holder(tmp_path):
    run = RunDir(tmp_path / "run", {"a": 1})
    with run.lock():
        with pytest.raises(RunError, match=r"in use by pid \d+ on"):
            evaluate(torch.nn.Flatten(), _data(), [CleanProbe()], tmp_path / "run", {"a": 1})
    with run.lock():                       # released: the next writer goes ahead
        pass


def _code_files() -> list[Path]:
    return [p for d in ("bastion", "attacks", "defenses", "certify", "detection", "experiments")
            for p in (ROOT / d).rglob("*.py")]


def test_one_resume_filter_one_part_merge_one_pgd_loop():
    text = {p.relative_to(ROOT).as_posix(): p.read_text() for p in _code_files()}
    resume = [f for f, t in text.items() if "done_keys()" in t]
    parts = [f for f, t in text.items() if re.search(r"glob\(\"\*\.jsonl\"\)", t)]
    pgd = [f for f, t in text.items() if re.search(r"for \w+ in range\([^)]*steps", t) and ".sign()" in t]
    assert resume == ["bastion/runner.py"], resume
    assert parts == ["bastion/runner.py"], parts
    assert pgd == ["attacks/native.py"], pgd
    runner = text["certify/runner.py"]
    assert not re.search(r"\bfold_rows\(|\benvelope\(|write_json\(", runner)   # certify/runner.py folds nothing
