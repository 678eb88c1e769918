"""Hostile state-dict models: what a config or a header declares is checked on the meta device,
against the caps and against the file, before any of it is allocated."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.engine import describe
from curvscope_service.errors import InvalidInput, ResourceExhausted
from curvscope_service.loading import load_data, load_model, save_sequential, validate_pair
from curvscope_service.loading import sequential
from curvscope_service.loading.checkpoint import DEFAULT_MAX_PARAMETERS, MAX_CONFIG_BYTES
from hostile_files import install_plugin, peak_growth, plugin_checkpoint

SMALL = {"layers": [{"type": "linear", "in_features": 4, "out_features": 3}]}
HUGE_LINEAR = {"layers": [{"type": "linear", "in_features": 16000, "out_features": 16000}]}


def _small_model(tmp_path, metadata_config: str | None = None):
    path = tmp_path / "small.safetensors"
    state = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3)}
    save_file(state, str(path), metadata={"architecture": "sequential", "config": metadata_config or json.dumps(SMALL)})
    return path


def test_metadata_config_nested_200000_deep(tmp_path, refuses):
    path = _small_model(tmp_path, "[" * 200_000 + "]" * 200_000)
    with refuses(InvalidInput, "safetensors metadata 'config'", "nests JSON deeper"):
        load_model(path)


def test_metadata_config_over_its_byte_cap(tmp_path, refuses):
    config = dict(SMALL, pad=" " * MAX_CONFIG_BYTES)
    path = _small_model(tmp_path, json.dumps(config))
    with refuses(InvalidInput, "safetensors metadata 'config'", f"the limit is {MAX_CONFIG_BYTES}"):
        load_model(path)


@pytest.mark.parametrize("where", ["metadata", "override"])
def test_declared_layer_is_not_allocated_before_the_weights_match(tmp_path, where):
    # Linear(16000, 16000) is a 1 GB layer the file does not hold: it used to be built and
    # initialised before the weights were compared (1.1 GB -> 2.1 GB)
    if where == "metadata":
        path = _small_model(tmp_path, json.dumps(HUGE_LINEAR))
        result = peak_growth(f"load_model({str(path)!r})")
    else:
        path = _small_model(tmp_path)
        result = peak_growth(f"load_model({str(path)!r}, config={HUGE_LINEAR!r})")
    assert result["outcome"].startswith("InvalidInput"), result
    assert "shape mismatch" in result["outcome"] and "0.weight [3, 4] vs [16000, 16000]" in result["outcome"]
    assert result["growth_mb"] < 100, result


def test_default_parameter_cap_before_any_allocation(tmp_path):
    # 2.5e9 parameters would be 10 GB: refused from the meta build, in DescribeModel's load too
    config = {"layers": [{"type": "linear", "in_features": 50_000, "out_features": 50_000, "bias": False}]}
    path = _small_model(tmp_path)
    result = peak_growth(f"load_model({str(path)!r}, config={config!r})")
    assert result["outcome"].startswith("ResourceExhausted"), result
    assert f"declares 2500000000 parameters, over the limit of {DEFAULT_MAX_PARAMETERS}" in result["outcome"]
    assert result["growth_mb"] < 100, result


def test_parameter_cap_in_describe_and_by_argument(tmp_path, refuses):
    path = _small_model(tmp_path)
    with refuses(ResourceExhausted, "declares 15 parameters, over the limit of 10"):
        load_model(path, max_parameters=10)
    assert load_model(path, max_parameters=15).num_parameters == 15
    config = {"layers": [{"type": "linear", "in_features": 50_000, "out_features": 50_000}]}
    with refuses(ResourceExhausted, "over the limit of"):
        describe(path, architecture_config=config)


@pytest.mark.parametrize(("layer", "fragment"), [
    ({"type": "linear", "in_features": 2**21, "out_features": 1}, "layer 0 (linear) in_features 2097152 is over the limit"),
    ({"type": "linear", "in_features": 1, "out_features": 2**62}, "layer 0 (linear) out_features"),
    ({"type": "conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": [3, 100_000]},
     "layer 0 (conv2d) kernel_size [3, 100000] is over the limit of 256"),
    ({"type": "conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 3, "padding": 10**6},
     "layer 0 (conv2d) padding 1000000"),
    ({"type": "batchnorm2d", "num_features": 10**9}, "layer 0 (batchnorm2d) num_features"),
    ({"type": "max_pool2d", "kernel_size": 2, "stride": 10**4}, "layer 0 (max_pool2d) stride"),
    ({"type": "conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": [1] * 10_000}, "unsupported value"),
])
def test_layer_dimension_caps(refuses, layer, fragment):
    with refuses(InvalidInput, fragment):
        with torch.device("meta"):
            sequential.build({"layers": [layer]})


def test_layer_count_cap(refuses):
    with refuses(InvalidInput, f"declares {sequential.MAX_LAYERS + 1} layers", f"limit is {sequential.MAX_LAYERS}"):
        sequential.build({"layers": [{"type": "relu"}] * (sequential.MAX_LAYERS + 1)})


@pytest.mark.parametrize(("shape", "fragment"), [
    ([100_000, 100_000], "values per sample"),
    ([1] * 9, "9 dimensions"),
])
def test_input_shape_caps(tmp_path, refuses, shape, fragment):
    # analyses without data (lipschitz) allocate inputs of the declared shape
    with refuses(InvalidInput, "input_shape", fragment):
        load_model(_small_model(tmp_path), config=dict(SMALL, input_shape=shape))


# 1,024 channels padded by 256 on an 8 x 8 input: 1024 x 518 x 518 = 275M values for one sample,
# from 9 KB of weights
_BLOW_UP = [{"type": "conv2d", "in_channels": 1, "out_channels": 1024, "kernel_size": 3, "padding": 256}]


def _blow_up_model(tmp_path, input_shape: list[int] | None):
    config = {"layers": _BLOW_UP} | ({"input_shape": input_shape} if input_shape else {})
    path = tmp_path / "pad.safetensors"
    save_sequential(path, config, {"0.weight": torch.zeros(1024, 1, 3, 3), "0.bias": torch.zeros(1024)})
    return path


def test_activation_cap_at_load(tmp_path):
    path = _blow_up_model(tmp_path, [1, 8, 8])
    result = peak_growth(f"load_model({str(path)!r})")
    assert result["outcome"].startswith("ResourceExhausted"), result
    assert "takes 274763776 activation values by layer 0 (conv2d)" in result["outcome"]
    assert result["growth_mb"] < 100, result


def test_activation_cap_before_the_probe(tmp_path):
    # no input_shape: the data's sample shape is checked on the meta device before the real probe
    path = _blow_up_model(tmp_path, None)
    data = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(4, 1, 8, 8), "targets": torch.zeros(4, dtype=torch.int64)}, str(data))
    result = peak_growth(f"""
        model = load_model({str(path)!r})
        from curvscope_service.loading import validate_pair
        validate_pair(model, load_data({str(data)!r}), "cross_entropy")
    """)
    assert result["outcome"].startswith("ResourceExhausted") and "activation values" in result["outcome"], result
    assert result["growth_mb"] < 100, result


def test_a_shape_mismatch_is_still_reported_by_the_probe(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    save_sequential(path, SMALL, {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)})
    data = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(4, 5), "targets": torch.zeros(4, dtype=torch.int64)}, str(data))
    with refuses(InvalidInput, "model does not accept inputs of shape (5)", "mat1 and mat2"):
        validate_pair(load_model(path), load_data(data), "cross_entropy")


def test_materialised_model_is_exactly_the_file(tmp_path):
    # built on meta, materialised uninitialised, every value then from the file
    config = {"input_shape": [2, 4, 4], "layers": [
        {"type": "conv2d", "in_channels": 2, "out_channels": 3, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d", "num_features": 3}, {"type": "flatten"},
        {"type": "linear", "in_features": 48, "out_features": 2}]}
    torch.manual_seed(3)
    original = sequential.build(config).eval()
    original[1].running_mean.uniform_(-1, 1)
    state = {k: v for k, v in original.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"architecture": "sequential", "config": json.dumps(config)})
    loaded = load_model(path, dtype=torch.float64).module
    for name, value in loaded.state_dict().items():
        expected = original.state_dict()[name]
        if name.endswith("num_batches_tracked"):
            assert value.item() == 0  # not in the file: zero, not whatever the memory held
        else:
            assert value.dtype == torch.float64 and torch.equal(value, expected.double()), name


PLUGIN = '''
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)
        # computed at build time, never in the file
        self.register_buffer("scale", torch.arange(width, dtype=torch.float32) + 1, persistent=False)

    def forward(self, x):
        return self.inner(x) * self.scale


def build(config):
    return Scaled(config["width"])


def reads_values(config):
    module = Scaled(config["width"])
    if module.inner.weight.sum().item() > 1e9:
        raise ValueError("unlikely")
    return module
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    entry_points = {"scaled": "scaledplug:build", "reads_values": "scaledplug:reads_values"}
    yield install_plugin(tmp_path / "plugin", "scaledplug", PLUGIN, entry_points, monkeypatch)
    sys.modules.pop("scaledplug", None)


def _plugin_checkpoint(tmp_path, architecture: str, width: int = 3):
    return plugin_checkpoint(tmp_path, "scaledplug", "Scaled", architecture, width)


def test_plugin_with_state_outside_the_file(plugin_path, tmp_path):
    path, original = _plugin_checkpoint(tmp_path, "scaled")
    model = load_model(path)
    x = torch.randn(5, 3)
    torch.testing.assert_close(model.module(x), original(x))


def test_plugin_config_declaring_a_huge_model(plugin_path, tmp_path):
    # the user's config, not the operator's code, sets the width: 10**10 parameters + 10**5 buffer values
    path, _ = _plugin_checkpoint(tmp_path, "scaled")
    result = peak_growth(f"load_model({str(path)!r}, config={{'width': 100_000}})", pythonpath=[plugin_path])
    assert result["outcome"].startswith("ResourceExhausted"), result
    assert "declares 10000100000 parameters and 100000 buffer values the file does not hold" in result["outcome"]
    assert result["growth_mb"] < 100, result


def test_plugin_that_reads_values_while_building(plugin_path, tmp_path, refuses):
    path, _ = _plugin_checkpoint(tmp_path, "reads_values")
    with refuses(InvalidInput, "plugin 'reads_values' could not build a model from this config", "meta"):
        load_model(path)


def test_a_real_model_costs_about_its_size(tmp_path):
    # 64 MB of float32 weights read straight into the model's storage (it took 174 MB with a
    # copy of each tensor and a whole-tensor isfinite)
    config = {"layers": [{"type": "linear", "in_features": 4000, "out_features": 4000}]}
    path = tmp_path / "real.safetensors"
    save_sequential(path, config, {"0.weight": torch.randn(4000, 4000), "0.bias": torch.randn(4000)})
    result = peak_growth(f"load_model({str(path)!r})")
    assert result["outcome"] == "loaded" and result["growth_mb"] < 110, result
