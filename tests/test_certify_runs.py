"""Certification runs: TSV logs and metrics, kill-and-resume, 2 local workers and a 2-CPU Ray run
give the same rows as 1 worker, the `bastion certify` command and the report renderer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import pausing_env, wait_for_pause

from bastion.data import load_dataset
from certify.logs import CERTIFY_HEADER, read_log
from certify.runner import CertifyOptions, Setting, run_certification

TIMING = {"mean_time_s", "total_time_s", "wall_time_s"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small MLP trained with Gaussian augmentation on synthetic data, saved as a checkpoint."""
    import defenses.gaussian  # noqa: F401
    from bastion.checkpoints import make_card, save_checkpoint
    from bastion.models import create_model
    from bastion.train import TrainConfig, create_objective, fit

    data = load_dataset("synthetic", "train", seed=0, num_examples_total=256)
    torch.manual_seed(0)
    model = create_model("mlp", 4, 1, 8, hidden=(32,))
    fit(model, data, create_objective("gaussian", sigma=0.5), TrainConfig(epochs=3, batch_size=32, lr=0.05),
        quiet=True)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, model, make_card(model, "mlp", 4, (1, 8, 8), {"hidden": [32]}, dataset="synthetic"))
    return str(path) + ".safetensors"


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "test", seed=0, num_examples_total=64).every(2)


def _settings(ckpt):
    return [Setting("sigma0.25", ckpt, 0.25, 4), Setting("sigma0.5", ckpt, 0.5, 4)]


OPTS = dict(n0=50, n=1000, alpha=0.001, batch=200, seed=7, shard_size=10)


