import pytest
import torch

from torchdkm.app.zoo.models import MODEL_NAMES, MLP, MobileNetSmall, ResNetSmall, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls", [ResNetSmall, MobileNetSmall])
def test_small_convnets_forward_shape(cls):
    model = cls(num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("cls", [ResNetSmall, MobileNetSmall])
def test_small_convnets_stay_small(cls):
    # Small enough for a CPU epoch on Fashion-MNIST in a couple of minutes.
    assert 100_000 < n_params(cls()) < 700_000


def test_small_convnets_accept_rgb_and_width():
    model = ResNetSmall(num_classes=3, in_channels=3, width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 28, 28)).shape == (1, 3)


def test_small_convnets_backward():
    model = ResNetSmall()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_forward_shape():
    model = MLP(in_features=64, hidden=32, num_classes=10)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 8, 8)).shape == (5, 10)  # images are flattened


@pytest.mark.parametrize(
    "name, expected",
    [("resnet50", 25_557_032), ("mobilenet_v1", 4_231_976)],
)
def test_imagenet_parameter_counts(name, expected):
    assert n_params(build_model(name)) == expected


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v1"])
def test_imagenet_forward_shape(name):
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        # Global pooling makes the head independent of input size; 64px keeps this fast.
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_registry_builds_every_name():
    assert set(MODEL_NAMES) == {"resnet_small", "mobilenet_small", "resnet50", "mobilenet_v1", "mlp", "small_cnn"}
    assert isinstance(build_model("resnet_small", width=8), ResNetSmall)
    cnn = build_model("small_cnn")
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in cnn.parameters()) == 215_418  # the demo's "0.22 M parameters"
    assert isinstance(build_model("mlp", in_features=64, hidden=16, num_classes=10), MLP)


def test_registry_unknown_name():
    with pytest.raises(ValueError) as info:
        build_model("vgg16")
    message = str(info.value)
    assert "vgg16" in message
    assert all(name in message for name in MODEL_NAMES)
