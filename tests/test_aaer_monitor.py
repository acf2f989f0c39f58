"""CO detector on hand-made curves; the monitor's flags in the run log and the report; early stop;
iteration checks; resume of an AAER run to identical weights; `bastion train` from the CLI."""

import json

import pytest
import torch

import defenses.co_monitor as com
import defenses.training_report  # noqa: F401  (registers the "training" renderer)
from bastion.data import load_dataset
from bastion.models import create_model
from bastion.report import metrics_document, section, write_report
from bastion.train import Callback, TrainConfig, create_objective, fit
from defenses.co_monitor import COMonitor, co_flags, evaluate_co, first_co


def test_co_detector_on_hand_made_curves():
    # classic CO: PGD peaks at .42 then collapses while FGSM climbs
    pgd = [0.20, 0.35, 0.42, 0.40, 0.30, 0.15, 0.03, 0.00]
    fgsm = [0.30, 0.45, 0.55, 0.60, 0.70, 0.80, 0.90, 0.95]
    flags = co_flags(pgd, fgsm)
    assert flags == [False] * 5 + [True, True, True]
    assert first_co(flags) == 5
    # PGD falls but FGSM falls with it (ordinary degradation): no CO
    assert not any(co_flags([0.4, 0.3, 0.1, 0.05], [0.5, 0.35, 0.15, 0.1]))
    # never robust (peak < 0.1): no CO even with a big FGSM-PGD gap
    assert not any(co_flags([0.05, 0.08, 0.01], [0.5, 0.9, 0.95]))
    # exactly half the peak is not "below" half
    assert co_flags([0.4, 0.2], [0.4, 0.9]) == [False, False]
    with pytest.raises(Exception, match="equally long"):
        co_flags([0.1], [0.1, 0.2])


def _tiny():
    tr = load_dataset("synthetic", "train", seed=0, num_examples_total=96, size=8)
    te = load_dataset("synthetic", "test", seed=0, num_examples_total=40, size=8)
    return tr, te


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("conv_linear", 4, 1, 8, width=4)


SCRIPT = [(0.9, 0.5, 0.3), (0.9, 0.6, 0.4), (0.95, 0.9, 0.1), (0.95, 0.95, 0.0)]  # clean, fgsm, pgd per epoch


def _scripted(monkeypatch):
    calls = {"n": 0}

    def fake(model, data, eps, pgd_steps=20, pgd_alpha=None, batch_size=500, generator_parts=(0,)):
        c, f, p = SCRIPT[min(calls["n"], len(SCRIPT) - 1)]
        calls["n"] += 1
        return {"val_clean": c, "val_fgsm": f, "val_pgd": p, "val_aae_frac": 0.0}

    monkeypatch.setattr(com, "evaluate_co", fake)


def test_monitor_flags_collapse_in_log_and_report(monkeypatch, tmp_path):
    _scripted(monkeypatch)
    tr, te = _tiny()
    mon = COMonitor(te, 0.1, run_dir=tmp_path, quiet=True)
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=0.01, schedule="cyclic")
    res = fit(_model(), tr, create_objective("fgsm", eps=0.1), cfg, run_dir=tmp_path, callbacks=[mon], quiet=True)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["co"] for r in log] == [False, False, True, True]
    assert "CATASTROPHIC OVERFITTING detected at epoch 3" in log[2]["co_event"]
    assert "co_event" not in log[3] and log[3]["co_first_epoch"] == 2
    for key in ("val_clean", "val_fgsm", "val_pgd", "aae_frac", "train_aae_count", "train_v_a", "train_v_n"):
        assert key in log[0]
    doc = metrics_document([section("training", "fgsm", {"objective": "fgsm", "history": res.history})])
    write_report(tmp_path, doc)
    md = (tmp_path / "report.md").read_text()
    assert "**CO at epoch 3**" in md and "CATASTROPHIC OVERFITTING detected at epoch 3" in md
    assert "| 3 |" in md and "**CO**" in md
    assert (tmp_path / "fig_1.png").stat().st_size > 1000


def test_monitor_co_stop_and_iteration_checks(monkeypatch, tmp_path):
    _scripted(monkeypatch)
    tr, te = _tiny()
    mon = COMonitor(te, 0.1, run_dir=tmp_path, co_stop=True, every=2, quiet=True)
    cfg = TrainConfig(epochs=10, batch_size=32, optimizer="adam", lr=0.01, schedule="cyclic")
    res = fit(_model(), tr, create_objective("n_aaer", eps=0.1), cfg, run_dir=tmp_path, callbacks=[mon], quiet=True)
    assert res.stopped_early
    # 3 iterations per epoch, checks after iterations 2, 4, 6, ... use the script too
    pts = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert pts and all("val_pgd" in p and "iteration" in p for p in pts)
    assert res.history[-1]["co"] and "stopped on catastrophic overfitting" in res.history[-1]["stopped"]
    assert len(res.history) < 10