def _rows(out: Path, name: str) -> list[tuple]:
    rows = read_log(out / f"certify-{name}.tsv")
    return [(r["idx"], r["label"], r["predict"], r["radius"], r["correct"]) for r in rows]


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in TIMING}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def reference(ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    doc = run_certification(_settings(ckpt), data, out, CertifyOptions(**OPTS), quiet=True)
    return out, doc


def test_log_format_metrics_and_report(reference, data):
    out, doc = reference
    lines = (out / "certify-sigma0.25.tsv").read_text().splitlines()
    assert lines[0] == CERTIFY_HEADER and len(lines) == 1 + len(data)
    rows = read_log(out / "certify-sigma0.25.tsv")
    assert [r["idx"] for r in rows] == sorted(data.indices.tolist())
    for r in rows:
        assert r["correct"] == int(r["predict"] == r["label"])
        assert r["predict"] != -1 or r["radius"] == 0.0
    sec = doc["sections"][0]
    assert sec["type"] == "certification" and doc["schema_version"] == 1
    s25, s50 = sec["data"]["settings"]
    assert s25["num_examples"] == len(data)
    # certified accuracy recomputed by hand from the logged rows
    for r, a in zip(s25["radii"], s25["certified_accuracy"]):
        assert a == pytest.approx(sum(x["correct"] == 1 and x["radius"] >= r for x in rows) / len(rows))
    assert s25["clean_accuracy"] == s25["certified_accuracy"][0]
    assert s25["acr"] == pytest.approx(sum(x["radius"] * x["correct"] for x in rows) / len(rows))
    assert s25["abstention_rate"] == pytest.approx(sum(x["predict"] == -1 for x in rows) / len(rows))
    assert s25["samples_total"] == len(data) * 1050 and s25["mean_time_s"] > 0
    env = sec["data"]["envelope"]
    assert env["accuracy"] == [max(a, b) for a, b in zip(s25["curve"]["accuracy"], s50["curve"]["accuracy"])]
    assert json.loads((out / "metrics.json").read_text()) == doc
    md = (out / "report.md").read_text()
    assert "best over sigma" in md and "ACR" in md and "fig_1.png" in md
    assert "<img" in (out / "report.html").read_text()


def test_rerun_is_a_noop_and_resume_appends_only_missing(reference, ckpt, data, tmp_path):
    out, doc = reference
    before = (out / "records.jsonl").read_text()
    again = run_certification(_settings(ckpt), data, out, CertifyOptions(**OPTS), quiet=True)
    assert (out / "records.jsonl").read_text() == before
    assert _strip(again) == _strip(doc)
    with pytest.raises(Exception, match="different config"):
        run_certification(_settings(ckpt), data, out, CertifyOptions(**(OPTS | {"n": 2000})), quiet=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_rows_and_metrics(reference, ckpt, data, tmp_path):
    ref_out, ref_doc = reference
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import torch; torch.set_num_threads(1)
        from bastion.data import load_dataset
        from certify.runner import CertifyOptions, Setting, run_certification
        data = load_dataset("synthetic", "test", seed=0, num_examples_total=64).every(2)
        s = [Setting("sigma0.25", {ckpt!r}, 0.25, 4), Setting("sigma0.5", {ckpt!r}, 0.5, 4)]
        run_certification(s, data, {str(out)!r}, CertifyOptions(**{OPTS!r}), quiet=True)
    """)
    rec = out / "records.jsonl"
    # the run stops itself once it has written 8 records (`conftest.pausing_env`) and is killed there
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=str(Path(__file__).parents[1]),
                            env=pausing_env(dict(os.environ), rec, 8))
    try:
        assert wait_for_pause(proc, rec) == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_killed = sum(1 for _ in open(rec))
    assert 8 <= n_killed < 2 * len(data), "the run was not interrupted midway"
    doc = run_certification(_settings(ckpt), data, out, CertifyOptions(**OPTS), quiet=True)
    for name in ("sigma0.25", "sigma0.5"):
        assert _rows(out, name) == _rows(ref_out, name)
    assert _strip(doc) == _strip(ref_doc)


@pytest.mark.slow
def test_two_local_workers_give_the_same_rows(reference, ckpt, data, tmp_path):
    ref_out, ref_doc = reference
    out = tmp_path / "w2"
    doc = run_certification(_settings(ckpt), data, out, CertifyOptions(**OPTS), workers=2, threads=1, quiet=True)
    for name in ("sigma0.25", "sigma0.5"):
        assert _rows(out, name) == _rows(ref_out, name)
    assert _strip(doc) == _strip(ref_doc)
    assert not list((out / "parts").glob("*.jsonl"))


@pytest.mark.slow
def test_ray_with_two_cpus_gives_the_same_rows(reference, ckpt, data):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bastion-robustness[distributed]')")
    ref_out, _ = reference
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")       # short path: Ray's sockets live under it
    out = Path(tmp) / "run"
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    try:
        run_certification(_settings(ckpt), data, out, CertifyOptions(**OPTS), backend="ray", threads=1,
                          quiet=True)
    finally:
        ray.shutdown()
    for name in ("sigma0.25", "sigma0.5"):
        assert _rows(out, name) == _rows(ref_out, name)


def test_sequential_run_and_predict_run(ckpt, data, tmp_path):
    opts = CertifyOptions(**(OPTS | {"n": 4000, "sequential": True, "seq_start": 200, "max_radius": 0.5}))
    doc = run_certification(_settings(ckpt)[:1], data, tmp_path / "seq", opts, quiet=True)
    s = doc["sections"][0]["data"]["settings"][0]
    assert doc["sections"][0]["data"]["mode"] == "sequential"
    assert s["samples_total"] < len(data) * 4050 and sum(s["stopped"].values()) == len(data)
    assert "Sequential mode" in (tmp_path / "seq" / "report.md").read_text()
    popts = CertifyOptions(**(OPTS | {"task": "predict"}))
    doc = run_certification(_settings(ckpt)[:1], data, tmp_path / "pred", popts, quiet=True)
    rows = read_log(tmp_path / "pred" / "predict-sigma0.25.tsv")
    assert len(rows) == len(data) and set(rows[0]) == {"idx", "label", "predict", "correct", "time"}
    assert 0 <= doc["sections"][0]["data"]["settings"][0]["accuracy"] <= 1


def test_certify_command(ckpt, tmp_path, capsys):
    from experiments.cli import main

    out = tmp_path / "cli"
    argv = ["certify", "--quiet", "--model", ckpt, "--sigma", "0.25", "0.5", "--n0", "50", "--n", "500",
            "--alpha", "0.001", "--skip", "4", "--max", "16", "--batch", "500", "--dataset", "synthetic",
            "--out", str(out)]
    assert main(argv) == 0
    rows = read_log(out / "certify-sigma0.5.tsv")
    assert len(rows) == 16 and (out / "report.html").is_file()
    assert main(argv) == 0                                    # resume: nothing to do
    assert len(read_log(out / "certify-sigma0.5.tsv")) == 16
    bad = ["certify", "--quiet", "--model", ckpt, ckpt, "--sigma", "0.25", "0.5", "1.0", "--dataset", "synthetic",
           "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1


def test_certification_renderer_is_registered():
    from bastion.report import renderer

    render = renderer("certification")      # found through the bastion.plugins entry points
    assert render is not None
    md, figs = render({"type": "certification", "title": "t", "data": {
        "task": "predict", "settings": [{"name": "a", "sigma": 0.25, "num_examples": 2, "accuracy": 0.5,
                                         "abstention_rate": 0.5, "mean_time_s": 0.01}]}})
    assert "abstained" in md and figs == []



def test_fold_log_reads_a_tsv_at_given_radii(reference):
    from certify.analysis import fold_log

    out, doc = reference
    s25 = doc["sections"][0]["data"]["settings"][0]
    folded = fold_log(out / "certify-sigma0.25.tsv", sigma=0.25, max_radius=s25["curve"]["max_radius"],
                      radii=[0.0, 0.5])
    assert folded["radii"] == [0.0, 0.5]
    assert folded["certified_accuracy"] == [s25["certified_accuracy"][s25["radii"].index(r)] for r in (0.0, 0.5)]
