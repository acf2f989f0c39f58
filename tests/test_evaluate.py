"""bastion.evaluate: probes over a data set into a run directory; resume gives byte-identical metrics."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import AttackProbe
from bastion.data import load_dataset
from bastion.errors import DataError, RunError
from bastion.evaluate import CleanProbe, derive_seed, evaluate_model, make_generator, run_probes
from bastion.models import create_model
from bastion.records import RecordLog, RunDir
from bastion.runner import RunOptions
from bastion.threat import ThreatModel
from bastion.train import StandardObjective, TrainConfig, fit

THREAT = ThreatModel.parse("linf:16/255")
CONFIG = {"model": "tiny-mlp", "threat": str(THREAT), "steps": 3, "seed": 0}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("mlp", 4, 1, 8, hidden=(32,))
    data = load_dataset("synthetic", "train", seed=0, num_examples_total=128)
    fit(m, data, StandardObjective(), TrainConfig(epochs=2, batch_size=32, lr=0.1), quiet=True)
    return m.eval()


@pytest.fixture(scope="module")
def test_data():
    return load_dataset("synthetic", "test", seed=0, num_examples_total=70)


def _pgd():
    return AttackProbe(THREAT, ["pgd"], attack_params={"pgd": {"steps": 3}})


def _probes():
    return [CleanProbe(), _pgd()]


class DiesAfter:
    """Wraps a probe; raises (as a kill would) after ``n`` chunks."""

    def __init__(self, probe, n):
        self.probe, self.n, self.name = probe, n, probe.name

    def run(self, *args):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.probe.run(*args)


def _records(run_dir):
    return sorted(RecordLog(run_dir / "records.jsonl").read(), key=lambda r: (r["probe"], r["index"]))


def test_evaluate_model_metrics_and_records(tmp_path, model, test_data):
    m = evaluate_model(model, test_data, _probes(), tmp_path, CONFIG, batch_size=16, quiet=True)
    recs = _records(tmp_path)
    assert len(recs) == 2 * 70
    assert {r["probe"] for r in recs} == {"clean", "pgd@linf:16/255"}
    clean = [r for r in recs if r["kind"] == "clean"]
    assert m["clean"]["accuracy"] == pytest.approx(sum(r["correct"] for r in clean) / 70)
    assert m["clean"]["accuracy"] > 0.5  # the model learned something
    rob = m["robust"]["linf:16/255"]
    assert rob["accuracy"] <= m["clean"]["accuracy"] and rob["n"] == 70
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["schema_version"] == 1 and doc["sections"][0]["type"] == "robustness"
    assert doc["sections"][0]["data"] == json.loads(json.dumps(m))
    assert not model.training


@pytest.mark.parametrize("die_in,after", [(0, 2), (1, 0), (1, 3)])
def test_interrupted_evaluation_resumes_to_identical_metrics(tmp_path, model, test_data, die_in, after):
    evaluate_model(model, test_data, _probes(), tmp_path / "full", CONFIG, batch_size=16, quiet=True)
    probes = _probes()
    probes[die_in] = DiesAfter(probes[die_in], after)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, test_data, probes, tmp_path / "cut", CONFIG, batch_size=16, quiet=True)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    partial = RecordLog(tmp_path / "cut" / "records.jsonl").read()
    assert 0 < len(partial) < 140
    # the kill landed mid-chunk: the chunk's last 3 lines are lost and the line before them is torn
    path = tmp_path / "cut" / "records.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-4]) + lines[-4][:20])
    evaluate_model(model, test_data, _probes(), tmp_path / "cut", CONFIG, batch_size=16, quiet=True)
    assert (tmp_path / "cut" / "metrics.json").read_bytes() == (tmp_path / "full" / "metrics.json").read_bytes()
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


def test_resume_skips_recorded_chunks(tmp_path, model, test_data):
    evaluate_model(model, test_data, _probes(), tmp_path, CONFIG, batch_size=16, quiet=True)
    before = (tmp_path / "records.jsonl").read_bytes()
    calls = []

    class Spy:
        name = "clean"

        def run(self, *args):
            calls.append(1)
            return CleanProbe().run(*args)

    evaluate_model(model, test_data, [Spy(), _pgd()], tmp_path, CONFIG, batch_size=16,
                   quiet=True)
    assert calls == [] and (tmp_path / "records.jsonl").read_bytes() == before


def test_reopen_with_other_config_raises(tmp_path, model, test_data):
    evaluate_model(model, test_data.subset(slice(0, 8)), [CleanProbe()], tmp_path, CONFIG, quiet=True)
    with pytest.raises(RunError, match="different config"):
        evaluate_model(model, test_data.subset(slice(0, 8)), [CleanProbe()], tmp_path, {**CONFIG, "steps": 5},
                       quiet=True)


def test_subset_records_keep_dataset_indices(tmp_path, model, test_data):
    sub = test_data.every(skip=7)
    m = evaluate_model(model, sub, [CleanProbe()], tmp_path, CONFIG, batch_size=4, quiet=True)
    assert sorted(r["index"] for r in RecordLog(tmp_path / "records.jsonl").read()) == sub.indices.tolist()
    assert m["clean"]["n"] == len(sub)


def test_bad_images_rejected(tmp_path, model, test_data):
    bad = test_data.subset(slice(0, 4))
    bad.images = bad.images * 3
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        run_probes(model, bad, [CleanProbe()], RunDir(tmp_path, CONFIG), RunOptions(quiet=True))


def test_seeds_are_stable():
    assert derive_seed(0, "clean", 0) == derive_seed(0, "clean", 0)
    assert derive_seed(0, "clean", 0) != derive_seed(0, "clean", 16)
    a = torch.rand(3, generator=make_generator("cpu", 1, "pgd", 0))
    assert torch.equal(a, torch.rand(3, generator=make_generator("cpu", 1, "pgd", 0)))