def test_evaluate_co_real_attacks():
    tr, te = _tiny()
    m = _model()
    fit(m, tr, create_objective("fgsm_rs", eps=0.05), TrainConfig(epochs=2, batch_size=32, lr=0.05), quiet=True)
    r1 = evaluate_co(m, te, 0.05, pgd_steps=5, generator_parts=(0, "x"))
    r2 = evaluate_co(m, te, 0.05, pgd_steps=5, generator_parts=(0, "x"))
    assert r1 == r2 and all(0.0 <= v <= 1.0 for v in r1.values())
    assert r1["val_pgd"] <= r1["val_clean"] + 0.2
    assert not m.training  # fit leaves eval mode; evaluate_co restores the mode it found


class _Kill(Callback):
    def on_batch_end(self, model, ctx, stats):
        if ctx.epoch == 2 and ctx.iteration % ctx.iterations_per_epoch == 1:
            raise KeyboardInterrupt


def test_killed_aaer_run_resumes_to_identical_weights(tmp_path):
    tr, te = _tiny()
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="sgd", lr=0.1, schedule="cyclic")

    def obj():
        return create_objective("rs_aaer", eps=0.15, lambda3=20.0)

    a = fit(_model(), tr, obj(), cfg, run_dir=tmp_path / "a", quiet=True,
            callbacks=[COMonitor(te, 0.15, pgd_steps=3, run_dir=tmp_path / "a")])
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tr, obj(), cfg, run_dir=tmp_path / "b", quiet=True,
            callbacks=[COMonitor(te, 0.15, pgd_steps=3, run_dir=tmp_path / "b"), _Kill()])
    assert len((tmp_path / "b" / "train_log.jsonl").read_text().splitlines()) == 2
    b = fit(_model(seed=123), tr, obj(), cfg, run_dir=tmp_path / "b", quiet=True,
            callbacks=[COMonitor(te, 0.15, pgd_steps=3, run_dir=tmp_path / "b")])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    keys = ("val_pgd", "val_fgsm", "co", "train_aae_count", "train_reg")
    assert [{k: r.get(k) for k in keys} for r in a.history] == [{k: r.get(k) for k in keys} for r in b.history]


def test_cli_train_aaer_with_monitor(tmp_path):
    from experiments.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synthetic", "--model", "conv_linear", "--model-arg", "width=4",
               "--objective", "aaer", "--eps", "8/255", "--param", "variant=rs", "--param", "preset=cifar10",
               "--optimizer", "adam", "--lr", "0.01", "--schedule", "cyclic", "--epochs", "2", "--batch-size", "64",
               "--monitor-pgd-steps", "3", "--monitor-every", "2", "--log-batches", "--warmup-epochs", "1",
               "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("val_pgd" in r and "co" in r for r in log)
    batches = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    assert {"aae_count", "v_a", "v_n", "reg", "eps_factor"} <= set(batches[0])
    assert batches[0]["eps_factor"] == 0.0 and batches[-1]["eps_factor"] == 1.0
    card = json.loads((out / "model.json").read_text())
    assert card["recipe"]["lambda2"] == 2.5 and card["recipe"]["lambda3"] == 1.5
    assert "V_A − V_N" in (out / "report.md").read_text()
    assert (out / "monitor.jsonl").is_file()


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_identical_weights(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import pausing_env, wait_for_pause
    from safetensors.torch import load_file

    from experiments.cli import main

    args = ["-m", "experiments", "train", "--dataset", "synthetic", "--model", "conv_linear", "--model-arg",
            "width=4", "--objective", "rs_aaer", "--eps", "0.15", "--param", "lambda3=20", "--optimizer", "sgd",
            "--lr", "0.1", "--schedule", "cyclic", "--epochs", "5", "--batch-size", "32",
            "--monitor-pgd-steps", "10", "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "b" / "train_log.jsonl"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(tmp_path / "b")], env=pausing_env(env, log, 2))
    try:   # the uninterrupted run, in this process while the other one runs to its pause
        assert main([*args[2:], "--threads", "1", "--out", str(tmp_path / "a")]) == 0
        assert wait_for_pause(proc, log) == proc.pid   # epochs 0 and 1 committed, epoch 2 not begun
    finally:
        proc.kill()
        proc.wait()
    assert len(log.read_text().splitlines()) == 2
    assert main([*args[2:], "--threads", "1", "--out", str(tmp_path / "b")]) == 0   # the rerun, in this process
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["val_pgd"] for r in la] == [r["val_pgd"] for r in lb] and len(lb) == 5
