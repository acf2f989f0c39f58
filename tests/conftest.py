"""Shared, generic test fixtures. Keep this small: area-specific fixtures live in their test files."""

from __future__ import annotations

import pytest
import torch

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
