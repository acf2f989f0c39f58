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
