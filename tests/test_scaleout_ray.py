"""A 2-CPU Ray cluster started as a user starts one (``ray start --head``), then ``bastion certify``
and ``bastion evaluate`` with ``--backend ray --address auto``: records identical to the local run;
a Ray worker killed mid-task is retried and the run finishes.

``--address auto`` finds the cluster through ``RAY_ADDRESS`` (set here to the head's
``host:port``; without it Ray reads ``/tmp/ray/ray_current_cluster``, which a custom
``--temp-dir`` does not write to). The head runs with ``--block`` as this test's child and is
stopped by its process id, not with ``ray stop`` (which ends every Ray process of the user on the
machine, other people's clusters included)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'bastion-robustness[distributed]')")

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RAY.exists(), reason="the ray command is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray >= 2.5x turns token authentication on for `ray start --head`; a token of this test's own, given to the
# head and to every driver through the environment (never ~/.ray/auth_token, which other clusters share)
TOKEN = secrets.token_hex(32)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": TOKEN, **extra}


def _abs(args, cwd: Path) -> list[str]:
    """Ray workers do not run in the driver's directory: checkpoint paths must be absolute."""
    return [str(cwd / a) if a.endswith(".safetensors") else a for a in args]


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *_abs(args, cwd)], cwd=cwd, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]


def here(*args: str, cwd: Path) -> None:
    """``bastion *args --threads 1`` in this process (paths made absolute: it does not run in ``cwd``)."""
    from experiments.cli import main

    argv = _abs(args, cwd)
    argv[argv.index("--out") + 1] = str(cwd / argv[argv.index("--out") + 1])
    assert main([*argv, "--threads", "1"]) == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray_cli")
    here("train", "--quiet", "--dataset", "digits", "--max", "200", "--model-arg", "width=4", "--epochs", "1",
         "--out", "std", cwd=d)
    return d


HEAD: dict[str, int] = {}


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head --num-cpus 2 --port P --temp-dir /tmp/rayXXXX --block``; yields RAY_ADDRESS."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's unix sockets live under it
    head = subprocess.Popen([str(RAY), "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir", tmp,
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        time.sleep(2)
        HEAD["pid"] = head.pid
        yield address
    finally:
        # the head and everything it started share its session: end that group, by its id. `ray start --block`
        # ignores SIGTERM and usually stops its cluster within about a second on SIGINT; what is left after a few
        # seconds is killed (the end state of a SIGKILL of the group, without waiting for nothing)
        try:
            os.killpg(head.pid, signal.SIGINT)
            head.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in ("time_s", "seconds")} for r in rows]
    return sorted(rows, key=lambda r: (r["index"], r["probe"]))


CERTIFY = ["certify", "--quiet", "--model", "std/model.safetensors", "--sigma", "0.25", "--dataset", "digits",
           "--max", "12", "--n0", "20", "--n", "2000", "--batch", "500", "--shard-size", "4"]
EVALUATE = ["evaluate", "--quiet", "--model", "std/model.safetensors", "--dataset", "digits", "--max", "16",
            "--eps", "0.1", "--steps", "5", "--shard-size", "4"]


@pytest.mark.parametrize("argv", [CERTIFY, EVALUATE], ids=["certify", "evaluate"])
def test_ray_cluster_started_by_ray_start_gives_the_local_records(work, cluster, argv):
    name = argv[0]
    ray_run = start(*argv, "--backend", "ray", "--address", "auto", "--threads", "1", "--out", f"{name}-ray", cwd=work,
                    env=_env(RAY_ADDRESS=cluster))
    here(*argv, "--out", f"{name}-local", cwd=work)   # the local reference, in this process while Ray runs
    finish(ray_run)
    assert _records(work / f"{name}-ray") == _records(work / f"{name}-local")


def _task_workers(root: int) -> list[int]:
    """Process ids of Ray workers running a bastion task (title ``ray::_call_with_threads``) under ``root``."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(k) for k in (task / "children").read_text().split()]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"_call_with_threads" in cmd:
            out.append(pid)
    return out


def test_a_ray_worker_killed_mid_task_is_retried_and_the_run_finishes(work, cluster):
    local = work / "certify-local"
    if not local.is_dir():
        here(*CERTIFY, "--out", "certify-local", cwd=work)
    argv = [*CERTIFY[:CERTIFY.index("--n")], "--n", "20000", *CERTIFY[CERTIFY.index("--batch"):]]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", *_abs(argv, work), "--backend", "ray",
                             "--address", "auto", "--threads", "1", "--retries", "3", "--out", "certify-killed"],
                            cwd=work,
                            env=_env(RAY_ADDRESS=cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        head = HEAD["pid"]   # `ray start --block`: the raylet and its workers descend from it
        deadline = time.time() + 120
        while killed is None and time.time() < deadline and proc.poll() is None:
            pids = _task_workers(head)
            if pids:
                time.sleep(0.5)   # let it get into the task
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            time.sleep(0.1)
        here(*argv, "--out", "certify-big-local", cwd=work)   # the local reference, in this process while Ray runs
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "no Ray task worker was seen"
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert _records(work / "certify-killed") == _records(work / "certify-big-local")

