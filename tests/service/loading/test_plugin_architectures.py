"""Architectures from installed packages, found through a real entry point."""

from __future__ import annotations

import sys

import pytest
import torch

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import describe_model, load_model
from hostile_files import install_plugin, plugin_checkpoint

PLUGIN = '''
import torch
from torch import nn


class TinyResidual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(x + torch.relu(self.inner(x)))


def build(config):
    return TinyResidual(config["width"])


def broken(config):
    raise KeyError("depth")
'''


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    entry_points = {"tiny_residual": "tinyplug:build", "broken": "tinyplug:broken", "missing": "tinyplug_gone:build"}
    install_plugin(tmp_path, "tinyplug", PLUGIN, entry_points, monkeypatch)
    yield
    sys.modules.pop("tinyplug", None)


def _checkpoint(tmp_path, architecture: str, width: int = 3):
    return plugin_checkpoint(tmp_path, "tinyplug", "TinyResidual", architecture, width)


def test_loads_through_the_entry_point(plugin_installed, tmp_path):
    path, original = _checkpoint(tmp_path, "tiny_residual")
    model = load_model(path)
    assert (model.format, model.architecture, model.config) == ("plugin", "tiny_residual", {"width": 3})
    x = torch.randn(4, 3)
    torch.testing.assert_close(model.module(x), original(x))
    assert model.parameter_blocks == {"inner": ["inner.weight", "inner.bias"], "head": ["head.weight", "head.bias"]}
    described = describe_model(model)
    assert described["lipschitz_chain"]["found"] is False
    assert "not an nn.Sequential" in described["lipschitz_chain"]["reason"]


def test_explicit_plugin_format(plugin_installed, tmp_path):
    path, _ = _checkpoint(tmp_path, "tiny_residual")
    assert load_model(path, format="plugin").format == "plugin"


def test_sequential_is_not_a_plugin(plugin_installed, tmp_path, refuses):
    path, _ = _checkpoint(tmp_path, "tiny_residual")
    with refuses(InvalidInput, "built in, not a plugin"):
        load_model(path, format="plugin", architecture="sequential")


def test_unknown_architecture_lists_plugins(plugin_installed, tmp_path, refuses):
    path, _ = _checkpoint(tmp_path, "tiny_residual")
    with refuses(InvalidInput, "unknown architecture 'resnet'", "sequential", "tiny_residual"):
        load_model(path, architecture="resnet")


def test_factory_error_is_wrapped(plugin_installed, tmp_path, refuses):
    path, _ = _checkpoint(tmp_path, "broken")
    with refuses(InvalidInput, "plugin 'broken' could not build", "depth"):
        load_model(path)


def test_plugin_that_fails_to_import(plugin_installed, tmp_path, refuses):
    path, _ = _checkpoint(tmp_path, "missing")
    with refuses(InvalidInput, "plugin 'missing'", "failed to import"):
        load_model(path)


def test_weights_for_another_width(plugin_installed, tmp_path, refuses):
    path, _ = _checkpoint(tmp_path, "tiny_residual", width=3)
    with refuses(InvalidInput, "shape mismatch", "inner.weight"):
        load_model(path, config={"width": 5})


def test_known_architectures(plugin_installed):
    from curvscope_service.loading import known_architectures
    from curvscope_service.loading.hugging_face import ARCHITECTURES

    # the service's own entry points (the transformers classes of checkpoint folders) among them
    assert known_architectures() == ["sequential", *sorted(["broken", "missing", "tiny_residual", *ARCHITECTURES])]
