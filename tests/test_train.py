"""bastion.train.fit: seeded, logged, checkpointed every epoch, and resumable to bit-identical weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import bastion.checkpoints
from bastion.checkpoints import load_checkpoint, make_card
from bastion.data import load_dataset
from bastion.errors import ConfigError, RunError
from bastion.models import create_model
from bastion.records import JsonlLog
from bastion.train import (
    Callback,
    StandardObjective,
    StepResult,
    StopTraining,
    TrainConfig,
    create_objective,
    fit,
    lr_factor,
)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "train", seed=0, num_examples_total=96)


class NoisyObjective:
    """Uses the global RNG (like dropout would): resume must reproduce it too."""

    name = "noisy"

    def __call__(self, model, x, y, ctx):
        logits = model((x + 0.1 * torch.randn_like(x)).clamp(0, 1))
        return StepResult(F.cross_entropy(logits, y), logits)

    def config(self):
        return {"objective": self.name}


CASES = {
    "standard": (lambda: StandardObjective(), "small_cnn",
                 dict(optimizer="sgd", schedule="cyclic", augment="crop_flip"), {"width": 4, "batchnorm": True}),
    "pgd": (lambda: create_objective("pgd", eps="8/255", steps=2), "mlp",
            dict(optimizer="adam", lr=0.01, schedule="step"), {"hidden": (16,)}),
    "noisy": (lambda: NoisyObjective(), "mlp", dict(schedule="cosine"), {"hidden": (16,)}),
}


def _new_model(arch, kwargs):
    torch.manual_seed(123)
    return create_model(arch, 4, 1, 8, **kwargs)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class KillAfter(Callback):
    """Simulates the process being killed at the end of epoch ``k`` (before its checkpoint)."""

    def __init__(self, k):
        self.k = k

    def on_epoch_end(self, model, epoch, record):
        if epoch == self.k:
            raise KeyboardInterrupt


def _run(tmp, case, data, callbacks=(), epochs=3, seed=0):
    make_obj, arch, cfg_kw, arch_kw = CASES[case]
    cfg_kw = dict(cfg_kw)
    model = _new_model(arch, arch_kw)
    cfg = TrainConfig(epochs=epochs, batch_size=32, seed=seed, lr=cfg_kw.pop("lr", 0.05), **cfg_kw)
    card = make_card(model, arch, 4, (1, 8, 8), arch_kwargs=arch_kw, dataset="synthetic", seed=seed)
    return fit(model, data, make_obj(), cfg, run_dir=tmp, callbacks=callbacks, quiet=True, checkpoint_card=card)


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_run_resumes_bit_identical(tmp_path, case, data):
    full = _run(tmp_path / "full", case, data)
    w_full = _state(full.model)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", case, data, callbacks=[KillAfter(1)])
    log = JsonlLog(tmp_path / "cut" / "train_log.jsonl").read()
    assert [r["epoch"] for r in log] == [0]  # epoch 1 never committed
    resumed = _run(tmp_path / "cut", case, data)
    w_res = _state(resumed.model)
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    strip = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in full.history]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in resumed.history]
    # the exported checkpoints are the same weights
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "last")
    b, card = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last")
    assert card["epoch"] == 2 and card["recipe"]["objective"] == case
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_seeded_and_deterministic(tmp_path, data):
    a = _state(_run(tmp_path / "a", "noisy", data, epochs=1).model)
    b = _state(_run(tmp_path / "b", "noisy", data, epochs=1).model)
    c = _state(_run(tmp_path / "c", "noisy", data, epochs=1, seed=1).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_log_and_checkpoint_every_epoch(tmp_path, data, monkeypatch):
    saved = []
    real = bastion.checkpoints.save_checkpoint

    def spy(path, model, card):
        saved.append(card["epoch"])
        return real(path, model, card)

    monkeypatch.setattr(bastion.checkpoints, "save_checkpoint", spy)
    res = _run(tmp_path, "standard", data)
    assert saved == [0, 1, 2]
    log = JsonlLog(tmp_path / "train_log.jsonl").read()
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for r in log:
        assert {"train_loss", "train_acc", "lr_end", "epoch_seconds"} <= set(r)
        assert math.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 1
    assert res.history == log
    assert not res.model.training and not res.stopped_early
    card = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert card["recipe"]["train"]["epochs"] == 3
    # a finished run restarted does no more work and returns the same weights
    again = _run(tmp_path, "standard", data)
    assert all(torch.equal(x, y) for x, y in zip(res.model.state_dict().values(), again.model.state_dict().values()))
    assert saved == [0, 1, 2]


def test_kill_between_commit_and_export_is_repaired(tmp_path, data, monkeypatch):
    full = _state(_run(tmp_path / "full", "noisy", data, epochs=2).model)
    real = bastion.checkpoints.save_checkpoint
    calls = []

    def dies_on_epoch_1(path, model, card):
        calls.append(card["epoch"])
        if card["epoch"] == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt  # killed after the training state of epoch 1 was committed
        return real(path, model, card)

    monkeypatch.setattr(bastion.checkpoints, "save_checkpoint", dies_on_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", "noisy", data, epochs=2)
    res = _run(tmp_path / "cut", "noisy", data, epochs=2)
    assert calls == [0, 1, 1]  # resume re-exported the stale checkpoint, trained nothing more
    assert [r["epoch"] for r in JsonlLog(tmp_path / "cut" / "train_log.jsonl").read()] == [0, 1]
    m, card = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last")
    assert card["epoch"] == 1
    assert all(torch.equal(full[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(full[k], v) for k, v in res.model.state_dict().items())


def test_stop_training_stays_stopped(tmp_path, data):
    class Stop(Callback):
        def on_epoch_end(self, model, epoch, record):
            raise StopTraining("catastrophic overfitting")

    res = _run(tmp_path, "noisy", data, callbacks=[Stop()])
    assert res.stopped_early and [r["epoch"] for r in res.history] == [0]
    assert res.history[0]["stopped"] == "catastrophic overfitting"
    again = _run(tmp_path, "noisy", data)
    assert again.stopped_early and len(again.history) == 1


def test_resume_with_other_config_refused(tmp_path, data):
    _run(tmp_path, "noisy", data, epochs=1)
    with pytest.raises(RunError, match="different config"):
        _run(tmp_path, "noisy", data, epochs=2)


def test_without_run_dir_and_callbacks_extra(data):
    class Extra(Callback):
        def on_epoch_end(self, model, epoch, record):
            return {"val_clean": 0.5}

    model = _new_model("mlp", {"hidden": (8,)})
    res = fit(model, data, create_objective("standard"), TrainConfig(epochs=1, batch_size=50, schedule="constant"),
              callbacks=[Extra()], quiet=True)
    assert res.run_dir is None and res.history[0]["val_clean"] == 0.5


def test_lr_schedules():
    total = 100
    cos = TrainConfig(schedule="cosine")
    assert lr_factor(cos, 0, total) == (1.0, None)
    assert lr_factor(cos, 50, total)[0] == pytest.approx(0.5)
    assert lr_factor(cos, 25, total)[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    step = TrainConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(step, i, total)[0] for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cyc = TrainConfig(schedule="cyclic", cyclic_peak=0.4, momentum=0.9, cyclic_base_momentum=0.8)
    assert lr_factor(cyc, 0, total) == pytest.approx((0.0, 0.9))
    assert lr_factor(cyc, 20, total) == pytest.approx((0.5, 0.85))
    assert lr_factor(cyc, 40, total) == pytest.approx((1.0, 0.8))
    assert lr_factor(cyc, 70, total) == pytest.approx((0.5, 0.85))
    assert lr_factor(cyc, 100, total) == pytest.approx((0.0, 0.9))
    assert lr_factor(TrainConfig(schedule="cyclic", optimizer="adam"), 10, total)[1] is None
    assert lr_factor(TrainConfig(schedule="constant"), 77, total) == (1.0, None)


def test_bad_configs():
    for kw, msg in [({"schedule": "linear"}, "unknown schedule"), ({"optimizer": "rmsprop"}, "unknown optimizer"),
                    ({"augment": "mixup"}, "unknown augment"), ({"epochs": 0}, "epochs must be >= 1"),
                    ({"cyclic_peak": 0.0}, "cyclic_peak"), ({"lr": float("nan")}, "lr must be a finite"),
                    ({"lr": float("inf")}, "lr must be a finite"), ({"lr": 0}, "lr must be > 0"),
                    ({"weight_decay": float("nan")}, "weight_decay must be a finite"),
                    ({"weight_decay": -1e-4}, "weight_decay must be >= 0"), ({"momentum": 1.0}, "momentum must be in"),
                    ({"momentum": float("inf")}, "momentum must be a finite"),
                    ({"batch_size": 0}, "batch_size must be >= 1"), ({"batch_size": -1}, "batch_size must be >= 1"),
                    ({"batch_size": 2.5}, "batch_size must be an integer"), ({"epochs": True}, "epochs must be an int"),
                    ({"lr": "abc"}, "lr must be a finite"), ({"milestones": (0.5, 2.0)}, "milestones must be <= 1"),
                    ({"gamma": float("nan")}, "gamma"), ({"nesterov": "maybe"}, "nesterov must be true or false")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**kw)
    with pytest.raises(ConfigError, match="unknown objective"):
        create_objective("nope")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        create_objective("pgd", threat="linf:8/255", steps=0)
    for kw, msg in [({"epochs": 0}, "epochs must be >= 1"), ({"lr": float("nan")}, "lr must be a finite")]:
        with pytest.raises(ConfigError, match=msg) as err:
            TrainConfig(**kw)
        assert "\n" not in str(err.value)
    assert TrainConfig(epochs=3.0, lr=1, milestones=[0.5]).epochs == 3


def test_batch_log_after_mid_epoch_kill(tmp_path, data):
    class KillAtIteration(Callback):
        def __init__(self, it):
            self.it = it

        def on_batch_end(self, model, ctx, stats):
            if ctx.iteration == self.it:
                raise KeyboardInterrupt
            return {"progress": ctx.progress}

    def run(path, callbacks):
        model = _new_model("mlp", {"hidden": (8,)})
        cfg = TrainConfig(epochs=2, batch_size=32, schedule="cosine")
        return fit(model, data, StandardObjective(), cfg, run_dir=path, callbacks=callbacks, quiet=True,
                   log_batches=True)

    run(tmp_path / "full", [KillAtIteration(-1)])
    for kill_at in (1, 4):  # mid first epoch (nothing committed), mid second epoch
        cut = tmp_path / f"cut{kill_at}"
        with pytest.raises(KeyboardInterrupt):
            run(cut, [KillAtIteration(kill_at)])
        run(cut, [KillAtIteration(-1)])
        rows = JsonlLog(cut / "batches.jsonl").read()
        full = JsonlLog(tmp_path / "full" / "batches.jsonl").read()
        assert [r["iteration"] for r in rows] == list(range(6))
        assert rows == full


def test_progress_line_shows_what_callbacks_declare(data, capsys):
    class Declares(Callback):
        progress_keys = ("val_clean",)

        def on_epoch_end(self, model, epoch, record):
            return {"val_clean": 0.25, "val_pgd": 0.125, "secret": 7.0}

    model = _new_model("mlp", {"hidden": (8,)})
    fit(model, data, StandardObjective(), TrainConfig(epochs=1, batch_size=50), callbacks=[Declares()])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[standard] epoch 1/1")]
    assert len(line) == 1
    assert "'train_loss'" in line[0] and "'train_acc'" in line[0] and "'val_clean': 0.25" in line[0]
    assert "val_pgd" not in line[0] and "secret" not in line[0]


def test_checkpoints_without_a_card_load(tmp_path, data):
    cfg = TrainConfig(epochs=1, batch_size=32)
    # with arch: a full card, load_checkpoint rebuilds the model
    model = _new_model("mlp", {"hidden": (16,)})
    res = fit(model, data, StandardObjective(), cfg, run_dir=tmp_path / "a", quiet=True, arch="mlp",
              arch_kwargs={"hidden": [16]})
    loaded, card = load_checkpoint(tmp_path / "a" / "checkpoints" / "last")
    assert card["arch"] == "mlp" and card["num_classes"] == 4 and card["input_shape"] == [1, 8, 8]
    assert card["class_names"] == data.class_names and card["dataset"] == "synthetic" and card["seed"] == 0
    x = data.images[:8]
    assert torch.equal(loaded(x), res.model(x))
    # an arch that does not describe the model is refused before any training
    with pytest.raises(ConfigError, match="does not describe the model"):
        fit(_new_model("mlp", {"hidden": (16,)}), data, StandardObjective(), cfg, run_dir=tmp_path / "b",
            quiet=True, arch="mlp", arch_kwargs={"hidden": [8]})
    assert not (tmp_path / "b" / "checkpoints" / "last.json").exists()
    # without arch: the card says so, load_checkpoint names the way out and loads into a given module
    res = fit(_new_model("mlp", {"hidden": (16,)}), data, StandardObjective(), cfg, run_dir=tmp_path / "c",
              quiet=True)
    with pytest.raises(bastion.checkpoints.CheckpointError, match="does not record its architecture.*model="):
        load_checkpoint(tmp_path / "c" / "checkpoints" / "last")
    into = _new_model("mlp", {"hidden": (16,)})
    loaded, card = load_checkpoint(tmp_path / "c" / "checkpoints" / "last", model=into)
    assert card["arch"] is None and loaded is into and torch.equal(loaded(x), res.model(x))
    with pytest.raises(bastion.checkpoints.CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "c" / "checkpoints" / "last", model=_new_model("mlp", {"hidden": (8,)}))


class NaNAt:
    """Standard CE that returns a NaN loss at one global iteration."""

    name = "nan_at"

    def __init__(self, at):
        self.at = at

    def __call__(self, model, x, y, ctx):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepResult(loss * float("nan") if ctx.iteration == self.at else loss, logits)

    def config(self):
        return {"objective": self.name, "at": self.at}


def _finite_and_equal(path, ref):
    m, card = load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())
    return card["epoch"] == ref


def test_divergence_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, data):
    from bastion.train import TrainingDiverged

    cfg = TrainConfig(epochs=3, batch_size=32)  # 3 iterations per epoch
    model = _new_model("mlp", {"hidden": (8,)})
    card = make_card(model, "mlp", 4, (1, 8, 8), arch_kwargs={"hidden": [8]})
    with pytest.raises(TrainingDiverged, match="at epoch 2, iteration 2: loss became nan; the last good "
                                               "checkpoint \\(epoch 1\\) is kept") as err:
        fit(model, data, NaNAt(4), cfg, run_dir=tmp_path / "loss", quiet=True, checkpoint_card=card)
    assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)
    assert _finite_and_equal(tmp_path / "loss" / "checkpoints" / "last", 0)
    assert [r["epoch"] for r in JsonlLog(tmp_path / "loss" / "train_log.jsonl").read()] == [0]

    class BreakWeights(Callback):  # finite losses, NaN weights after the last step of epoch 2
        def on_batch_end(self, model, ctx, stats):
            if ctx.iteration == 5:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("inf")

    model = _new_model("mlp", {"hidden": (8,)})
    with pytest.raises(TrainingDiverged, match="at epoch 2, iteration 3: weight 'net.*' became NaN/inf; the last "
                                               "good checkpoint \\(epoch 1\\)"):
        fit(model, data, StandardObjective(), cfg, run_dir=tmp_path / "w", quiet=True, checkpoint_card=card,
            callbacks=[BreakWeights()])
    assert _finite_and_equal(tmp_path / "w" / "checkpoints" / "last", 0)
    with pytest.raises(TrainingDiverged, match="epoch 1, iteration 1: .*no epoch had finished"):
        fit(_new_model("mlp", {"hidden": (8,)}), data, NaNAt(0), cfg, run_dir=tmp_path / "first", quiet=True)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        fit(_new_model("mlp", {"hidden": (8,)}), data, NaNAt(0), cfg, quiet=True)


_TRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from bastion.data import load_dataset
from bastion.models import create_model
from bastion.train import TrainConfig, create_objective, fit
data = load_dataset("synthetic", "train", seed=0, num_examples_total=64)
torch.manual_seed(0)
model = create_model("small_cnn", 4, 1, 8, width=4)
fit(model, data, create_objective(sys.argv[2], **({"eps": 0.1, "steps": 2} if sys.argv[2] == "pgd" else {})),
    TrainConfig(epochs=2, batch_size=32, seed=3), run_dir=sys.argv[1], quiet=True, arch="small_cnn",
    arch_kwargs={"width": 4})
"""


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["standard", "pgd"])
def test_identical_trainings_in_separate_processes_write_identical_bytes(tmp_path, objective):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, str(tmp_path / name), objective],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin"})
             for name, hashseed in (("a", "1"), ("b", "2"))]   # side by side: independent processes
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for f in ("last.safetensors", "last.json"):
        a = (tmp_path / "a" / "checkpoints" / f).read_bytes()
        assert a == (tmp_path / "b" / "checkpoints" / f).read_bytes(), f
    load_checkpoint(tmp_path / "a" / "checkpoints" / "last")
