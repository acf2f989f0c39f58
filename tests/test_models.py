"""bastion.models: registry, the standard CIFAR architectures (parameter counts), normalization inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.errors import ModelError
from bastion.models import NormalizedModel, create_model, is_model, list_models, register_model


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_builtin_models():
    names = list_models()
    for n in ("mlp", "small_cnn", "conv_linear", "preact_resnet18", "wrn28_10"):
        assert n in names and is_model(n)
    assert names == sorted(names)
    assert list_models("wrn*") == [n for n in names if n.startswith("wrn")]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name,kwargs", [("mlp", {"hidden": (16,)}), ("small_cnn", {"width": 4}),
                                         ("small_cnn", {"width": 4, "batchnorm": True}),
                                         ("conv_linear", {"width": 4}), ("wrn", {"depth": 10, "widen": 1})])
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 16)])
def test_small_models_forward(name, kwargs, channels, size):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7, in_channels=channels, image_size=size, **kwargs)
    assert isinstance(m, NormalizedModel)
    out = m(torch.rand(3, channels, size, size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_normalization_is_inside_the_model():
    m = create_model("mlp", 3, 2, 4, mean=[0.2, 0.4], std=[0.5, 0.25], hidden=())
    x = torch.rand(5, 2, 4, 4)
    expect = m.net((x - torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1))
    assert torch.allclose(m(x), expect)
    # mean/std are buffers: they travel with the state dict, and are not trained
    sd = m.state_dict()
    assert "normalize.mean" in sd and "normalize.std" in sd
    assert all("normalize" not in n for n, _ in m.named_parameters())
    default = create_model("mlp", 3, 2, 4)
    assert default.normalize.mean.flatten().tolist() == [0.5, 0.5]


# Reference counts: PreAct-ResNet-18 in the Wong et al. 2020 / AAER layout (with the final BN) and
# WRN-28-10 (Zagoruyko & Komodakis), for 3x32x32 inputs.
@pytest.mark.parametrize("name,classes,count", [("preact_resnet18", 10, 11_172_170),
                                                ("preact_resnet18", 100, 11_218_340),
                                                ("wrn28_10", 10, 36_479_194)])
def test_standard_cifar_parameter_counts(name, classes, count):
    m = create_model(name, classes, 3, 32)
    assert _params(m) == count


@pytest.mark.parametrize("name", ["preact_resnet18", "wrn28_10"])
def test_heavy_models_forward_two_images(name):
    torch.manual_seed(0)
    m = create_model(name, 10, 3, 32).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_model_errors():
    with pytest.raises(ModelError, match="unknown model 'resnet9000'.*available"):
        create_model("resnet9000", 10, 3, 32)
    with pytest.raises(ModelError, match="takes no argument.*'depth'"):
        create_model("mlp", 10, 1, 8, depth=3)
    with pytest.raises(ModelError, match="mean/std need 3 values"):
        create_model("mlp", 10, 3, 8, mean=[0.5])
    with pytest.raises(ModelError, match="std finite and > 0"):
        create_model("mlp", 10, 1, 8, std=[0.0])
    with pytest.raises(ModelError, match="num_classes must be a positive integer"):
        create_model("mlp", 0, 1, 8)
    with pytest.raises(ModelError, match="image_size"):
        create_model("mlp", 10, 1, "8")
    with pytest.raises(ModelError, match="6n \\+ 4"):
        create_model("wrn", 10, 3, 32, depth=11)
    with pytest.raises(ModelError, match="image_size >= 4"):
        create_model("small_cnn", 10, 1, 3)
    with pytest.raises(ModelError, match="cannot build model 'mlp'"):
        create_model("mlp", 10, 1, 8, hidden=("wide",))


def test_register_model_and_duplicate():
    @register_model("test_tiny_linear")
    def tiny(num_classes, in_channels, image_size, bias: bool = True):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes, bias=bias))

    m = create_model("test_tiny_linear", 2, 1, 3, bias=False)
    assert _params(m) == 18 and "test_tiny_linear" in list_models("test_*")
    with pytest.raises(ModelError, match="registered twice"):
        register_model("test_tiny_linear")(tiny)
