"""The README's command-line walkthrough (scripts/walkthrough.sh) runs in order at shrunk sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_model_label_names_the_run_not_the_file():
    from experiments.common import model_label

    assert model_label("runs/gauss/model.safetensors") == "gauss"
    assert model_label("runs/g25/checkpoints/last.safetensors") == "g25-last"
    assert model_label("zoo/resnet_a.safetensors") == "resnet_a"


@pytest.mark.slow
def test_readme_walkthrough_runs_in_order(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               BASTION=f"{sys.executable} -m experiments")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "walkthrough.sh"), str(tmp_path / "w")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all examples ran" in r.stderr
    assert "Traceback" not in r.stderr
