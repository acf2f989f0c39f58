"""rRCM models, objectives, composite checkpoints, certification and the collapse flag (tiny, CPU)."""

import pytest
import torch

from bastion.checkpoints import load_checkpoint
from bastion.data import load_dataset
from bastion.errors import ConfigError
from bastion.train import TrainConfig, create_objective, fit
from certify.runner import CertifyOptions, Setting, run_certification
from defenses.consistency import RRCMClassifier, RRCMPretrainer, build_encoder, info_nce, save_rrcm_classifier
from defenses.consistency_compare import ConstantClassifier, inference_costs, split_validation
from defenses.consistency_report import predicted_class_histogram

SHAPE = (1, 8, 8)
TINY = {"kind": "mlp", "hidden": 16, "depth": 1, "out": 8, "temb": 8}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "train", num_examples_total=64), load_dataset("synthetic", "test",
                                                                                    num_examples_total=32)


@pytest.mark.parametrize("spec", [TINY, {"kind": "cnn", "width": 4, "out": 8, "temb": 8},
                                  {"kind": "vit", "patch": 2, "dim": 8, "depth": 1, "heads": 2}])
def test_encoders_shapes_and_time_conditioning(spec):
    enc = build_encoder(spec, SHAPE)
    u = torch.rand(5, *SHAPE)
    h1, h2 = enc(u, torch.full((5,), 0.5)), enc(u, torch.full((5,), 2.0))
    assert h1.shape == (5, enc.dim) and not torch.allclose(h1, h2)


def test_bad_encoder_kind():
    with pytest.raises(ConfigError):
        build_encoder({"kind": "resnet"}, SHAPE)


def test_classifier_uses_the_spec_level():
    m = RRCMClassifier(TINY, SHAPE, 4, 0.5)
    assert m.level == 48 and m.t_star == pytest.approx(0.965417, abs=1e-6)
    assert m(torch.rand(3, *SHAPE)).shape == (3, 4)


def test_info_nce_prefers_matching_rows():
    f = torch.eye(4)
    assert info_nce(f, f, 0.2).mean() < info_nce(f, f.roll(1, 0), 0.2).mean()


def test_pretrain_objective_runs_and_moves_the_teacher(data):
    train, _ = data
    m = RRCMPretrainer(TINY, SHAPE, proj_hidden=8, proj_out=4)
    before = [p.clone() for p in m.teacher_encoder.parameters()]
    res = fit(m, train, create_objective("rrcm_pretrain"), TrainConfig(epochs=2, batch_size=32, optimizer="adam",
                                                                        lr=1e-2, weight_decay=0), quiet=True)
    h = res.history[-1]
    assert {"train_ctr", "train_con", "train_levels", "train_ema"} <= set(h)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.teacher_encoder.parameters()))
    assert all(not p.requires_grad for p in m.teacher_encoder.parameters())


@pytest.mark.parametrize("params", [{"use_con": False}, {"use_ctr": False}, {"con_target": "ema"},
                                    {"per_sample_index": True}])
def test_pretrain_ablations_run(data, params):
    m = RRCMPretrainer(TINY, SHAPE, proj_hidden=8, proj_out=4)
    fit(m, data[0], create_objective("rrcm_pretrain", **params), TrainConfig(epochs=1, batch_size=32,
                                                                              optimizer="adam", weight_decay=0),
        quiet=True)


def test_bad_params_are_one_line_config_errors():
    with pytest.raises(ConfigError):
        create_objective("rrcm_pretrain", use_ctr=False, use_con=False)
    with pytest.raises(ConfigError):
        create_objective("rrcm_pretrain", con_target="teacher")
    with pytest.raises(ConfigError):
        create_objective("consistency", m=0)


def test_consistency_objective_and_lambda_ramp(data):
    m = RRCMClassifier(TINY, SHAPE, 4, 0.25)
    res = fit(m, data[0], create_objective("consistency", sigma=0.25, lam=20, lam_ramp_epochs=2),
              TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0), quiet=True)
    assert res.history[0]["train_lam"] < 20 and {"train_kl", "train_entropy", "train_acc"} <= set(res.history[-1])


