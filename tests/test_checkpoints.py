"""bastion.checkpoints: safetensors + JSON card round trip; pickles, mismatches and corruption refused."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from bastion.checkpoints import load_checkpoint, load_state, make_card, read_card, save_checkpoint, sha256_file
from bastion.errors import CheckpointError
from bastion.models import create_model


def _model(width=4, classes=3):
    torch.manual_seed(0)
    return create_model("small_cnn", classes, 1, 8, mean=[0.1], std=[0.3], width=width, batchnorm=True)


def _save(tmp_path, name="ckpt", width=4, classes=3):
    m = _model(width, classes)
    card = make_card(m, "small_cnn", classes, (1, 8, 8), arch_kwargs={"width": width, "batchnorm": True},
                     class_names=["a", "b", "c"][:classes], dataset="synthetic", recipe={"lr": 0.1}, seed=7,
                     metrics={"clean": 0.5})
    path = save_checkpoint(tmp_path / name, m, card)
    return m, path


def test_round_trip(tmp_path):
    m, path = _save(tmp_path)
    assert path == tmp_path / "ckpt.safetensors" and (tmp_path / "ckpt.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    card = json.loads((tmp_path / "ckpt.json").read_text())
    assert card["sha256"] == sha256_file(path) and card["arch"] == "small_cnn" and card["seed"] == 7
    assert card["mean"] == pytest.approx([0.1]) and card["std"] == pytest.approx([0.3])
    assert card["class_names"] == ["a", "b", "c"] and card["input_shape"] == [1, 8, 8]
    for p in (tmp_path / "ckpt", path, tmp_path / "ckpt.json"):
        loaded, card2 = load_checkpoint(p)
        assert not loaded.training and card2 == card
        sd, sd2 = m.state_dict(), loaded.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        x = torch.rand(4, 1, 8, 8)
        m.eval()
        assert torch.equal(m(x), loaded(x))


def test_names_with_dots_keep_their_stem(tmp_path):
    _, path = _save(tmp_path, name="model.eps8")
    assert path.name == "model.eps8.safetensors" and (tmp_path / "model.eps8.json").is_file()
    load_checkpoint(tmp_path / "model.eps8")


def test_refuses_pickle_files(tmp_path, monkeypatch):
    m, path = _save(tmp_path)
    torch.save(m.state_dict(), tmp_path / "model.pt")  # zip archive
    torch.save(m.state_dict(), path, _use_new_zipfile_serialization=False)  # legacy pickle, right name
    called = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: called.append(1))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: called.append(1))
    monkeypatch.setattr(torch, "load", lambda *a, **k: called.append(1))
    with pytest.raises(CheckpointError, match="pickle/torch.save file.*never loads"):
        load_checkpoint(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle/torch.save file"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="pickle/torch.save file"):
        load_state(path)
    (tmp_path / "proto0.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=0))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_state(tmp_path / "proto0.safetensors")
    assert called == []


def test_card_that_does_not_match_weights(tmp_path):
    _save(tmp_path)
    card_path = tmp_path / "ckpt.json"
    card = json.loads(card_path.read_text())
    # weights of another checkpoint behind this card: sha256 differs
    _save(tmp_path, name="other", width=8)
    (tmp_path / "ckpt.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load_checkpoint(tmp_path / "ckpt")
    # right sha, wrong architecture arguments in the card
    card_path.write_text(json.dumps({**card, "sha256": sha256_file(tmp_path / "ckpt.safetensors")}))
    with pytest.raises(CheckpointError, match="do not match the card's architecture 'small_cnn'"):
        load_checkpoint(tmp_path / "ckpt")
    # a different number of classes
    other = json.loads((tmp_path / "other.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**other, "num_classes": 5}))
    with pytest.raises(CheckpointError, match="do not match the card's architecture"):
        load_checkpoint(tmp_path / "other")
    # an architecture that does not exist
    (tmp_path / "other.json").write_text(json.dumps({**other, "arch": "nope"}))
    with pytest.raises(CheckpointError, match="cannot be built.*unknown model 'nope'"):
        load_checkpoint(tmp_path / "other")


def test_corrupt_and_truncated_weights(tmp_path):
    _, path = _save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="do not match the sha256.*corrupt, truncated"):
        load_checkpoint(tmp_path / "ckpt")
    # without a sha to compare, the safetensors reader itself must refuse it
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_state(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_state(path)
    bad_header = bytearray(data)
    bad_header[9:14] = b"#####"
    path.write_bytes(bytes(bad_header))
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_state(path)


def test_missing_and_bad_cards(tmp_path):
    with pytest.raises(CheckpointError, match="card.*not found"):
        load_checkpoint(tmp_path / "nothing")
    _, path = _save(tmp_path)
    card_path = tmp_path / "ckpt.json"
    card = json.loads(card_path.read_text())
    path.unlink()
    with pytest.raises(CheckpointError, match="weights.*not found"):
        load_checkpoint(tmp_path / "ckpt")
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_card(tmp_path / "ckpt")
    card_path.write_text(json.dumps({k: v for k, v in card.items() if k != "arch"}))
    with pytest.raises(CheckpointError, match="lacks \\['arch'\\]"):
        read_card(tmp_path / "ckpt")
    card_path.write_text(json.dumps({**card, "input_shape": [1, 8]}))
    with pytest.raises(CheckpointError, match="input_shape must be"):
        read_card(tmp_path / "ckpt")


_BYTES_SCRIPT = """
import hashlib, torch
from bastion.checkpoints import safetensors_bytes
t = {f"w{i}": torch.arange(6, dtype=torch.float32 if i % 2 else torch.int64).reshape(2, 3) for i in range(6)}
t["bf"] = torch.ones(3, dtype=torch.bfloat16)
t["flag"] = torch.tensor([True, False])
meta = {k: k.upper() for k in ("format", "zeta", "alpha", "bastion_card_version", "mid", "omega")}
print(hashlib.sha256(safetensors_bytes(t, meta)).hexdigest())
"""


@pytest.mark.slow
def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    import subprocess
    import sys

    from safetensors import safe_open

    from bastion.checkpoints import safetensors_bytes, write_safetensors

    procs = [subprocess.Popen([sys.executable, "-c", _BYTES_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
             for seed in ("1", "2", "3")]   # side by side: independent processes
    digests = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        digests.add(out.strip())
    # 6 metadata keys: the library alone orders them at random per process
    assert len(digests) == 1 and "" not in digests
    # the bytes are a valid safetensors file holding the same tensors and metadata
    t = {"b": torch.rand(2, 3), "a": torch.arange(4), "c": torch.tensor(1.5, dtype=torch.float64)}
    write_safetensors(tmp_path / "x.safetensors", t, {"z": "1", "a": "2"})
    assert (tmp_path / "x.safetensors").read_bytes() == safetensors_bytes(t, {"a": "2", "z": "1"})
    loaded = load_state(tmp_path / "x.safetensors")
    assert loaded.keys() == t.keys() and all(torch.equal(loaded[k], t[k]) for k in t)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"a": "2", "z": "1"}
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_bytes_repeat(tmp_path):
    m, path = _save(tmp_path, name="one")
    card = json.loads((tmp_path / "one.json").read_text())
    card.pop("sha256")
    save_checkpoint(tmp_path / "two", m, card)
    assert path.read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    text = (tmp_path / "two.json").read_text()
    assert list(json.loads(text)) == sorted(json.loads(text)) and text.endswith("}\n")


def test_card_without_arch(tmp_path):
    m = _model()
    card = make_card(m, None, 3, (1, 8, 8))
    assert card["arch"] is None and card["mean"] == pytest.approx([0.1])
    save_checkpoint(tmp_path / "anon", m, card)
    assert read_card(tmp_path / "anon")["arch"] is None
    with pytest.raises(CheckpointError, match="does not record its architecture.*model=create_model"):
        load_checkpoint(tmp_path / "anon")
    loaded, _ = load_checkpoint(tmp_path / "anon", model=_model(width=4))
    x = torch.rand(2, 1, 8, 8)
    m.eval()
    assert torch.equal(loaded(x), m(x))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "anon", model=_model(width=8))
    (tmp_path / "anon.json").write_text(json.dumps({**card, "arch": 3}))
    with pytest.raises(CheckpointError, match="arch must be a string or null"):
        read_card(tmp_path / "anon")
