"""The main job end to end: `bastion quickstart` on the embedded digits.

Checks what the README promises of it: a self-contained report, the PGD-trained model clearly more
robust than the standard one, plain FGSM's catastrophic overfitting flagged, the Gaussian-trained
model certifying more at radius 0.25 than the standard model, and a conformal section. The
detection, adaptive-smoothing and consistency sections (several minutes together on 2 cores) are
left out here: their pipelines are tested at small sizes in test_detection.py,
test_adaptive_smoothing_configs.py and test_consistency_compare.py."""

from __future__ import annotations

import io
import json

import pytest

from experiments.cli import main

ONLY = "robustness,aaer,certification,conformal"


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--quiet", "--out", str(out), "--only", ONLY]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    html = (out / "report.html").read_text()
    assert doc["schema_version"] == 1 and "data:image/png;base64" in html
    by_title = {s["title"]: s for s in doc["sections"]}

    # robustness: PGD training clearly helps against PGD at both radii, costs little clean accuracy
    std = by_title["Standard small CNN"]["data"]
    pgd = next(s["data"] for t, s in by_title.items() if t.startswith("PGD-trained"))
    for threat in ("linf:0.1", "linf:0.2"):
        assert pgd["robust"][threat]["accuracy"] >= std["robust"][threat]["accuracy"] + 0.2, threat
    assert pgd["clean"]["accuracy"] > 0.9 and std["clean"]["accuracy"] > 0.9
    assert set(std["clean"]["per_class"]) == {str(k) for k in range(10)}

    # single-step AT: FGSM collapses and the monitor flags it
    runs = {r["name"]: r for s in doc["sections"] if s["type"] == "training" for r in s["data"]["runs"]}
    fgsm = runs["FGSM"]["history"]
    assert any(h.get("co") for h in fgsm)
    assert fgsm[-1]["val_pgd"] < 0.5 * max(h["val_pgd"] for h in fgsm)

    # certification: Gaussian augmentation certifies more at r = 0.25 (sigma 0.25) than standard training
    cert = next(s["data"] for s in doc["sections"] if s["type"] == "certification")
    acc = {s["name"]: dict(zip(s["radii"], s["certified_accuracy"])) for s in cert["settings"]}
    gauss = next(v for k, v in acc.items() if k.startswith("gaussian0.25"))
    standard = next(v for k, v in acc.items() if k.startswith("standard"))
    assert gauss[0.25] >= standard[0.25] + 0.05
    assert any(s["type"] == "conformal" and s["data"]["probes"] for s in doc["sections"])

    # a rerun reuses everything and ends with the same metrics (timings aside)
    assert main(["quickstart", "--quiet", "--out", str(out), "--only", ONLY]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["environment"]["torch"] and capsys.readouterr().err == ""  # --quiet: no bars

    # the README's tables come from this document
    import runpy
    from pathlib import Path

    tables = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "readme_tables.py"))["readme_block"](doc)
    assert f"torch {doc['environment']['torch']}" in tables and "| FGSM-RS |" in tables
    assert f"{100 * std['clean']['accuracy']:.1f}%" in tables
    assert again["sections"] == doc["sections"] or _strip_times(again) == _strip_times(doc)


def _strip_times(doc: dict) -> str:
    text = json.dumps(doc["sections"], sort_keys=True)
    import re

    return re.sub(r'"(wall_time_s|epoch_seconds|time_per_example_s|seconds|time)[a-z_]*": [0-9.e+-]+', "", text)


def test_sections_are_modules_listed_in_one_place():
    import importlib

    from experiments.quickstart import SECTIONS, section_names

    assert section_names() == ["robustness", "aaer", "certification", "conformal", "detection", "adaptive",
                               "consistency"]
    for _name, module in SECTIONS:
        assert callable(importlib.import_module(module).run)


def test_progress_bars_follow_quiet_tqdm_disable_and_the_terminal(monkeypatch, tmp_path):
    from experiments.quickstart.context import QuickstartContext

    ctx = QuickstartContext(tmp_path, quiet=True)
    assert ctx.progress(3, "x").disable and ctx.bars_off
    ctx.quiet = False
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert ctx.progress(3, "x").disable and ctx.bars_off
    monkeypatch.delenv("TQDM_DISABLE")
    # stderr is not a terminal under pytest: tqdm's auto-detection turns the bar off, no \r noise
    monkeypatch.setattr("sys.stderr", io.StringIO())
    bar = ctx.progress(3, "x")
    bar.update(3)
    bar.close()
    assert bar.disable and "\r" not in __import__("sys").stderr.getvalue()
