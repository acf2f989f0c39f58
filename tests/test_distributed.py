"""Data-parallel training under torchrun (gloo on CPU): the environment, the batch split, the
sharded randomness, and `bastion train` with 2 processes giving the weights of 1 process with the
global batch (PGD-AT and RS-AAER); a rank killed mid-run and a rerun resume to the same weights."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pausing_env, wait_for_pause

from bastion import distributed as dist
from bastion.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_environment_is_a_no_op():
    env = dist.from_env({})
    assert not env.distributed and env.is_main and env.world_size == 1
    assert dist.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == dist.DistEnv()
    assert not dist.active() and dist.is_main() and dist.step_share() == 1.0
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t


def test_torchrun_environment_is_read_and_checked():
    env = dist.from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.distributed, env.is_main) == (2, 4, 0, True, False)
    assert dist.device_for(env, "cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        dist.from_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="outside"):
        dist.from_env({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_rank_slices_cover_the_batch():
    for batch in (1, 7, 8, 64):
        rows = [dist.rank_slice(batch, r, 3) for r in range(3)]
        assert [i for s in rows for i in range(batch)[s]] == list(range(batch))


def test_sharded_step_draws_the_global_batch_rows():
    def draws(g: torch.Generator, b: int) -> list[torch.Tensor]:
        x = torch.zeros(b, 2, 3)
        return [torch.rand(x.shape, generator=g, dtype=x.dtype), torch.randn(b, generator=g),
                torch.randint(0, 9, (b, 2), generator=g), torch.empty(b, 4).uniform_(-1, 1, generator=g),
                torch.rand(7, generator=g)]   # not per-example: the same on every rank

    full = draws(torch.Generator().manual_seed(3), 9)
    for offset, local in ((0, 4), (4, 5)):
        with dist.sharded_step(offset, local, 9):
            assert dist.step_share() == local / 9
            part = draws(torch.Generator().manual_seed(3), local)
        for f, p in zip(full[:-1], part[:-1]):
            assert torch.equal(f[offset:offset + local], p)
        assert torch.equal(full[-1], part[-1])
    assert dist.step_share() == 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(nproc: int, args: list[str]) -> list[str]:
    cli = ["-m", "experiments.cli", "--", "train"] if nproc > 1 else ["-m", "experiments.cli", "train"]
    pre = [sys.executable]
    if nproc > 1:
        pre += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    return pre + cli + args


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class Run:
    """`bastion train` (``nproc`` processes) started now, awaited by `done` (runs compared with each other go
    side by side: the two cores are otherwise idle while one of them starts up)."""

    def __init__(self, nproc: int, args: list[str], out: Path, env: dict[str, str] | None = None):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"{out.name}.output"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(_train_cmd(nproc, [*args, "--out", str(out)]), cwd=ROOT, env=env or _env(),
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def done(self) -> Path:
        rc = self.proc.wait(timeout=300)
        assert rc == 0, self.log.read_text()[-5000:]
        return self.out

    def stop(self) -> None:
        """End the run and whatever it started (its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _train(nproc: int, args: list[str], out: Path) -> None:
    Run(nproc, args, out).done()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < tol, f"weights differ by {worst}"
    assert any(float((wa[k] - 0).abs().max()) > 0 for k in wa)


# SGD: Adam divides by sqrt(v), which turns last-bit differences of near-zero gradients (a batch of 64
# in one process vs 2 x 32 summed by DDP) into full-size steps; SGD keeps them at float level
BASE = ["--dataset", "digits", "--model", "small_cnn", "--model-arg", "width=8", "--optimizer", "sgd",
        "--quiet", "--threads", "1"]
PGD = BASE + ["--max", "134", "--objective", "pgd", "--eps", "0.1", "--steps", "2", "--epochs", "4", "--lr", "0.05"]
# eps 0.3 with a fast learning rate: some batches hold both AAEs and normal examples (the regularizer fires)
AAER = BASE + ["--max", "301", "--objective", "rs_aaer", "--eps", "0.3", "--epochs", "3", "--lr", "0.5",
               "--monitor", "on", "--monitor-examples", "30", "--monitor-pgd-steps", "2", "--log-batches"]


@pytest.fixture(scope="module")
def pgd_two_ranks(tmp_path_factory):
    """The uninterrupted 2-process PGD run (per-rank batch 16): the batch test's and the kill tests' reference,
    started when first asked for."""
    run = Run(2, [*PGD, "--batch-size", "16"], tmp_path_factory.mktemp("pgd2") / "ref")
    yield run
    run.stop()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pgd", "rs_aaer"])
def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path, name, request):
    """Per-rank batch B x 2 ranks == batch 2B in one process (the last batch is a partial one)."""
    from experiments.cli import main

    if name == "pgd":
        two = request.getfixturevalue("pgd_two_ranks")
        one = [*PGD, "--batch-size", "32"]
    else:
        two = Run(2, [*AAER, "--batch-size", "32"], tmp_path / "two")
        one = [*AAER, "--batch-size", "64"]
    one_dir = tmp_path / "one"
    assert main(["train", *one, "--out", str(one_dir)]) == 0   # one process: this one, while torchrun runs
    two_dir = two.done()
    _assert_same_weights(one_dir, two_dir)
    logs = [[json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (one_dir, two_dir)]
    assert len(logs[0]) == len(logs[1]) > 1
    for a, b in zip(*logs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"]
        for k in ("val_clean", "val_pgd", "val_fgsm", "train_aae_count", "train_gate_open"):
            assert (k in a) == (k in b)
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9)
    if name == "rs_aaer":  # the regularizer really ran, on global statistics
        batches = [json.loads(line) for line in (two_dir / "batches.jsonl").read_text().splitlines()]
        assert any(r["gate_open"] and r["reg"] > 0 for r in batches)
    assert not (two_dir / "parts").exists()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the ranks")
@pytest.mark.parametrize("victim", [0, 1])
def test_killing_a_rank_mid_run_and_rerunning_resumes_to_the_same_weights(tmp_path, victim, pgd_two_ranks):
    args = [*PGD, "--batch-size", "16"]
    out = tmp_path / "killed"
    log = out / "train_log.jsonl"
    # rank 0 stops right after committing epoch 1 (`conftest.pausing_env`), rank 1 waits for it at the barrier
    run = Run(2, args, out, env=pausing_env(_env(), log, 1))
    try:
        paused = wait_for_pause(run.proc, log)
        assert paused == _rank_pid(run.proc.pid, 0)
        pid = _rank_pid(run.proc.pid, victim)
        assert pid is not None and run.proc.poll() is None
        os.kill(pid, signal.SIGKILL)
        assert run.proc.wait(timeout=120) != 0
    finally:
        run.stop()
    assert not (out / "model.safetensors").exists()
    assert len(log.read_text().splitlines()) == 1
    if victim == 0:
        _train(2, args, out)
    else:  # resumed on one process with the same global batch (the run's stamp holds the global batch)
        _train(1, [*PGD, "--batch-size", "32"], out)
    _assert_same_weights(pgd_two_ranks.done(), out)
    assert len(log.read_text().splitlines()) == 4
