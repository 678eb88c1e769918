"""describe_model: blocks, layers, and whether a LipSDP layer chain was found."""

from __future__ import annotations

import torch
from torch import nn

from curvscope_service.loading import describe_model, load_model, save_sequential


def _export(model, x, path):
    model.eval()
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return load_model(path)


def test_sequential_description(cnn_file):
    described = describe_model(load_model(cnn_file[0]))
    assert set(described) == {"format", "architecture", "num_parameters", "input_shape", "fixed_batch_size", "blocks", "layers", "lipschitz_chain"}
    assert described["input_shape"] == [1, 8, 8] and described["fixed_batch_size"] is None
    assert described["blocks"][0] == {
        "name": "0",
        "num_parameters": 40,
        "parameters": [{"name": "0.weight", "shape": [4, 1, 3, 3]}, {"name": "0.bias", "shape": [4]}],
    }
    assert sum(b["num_parameters"] for b in described["blocks"]) == described["num_parameters"]
    assert [layer["type"] for layer in described["layers"]][:3] == ["conv2d", "batchnorm2d", "relu"]
    assert described["lipschitz_chain"]["found"] is True


def test_max_pooling_breaks_the_chain(tmp_path):
    config = {
        "layers": [
            {"type": "conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3},
            {"type": "max_pool2d", "kernel_size": 2},
            {"type": "flatten"},
        ]
    }
    path = tmp_path / "pool.safetensors"
    module = __import__("curvscope_service.loading.sequential", fromlist=["build"]).build(config)
    save_sequential(path, config, module.state_dict())
    chain = describe_model(load_model(path))["lipschitz_chain"]
    assert chain == {"found": False, "reason": "layer '1' (max_pool2d): max pooling is not slope-restricted"}


def test_exported_cnn_chain(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(), nn.Linear(18, 3), nn.Sigmoid()
    )
    described = describe_model(_export(model, torch.randn(2, 1, 8, 8), tmp_path / "cnn.pt2"))
    assert described["lipschitz_chain"]["found"] is True, described["lipschitz_chain"]
    assert described["input_shape"] == [1, 8, 8]


def test_exported_max_pool_is_named(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))
    chain = describe_model(_export(model, torch.randn(2, 1, 8, 8), tmp_path / "pool.pt2"))["lipschitz_chain"]
    assert chain["found"] is False and "max_pool2d" in chain["reason"] and "max pooling" in chain["reason"]


def test_exported_residual_is_named(tmp_path):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x + torch.relu(self.inner(x)))

    chain = describe_model(_export(Residual(), torch.randn(2, 3), tmp_path / "res.pt2"))["lipschitz_chain"]
    assert chain["found"] is False and "residual add" in chain["reason"], chain


def test_shape_queries_do_not_break_the_chain(tmp_path):
    class Reshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 2)

        def forward(self, x):
            return self.linear(torch.tanh(x.view(x.shape[0], -1)))

    described = describe_model(_export(Reshape(), torch.randn(3, 4, 4), tmp_path / "view.pt2"))
    assert described["lipschitz_chain"]["found"] is True, described["lipschitz_chain"]
    assert [layer["type"] for layer in described["layers"]] == ["view", "tanh", "linear"]
