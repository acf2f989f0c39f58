"""Shared test fixtures: generic ones, and the few that several test files use (keep area-specific ones in
their test files)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bastion.data import load_dataset
from detection.detector import DetectorScore, threshold_at_fpr

# Tests share a couple of CPU cores with other work: one intra-op thread each.
torch.set_num_threads(1)


@pytest.fixture
def synthetic_train():
    """128 seeded 1x8x8 examples of 4 classes (`bastion.data` synthetic data set)."""
    from bastion.data import load_dataset

    return load_dataset("synthetic", "train", seed=0, num_examples_total=128)


@pytest.fixture
def synthetic_test():
    from bastion.data import load_dataset

    return load_dataset("synthetic", "test", seed=0, num_examples_total=64)


@pytest.fixture
def tiny_model():
    """A seeded small MLP for 1x8x8 inputs and 4 classes."""
    from bastion.models import create_model

    torch.manual_seed(0)
    return create_model("mlp", num_classes=4, in_channels=1, image_size=8, hidden=(32,))


@pytest.fixture(scope="session")
def digits():
    """The embedded digits (train, test)."""
    from bastion.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def _digits_mlp_state(digits):
    from bastion.models import create_model
    from bastion.train import StandardObjective, TrainConfig, fit

    torch.manual_seed(0)  # seeds the initialization too (fit seeds only what it draws)
    model = create_model("mlp", 10, 1, 8, hidden=(64,))
    cfg = TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=1e-2, weight_decay=0.0,
                      schedule="constant", seed=0)
    trained = fit(model, digits[0], StandardObjective(), cfg, quiet=True).model
    return {k: v.clone() for k, v in trained.state_dict().items()}


@pytest.fixture(scope="module")
def mlp(_digits_mlp_state):
    """A small MLP trained on digits for a fraction of a second (~97% test accuracy); a fresh copy
    per test module, in eval mode."""
    from bastion.models import create_model

    model = create_model("mlp", 10, 1, 8, hidden=(64,))
    model.load_state_dict(_digits_mlp_state)
    return model.eval()


@pytest.fixture(scope="module")
def batch(digits, mlp):
    """(x, y): 32 digits test images the MLP classifies correctly (a test file may override it)."""
    x, y = digits[1].images[:48], digits[1].labels[:48]
    ok = mlp(x).argmax(1) == y
    return x[ok][:32], y[ok][:32]


class ToyDetector:
    """Score = squared distance to the nearest of some training images: attacks leave the data."""

    def __init__(self, bank: torch.Tensor, name: str = "toy"):
        self.c = bank.flatten(1)
        self.name = name
        self.threshold = None

    def features(self, x, generator=None):
        return x

    def score_features(self, f):
        return ((f.flatten(1).unsqueeze(1) - self.c.to(f.device).unsqueeze(0)) ** 2).mean(2).amin(1) * 100

    def score(self, x, generator=None):
        return self.score_features(x).detach().numpy()

    def set_threshold(self, natural_scores, fpr):
        s = np.asarray(natural_scores)
        self.threshold = threshold_at_fpr(s, fpr)
        self.center, self.scale = float(s.mean()), float(s.std())
        return self.threshold

    def differentiable(self):
        return DetectorScore(self, self.center, self.scale)

    def describe(self):
        return {"name": self.name, "kind": "toy", "threshold": self.threshold}


def fit_full_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2) -> nn.Module:
    """``steps`` full-batch Adam steps on cross-entropy; returns ``model`` in eval mode with frozen weights."""
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def toy_detection():
    """(model, train, test, ToyDetector at 5% FPR): a tiny CNN on synthetic data and a toy detector."""
    torch.manual_seed(0)
    train = load_dataset("synthetic", "train", num_examples_total=200)
    test = load_dataset("synthetic", "test", num_examples_total=48)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))
    fit_full_batch(model, train.images, train.labels, 60)
    det = ToyDetector(train.images[:100])
    det.set_threshold(det.score(train.images[100:]), 0.05)
    return model, train, test, det


ROOT = Path(__file__).resolve().parents[1]
PAUSE_HOOK = Path(__file__).resolve().parent / "pause_hook"


def pausing_env(env: dict[str, str], log: Path, lines: int) -> dict[str, str]:
    """``env`` for a child process that stops itself (sleeps until killed) right after an append leaves
    the line log ``log`` (absolute path) with at least ``lines`` lines: a kill point mid-run that does
    not depend on the machine's speed (pause_hook/sitecustomize.py). `wait_for_pause` waits for it."""
    path = [str(PAUSE_HOOK), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "PYTHONPATH": os.pathsep.join(path), "BASTION_TEST_PAUSE": f"{lines}:{log}"}


def wait_for_pause(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    """Wait until the run started with `pausing_env` (``proc``, or a process it started) has paused;
    returns the id of the paused process."""
    marker = Path(os.path.realpath(log) + ".paused")
    deadline = time.time() + timeout
    while not marker.is_file():
        assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before its pause point"
        assert time.time() < deadline, f"the run did not reach its pause point in {timeout} s"
        time.sleep(0.02)
    pid = int(marker.read_text())
    marker.unlink()   # leave the run directory as the run left it
    return pid


def kill_when_written(cmd: list[str], target: Path, cwd: Path, env: dict[str, str], timeout: float = 240) -> None:
    """Start ``cmd`` in its own session and SIGKILL it (and its workers) once ``target`` has its first
    records (the run pauses there, see `pausing_env`): a crash mid-run, for the resume tests."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=pausing_env(env, target, 1), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            wait_for_pause(proc, target, timeout)
        except AssertionError as exc:
            err.seek(0)
            raise AssertionError(f"{exc}\n{err.read().decode(errors='replace')[-3000:]}") from None
        finally:
            with contextlib.suppress(ProcessLookupError):   # gone already if it ended early
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
