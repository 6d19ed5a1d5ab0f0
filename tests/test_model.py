"""The model emits raw logits of the configured width; weights load from local files only."""

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig
from pipeline.model import build_model


@pytest.mark.parametrize("num_classes", [1, 2, 10])
def test_head_width_and_raw_logits_c06(num_classes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", num_classes=num_classes)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32) * 5)
    assert out.shape == (2, num_classes)
    assert not any(isinstance(m, (nn.Softmax, nn.Sigmoid)) for m in model.modules())


def test_initial_weights_from_a_local_file_keep_a_fresh_head(tmp_path):
    donor = build_model(ModelConfig(arch="resnet18", num_classes=1000))
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": donor.state_dict()}, path)
    model = build_model(ModelConfig(arch="resnet18", num_classes=1, weights=path))
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert model.fc.weight.shape == (1, 512)


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.weights=.*never downloaded"):
        build_model(ModelConfig(arch="resnet18", weights=tmp_path / "nope.pth"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="shares no tensor"):
        build_model(ModelConfig(arch="resnet18", weights=path))
