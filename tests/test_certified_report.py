"""`bastion report --certified`: several certify runs (methods x sigmas) and Cohen-format TSV logs in
one report: table at chosen radii, curves, best-over-sigma envelope per method, ACR, abstention, time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.errors import ConfigError

COHEN = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.512\t1\t0:00:01.250000
20\t8\t8\t0.0451\t1\t0:00:01.240000
40\t0\t-1\t0.0\t0\t0:00:01.300000
60\t2\t5\t0.311\t0\t0:00:01.210000
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from experiments.cli import main

    tmp = tmp_path_factory.mktemp("cert")
    assert main(["train", "--quiet", "--dataset", "digits", "--objective", "gaussian", "--sigma", "0.25",
                 "--epochs", "1", "--out", str(tmp / "g")]) == 0
    model = str(tmp / "g" / "model.safetensors")
    assert main(["certify", "--quiet", "--model", model, "--sigma", "0.25", "0.5", "--n0", "10", "--n", "60",
                 "--alpha", "0.01", "--max", "8", "--out", str(tmp / "cert-g")]) == 0
    assert main(["certify", "--quiet", "--model", model, "--sigma", "0.12", "--n0", "10", "--n", "60",
                 "--alpha", "0.01", "--max", "8", "--out", str(tmp / "cert-g12")]) == 0
    log = tmp / "published" / "noise_0.50" / "test" / "sigma_0.50"
    log.parent.mkdir(parents=True)
    log.write_text(COHEN)
    return tmp


def test_runs_and_logs_in_one_report(runs, capsys):
    from experiments.cli import main

    out = runs / "report"
    assert main(["report", "--certified", f"gauss={runs / 'cert-g'}", f"gauss={runs / 'cert-g12'}",
                 f"cohen={runs / 'published/noise_0.50/test/sigma_0.50'}", "--radii", "0,0.25,0.5",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    d = doc["sections"][0]["data"]
    assert d["radii"] == [0.0, 0.25, 0.5] and d["methods"] == ["gauss", "cohen"]
    by = {(s["method"], s["sigma"]): s for s in d["settings"]}
    assert set(by) == {("gauss", 0.25), ("gauss", 0.5), ("gauss", 0.12), ("cohen", 0.5)}
    assert all(s["num_examples"] == 8 for s in d["settings"] if s["method"] == "gauss")
    c = by[("cohen", 0.5)]
    assert c["source"] == "imported" and c["num_examples"] == 4
    assert c["certified_accuracy"] == [0.5, 0.25, 0.25]          # radii 0.512 and 0.0451 correct, abstention, wrong
    assert c["abstention_rate"] == 0.25 and c["acr"] == pytest.approx((0.512 + 0.0451) / 4)
    assert c["mean_time_s"] == pytest.approx(1.25)
    env = d["envelopes"]["gauss"]
    table = [by[("gauss", s)]["certified_accuracy"] for s in (0.12, 0.25, 0.5)]
    assert env["certified_accuracy"] == [max(col) for col in zip(*table)]
    assert d["envelopes"]["cohen"] is None                          # one sigma: no envelope
    md = (out / "report.md").read_text()
    assert "best over sigma" in md and "imported log" in md and "ACR" in md
    assert (out / "report.html").is_file() and "<img" in (out / "report.html").read_text()


def test_tsv_logs_of_a_run_dir_are_read_when_records_are_absent(runs, tmp_path):
    import shutil

    from experiments.certified_report import certified_report

    copy = tmp_path / "logs-only"
    shutil.copytree(runs / "cert-g", copy)
    (copy / "records.jsonl").unlink()
    from_logs = certified_report([str(copy)], radii=[0, 0.25])
    from_records = certified_report([str(runs / "cert-g")], radii=[0, 0.25])
    a = sorted((s["sigma"], s["certified_accuracy"], s["acr"]) for s in from_logs["settings"])
    b = sorted((s["sigma"], s["certified_accuracy"], s["acr"]) for s in from_records["settings"])
    assert a == b


def test_bad_sources_are_one_line_errors(tmp_path):
    from bastion.errors import RunError
    from experiments.certified_report import certified_report

    with pytest.raises(ConfigError, match="neither"):
        certified_report([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no CERTIFY records"):
        certified_report([str(tmp_path / "empty")])
    p = Path(tmp_path / "predict.tsv")
    p.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0.1\n")
    with pytest.raises(RunError, match="PREDICT log"):
        certified_report([str(p)])
