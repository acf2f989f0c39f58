"""benchmarks/gpu_check.py --dry-run runs on CPU (every path that needs no CUDA) and writes its table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run_exercises_the_cpu_paths(tmp_path):
    out = tmp_path / "gpu.md"
    assert _load("gpu_check").main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("pgd: robust accuracy", "apgd-ce", "certify: classes", "autocast bf16", "PGD-", "APGD-CE-",
                "AutoAttack", "certification (n=", "AT epoch", "bare forward+backward"):
        assert row in text, row
    assert "| NO |" not in text


def test_scaleout_benchmark_builds_its_commands():
    cmds = _load("scaleout").workloads("m.safetensors", 8, 8)
    assert {c[0][0] for c in cmds.values()} == {"certify", "evaluate"} and len(cmds) == 3
