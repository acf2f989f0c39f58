"""bastion.parallel: the shard/merge contract, in-process and with local worker processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import _parallel_tasks as tasks  # noqa: E402

from bastion.errors import ConfigError  # noqa: E402
from bastion.parallel import ray_available, run_tasks, shard_ranges  # noqa: E402


def test_shards_are_fixed_contiguous_and_cover_everything():
    sh = shard_ranges(23, 10)
    assert [list(r) for r in sh] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 23))]
    assert shard_ranges(0, 5) == []
    with pytest.raises(ConfigError):
        shard_ranges(10, 0)


def test_inline_runs_in_order_and_reports_each_result():
    seen = []
    out = run_tasks(tasks.square, [1, 2, 3], on_result=lambda i, r: seen.append((i, r)), threads=1)
    assert out == [1, 4, 9] and seen == [(0, 1), (1, 4), (2, 9)]
    with pytest.raises(ConfigError, match="backend"):
        run_tasks(tasks.square, [1], backend="slurm")
    with pytest.raises(ConfigError, match="workers"):
        run_tasks(tasks.square, [1], workers=0)


@pytest.mark.slow
def test_process_pool_sets_threads_and_retries_crashes_and_exceptions(tmp_path):
    seen = {}
    # threads=3: no default (1 per worker here, or OMP_NUM_THREADS) gives 3, so the setting really reached them
    out = run_tasks(tasks.flaky, [(v, str(tmp_path)) for v in range(2)], workers=2, retries=2, threads=3,
                    on_result=lambda i, r: seen.setdefault(i, r))
    assert [v for v, _ in out] == [0, 1] and {i: v for i, (v, _) in seen.items()} == {0: 0, 1: 1}
    assert {t for _, t in out} == {3}   # in the workers that ran the retries too
    with pytest.raises(ValueError, match="permanent"):
        run_tasks(tasks.always_fails, [0, 1], workers=2, retries=1)
    with pytest.raises(Exception, match="crashed"):
        run_tasks(tasks.crash, [0], workers=2, retries=0)


def test_parallel_never_imports_certify_or_ray_at_import():
    import subprocess

    code = ("import sys, bastion.parallel; "
            "print(any(m == 'ray' or m.startswith(('ray.', 'certify')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    src = Path(__file__).parents[1].joinpath("bastion", "parallel.py").read_text()
    assert "import certify" not in src and "from certify" not in src
    assert isinstance(ray_available(), bool)
