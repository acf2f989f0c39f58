"""Composite checkpoints: a model assembled from parts, each its own safetensors file with its own card and
sha256, loaded back into one module under the same refusal rules as a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bastion.checkpoints import (
    load_checkpoint,
    make_card,
    read_card,
    register_composite,
    save_composite,
    sha256_file,
)
from bastion.errors import CheckpointError
from bastion.models import create_model


class Mixed(nn.Module):
    """Two base classifiers and a mixing network that weighs their logits per input."""

    def __init__(self, num_classes: int = 3, hidden: int = 8, mixer_width: int = 4):
        super().__init__()
        self.base_a = create_model("mlp", num_classes, 1, 8, hidden=(hidden,))
        self.base_b = create_model("small_cnn", num_classes, 1, 8, width=4)
        self.mixer = nn.Sequential(nn.Flatten(), nn.Linear(64, mixer_width), nn.ReLU(), nn.Linear(mixer_width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.mixer(x))
        return w * self.base_a(x) + (1 - w) * self.base_b(x)


register_composite("test_mixed", Mixed)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    m = Mixed(hidden=8, mixer_width=4)
    cards = {
        "base_a": make_card(m.base_a, "mlp", 3, (1, 8, 8), {"hidden": [8]}, dataset="synthetic"),
        "base_b": make_card(m.base_b, "small_cnn", 3, (1, 8, 8), {"width": 4}, dataset="synthetic"),
        "mixer": {"role": "mixing network"},
    }
    return m, {name: (getattr(m, name), cards[name]) for name in cards}


def _save(tmp_path, seed=0):
    m, parts = _parts(seed)
    path = save_composite(tmp_path / "mixed", "test_mixed", parts, args={"hidden": 8, "mixer_width": 4},
                          card={"dataset": "synthetic"})
    return m, path


def test_round_trip_identical_outputs(tmp_path):
    m, path = _save(tmp_path)
    assert path == tmp_path / "mixed.json"
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {f"mixed.{p}.{ext}" for p in ("base_a", "base_b", "mixer")
                     for ext in ("json", "safetensors")} | {"mixed.json"}
    card = read_card(tmp_path / "mixed")
    assert card["composite"]["builder"] == "test_mixed" and card["num_classes"] == 3
    assert card["input_shape"] == [1, 8, 8] and card["dataset"] == "synthetic" and len(card["sha256"]) == 64
    for name, entry in card["composite"]["parts"].items():
        assert entry["sha256"] == sha256_file(tmp_path / f"mixed.{name}.safetensors")
    loaded, card2 = load_checkpoint(tmp_path / "mixed.json")
    assert isinstance(loaded, Mixed) and not loaded.training and card2 == card
    x = torch.rand(5, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), loaded(x))
    # a part with a full model card also loads on its own
    base, _ = load_checkpoint(tmp_path / "mixed.base_b")
    assert torch.equal(base(x), m.base_b(x))
    # saving again writes the same bytes
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _save(tmp_path)
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir()}


@pytest.mark.parametrize("part", ["base_a", "mixer"])
def test_tampered_part_is_refused(tmp_path, part):
    _save(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _save(other, seed=1)
    w = tmp_path / f"mixed.{part}.safetensors"
    w.write_bytes((other / f"mixed.{part}.safetensors").read_bytes())  # same shapes, other weights
    with pytest.raises(CheckpointError, match=f"part '{part}'.*do not match the sha256") as err:
        load_checkpoint(tmp_path / "mixed")
    assert "\n" not in str(err.value)
    # also replacing the part's card (consistent pair of files) is caught by the composite card
    (tmp_path / f"mixed.{part}.json").write_text((other / f"mixed.{part}.json").read_text())
    with pytest.raises(CheckpointError, match=f"part '{part}'.*other weights than the composite card"):
        load_checkpoint(tmp_path / "mixed")


def test_missing_part_and_bad_cards_are_refused(tmp_path):
    _save(tmp_path)
    card_path = tmp_path / "mixed.json"
    card = json.loads(card_path.read_text())
    (tmp_path / "mixed.mixer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="part 'mixer'.*weights.*not found"):
        load_checkpoint(tmp_path / "mixed")
    (tmp_path / "mixed.mixer.json").unlink()
    with pytest.raises(CheckpointError, match="part 'mixer'.*card.*not found"):
        load_checkpoint(tmp_path / "mixed")
    _save(tmp_path)
    bad = json.loads(json.dumps(card))
    bad["composite"]["parts"]["mixer"]["file"] = "../elsewhere"
    card_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="part 'mixer' needs a file name in the card's folder"):
        load_checkpoint(tmp_path / "mixed")
    bad = json.loads(json.dumps(card))
    bad["composite"]["parts"]["mixer"]["sha256"] = "0" * 64
    card_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="do not match the card's sha256"):
        load_checkpoint(tmp_path / "mixed")
    # the builder's arguments no longer fit the parts' weights: shapes checked, part named
    bad = json.loads(json.dumps(card))
    bad["composite"]["args"]["mixer_width"] = 5
    card_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="part 'mixer'.*has shape"):
        load_checkpoint(tmp_path / "mixed")
    bad["composite"]["builder"] = "nope"
    card_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="unknown composite builder 'nope'"):
        load_checkpoint(tmp_path / "mixed")


def test_save_refuses_parts_that_do_not_fit(tmp_path):
    m, parts = _parts()
    with pytest.raises(CheckpointError, match="belong to no part"):
        save_composite(tmp_path / "x", "test_mixed", {k: v for k, v in parts.items() if k != "mixer"},
                       args={"hidden": 8, "mixer_width": 4})
    with pytest.raises(CheckpointError, match="part 'base_a'.*has shape"):
        save_composite(tmp_path / "x", "test_mixed", parts, args={"hidden": 16, "mixer_width": 4})
    with pytest.raises(CheckpointError, match="no submodule 'head'"):
        save_composite(tmp_path / "x", "test_mixed", {**parts, "head": (nn.Linear(2, 2), None)},
                       args={"hidden": 8, "mixer_width": 4})
    with pytest.raises(CheckpointError, match="unknown composite builder"):
        save_composite(tmp_path / "x", "nope", parts)
    with pytest.raises(CheckpointError, match="JSON values"):
        save_composite(tmp_path / "x", "test_mixed", parts, args={"hidden": object()})
    assert not list(tmp_path.iterdir())  # nothing written by a refused save