def test_composite_roundtrip_and_certify_by_path(data, tmp_path):
    train, test = data
    m = RRCMClassifier(TINY, SHAPE, 4, 0.25).eval()
    path = save_rrcm_classifier(tmp_path / "rrcm", m, TINY, SHAPE, {"dataset": "synthetic"})
    loaded, card = load_checkpoint(path)
    x = torch.rand(6, *SHAPE)
    assert torch.allclose(loaded(x), m(x)) and card["num_classes"] == 4
    doc = run_certification([Setting("rrcm", str(path), 0.25, 4)], test.every(8), tmp_path / "cert",
                            CertifyOptions(n0=10, n=50, batch=50), quiet=True)
    assert doc["sections"][0]["data"]["settings"][0]["num_examples"] == 4
    assert (tmp_path / "cert" / "certify-rrcm.tsv").is_file()


def test_constant_classifier_is_flagged(data, tmp_path):
    _, test = data
    run_certification([Setting("const", ConstantClassifier(4, 2), 0.25, 4)], test.every(4), tmp_path / "c",
                      CertifyOptions(n0=10, n=50, batch=50), quiet=True)
    from bastion.records import RunDir

    h = predicted_class_histogram(list(RunDir(tmp_path / "c").records.unique()), 4)
    assert h["collapsed"] and h["top_class"] == 2 and h["top_share"] == 1.0
    assert not predicted_class_histogram([{"kind": "certify", **r} for r in []], 4)["collapsed"]


def test_stratified_validation_split(data):
    tr, val = split_validation(data[0], 0.25)
    assert len(tr) + len(val) == 64 and set(val.labels.tolist()) == {0, 1, 2, 3}
    assert not set(tr.indices.tolist()) & set(val.indices.tolist())


def test_inference_costs_side_by_side():
    c = inference_costs({"a": RRCMClassifier(TINY, SHAPE, 4, 0.25), "b": ConstantClassifier(4)}, SHAPE, "cpu",
                        batch=16, repeats=1)
    assert c["a"]["flops"] > 0 and c["a"]["wall_s_per_sample"] > 0


def test_certify_report_flags_a_collapsed_model(data, tmp_path):
    import certify.folds  # noqa: F401
    from bastion.report import renderer

    _, test = data
    doc = run_certification([Setting("const", ConstantClassifier(4, 1), 0.25, 4),
                             Setting("rrcm", RRCMClassifier(TINY, SHAPE, 4, 0.25), 0.25, 4)], test.every(4),
                            tmp_path / "c", CertifyOptions(n0=10, n=50, batch=50), quiet=True)
    assert doc["sections"][0]["type"] == "certification"
    sec = next(s for s in doc["sections"] if s["type"] == "predicted_classes")
    assert sec["data"]["collapsed"] == ["const"] or "const" in sec["data"]["collapsed"]
    md, _ = renderer("predicted_classes")(sec)
    assert "COLLAPSED" in md and "const" in md
    assert "COLLAPSED" in (tmp_path / "c" / "report.md").read_text()


def test_denoised_costs_over_ten_times_the_flops_at_digits_sizes():
    pytest.importorskip("diffusers")
    from bastion.models import create_model
    from defenses.consistency_compare import forward_flops
    from defenses.denoised import DenoisedClassifier
    from detection.diffusers_backend import build_scheduler, build_unet

    x = torch.rand(4, *SHAPE)
    rrcm = RRCMClassifier({"kind": "mlp"}, SHAPE, 10, 0.25)
    acp = build_scheduler().alphas_cumprod
    dds = DenoisedClassifier(build_unet(1, 8, (16, 32)), create_model("mlp", 10, 1, 8), acp, 0.25)
    assert forward_flops(dds, x) >= 10 * forward_flops(rrcm, x)
