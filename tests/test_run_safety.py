"""Run directories under concurrent use, and workers of a killed driver (local pool and Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bastion.checkpoints import make_card, save_checkpoint
from bastion.models import create_model
from certify.logs import read_log

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("mlp", 4, 1, 8, hidden=(32,))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, make_card(model, "mlp", 4, (1, 8, 8), {"hidden": [32]}, dataset="synthetic"))
    return str(path) + ".safetensors"


def test_two_writers_in_one_run_directory(ckpt, tmp_path, capsys):
    """The writers are `bastion certify` runs in this process (``python -m experiments`` is ``sys.exit(main())``)
    and, holding the lock, another process."""
    from experiments.cli import main

    out = tmp_path / "run"
    argv = ["certify", "--quiet", "--model", ckpt, "--sigma", "0.25", "--n0", "50", "--n", "2000", "--batch", "500",
            "--dataset", "synthetic", "--max", "24", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    # another writer holds the run directory (a second `bastion certify`, or anything using RunDir.lock)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bastion.records import RunDir\n"
                               f"with RunDir({str(out)!r}).lock():\n print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (out / "records.jsonl").read_bytes()
        capsys.readouterr()
        code = main([*argv[:-3], str(out) + "/../run", "--threads", "1"])   # same run, spelled differently
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and f"in use by pid {holder.pid}" in err and "Traceback" not in err
        assert (out / "records.jsonl").read_bytes() == before            # nothing written, nothing lost
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0                                               # the holder is gone: a rerun is a no-op
    rows = read_log(out / "certify-sigma0.25.tsv")
    assert sorted(r["idx"] for r in rows) == list(range(24))             # every row once


SLOW_TASK = '''
import os, time

def slow(task):
    with open(os.path.join(task, f"{os.getpid()}.pid"), "w") as f:
        f.write("")
    time.sleep(600)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_workers_exit_when_the_driver_is_killed(tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray", reason="Ray is not installed (pip install 'bastion-robustness[distributed]')")
    (tmp_path / "slowtask.py").write_text(SLOW_TASK)
    pids = tmp_path / "pids"
    pids.mkdir()
    ray_init = ""
    if backend == "ray":
        import tempfile

        ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        ray_init = (f"import ray; ray.init(num_cpus=2, _temp_dir={ray_tmp!r}, include_dashboard=False, "
                    f"log_to_driver=False)")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        {ray_init}
        from bastion.parallel import run_tasks
        from slowtask import slow
        run_tasks(slow, [{str(pids)!r}, {str(pids)!r}], backend={backend!r}, workers=2, threads=1, retries=0)
    """)
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(pids.glob("*.pid"))) < 2 and driver.poll() is None:
        time.sleep(0.1)
    workers = [int(p.stem) for p in pids.glob("*.pid")]
    assert len(workers) == 2, "the workers did not start"
    driver.send_signal(signal.SIGKILL)       # not reaped yet: the driver stays a zombie meanwhile
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if _alive(w)]
    driver.wait()
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their killed driver by 10 s"
