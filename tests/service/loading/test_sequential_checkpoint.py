"""The built-in sequential architecture: a safetensors state dict plus a JSON layer spec."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_model, save_sequential
from curvscope_service.loading.sequential import build
from loading_fixtures import CNN_CONFIG

MLP_CONFIG = {"input_shape": [4], "layers": [{"type": "linear", "in_features": 4, "out_features": 3}, {"type": "gelu"}, {"type": "sigmoid"}]}


def test_loads_and_matches_the_original(cnn_file):
    path, original = cnn_file
    model = load_model(path)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model.module(x), original(x))
    assert (model.format, model.architecture, model.input_shape, model.fixed_batch_size) == ("safetensors", "sequential", (1, 8, 8), None)
    assert model.config == CNN_CONFIG
    assert not model.module.training
    assert model.num_parameters == sum(p.numel() for p in original.parameters())
    assert model.parameter_blocks["0"] == ["0.weight", "0.bias"]
    assert list(model.parameter_blocks) == ["0", "1", "6", "8"]


def test_float64_on_request(cnn_file):
    path, original = cnn_file
    model = load_model(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.module.parameters())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model.module(x), original.double()(x))


def test_functional_call_works(cnn_file):
    model = load_model(cnn_file[0])
    params = dict(model.module.named_parameters())
    out = torch.func.functional_call(model.module, params, (torch.randn(2, 1, 8, 8),))
    assert out.shape == (2, 3)


def test_arguments_override_the_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    module = build(MLP_CONFIG)
    save_file(module.state_dict(), str(path))  # no metadata at all
    model = load_model(path, architecture="sequential", config=MLP_CONFIG)
    assert model.architecture == "sequential" and model.input_shape == (4,)


def test_no_architecture(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    save_file(build(MLP_CONFIG).state_dict(), str(path))
    with refuses(InvalidInput, "names no architecture", "save_sequential"):
        load_model(path)


def test_unknown_architecture_lists_the_known_ones(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    save_file(build(MLP_CONFIG).state_dict(), str(path), metadata={"architecture": "resnet9000"})
    with refuses(InvalidInput, "unknown architecture 'resnet9000'", "sequential"):
        load_model(path)


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        ({"type": "transformer"}, "unknown type 'transformer'; choose one of: linear, conv2d"),
        ({"type": "linear", "in_features": 4, "out_features": 3, "bais": False}, "unknown keys ['bais']"),
        ({"type": "linear", "in_features": 4}, "missing ['out_features']"),
        ({"type": "linear", "in_features": 4, "out_features": {"x": 1}}, "unsupported value"),
        ({"type": "conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding_mode": "wrap"}, "is invalid"),
        ({"kind": "relu"}, "string 'type'"),
    ],
)
def test_bad_layer_specs(tmp_path, refuses, layer, fragment):
    with refuses(InvalidInput, "layer 0", fragment):
        build({"layers": [layer]})


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"layers": []}, "non-empty list 'layers'"),
        ({"layers": [{"type": "relu"}], "input_shap": [4]}, "unknown keys ['input_shap']"),
        ({"layers": [{"type": "relu"}], "input_shape": [0, 4]}, "positive integers"),
        ([{"type": "relu"}], "JSON object"),
    ],
)
def test_bad_configs(refuses, config, fragment):
    with refuses(InvalidInput, fragment):
        build(config)


def test_config_metadata_not_json(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    save_file(build(MLP_CONFIG).state_dict(), str(path), metadata={"architecture": "sequential", "config": "{layers"})
    with refuses(InvalidInput, "'config' is not valid JSON"):
        load_model(path)


def test_missing_and_unexpected_weights(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    state = build(MLP_CONFIG).state_dict()
    state["9.weight"] = state.pop("0.bias")
    save_file(state, str(path), metadata={"architecture": "sequential", "config": json.dumps(MLP_CONFIG)})
    with refuses(InvalidInput, "missing 0.bias", "unexpected 9.weight"):
        load_model(path)


def test_shape_mismatch(tmp_path, refuses):
    path = tmp_path / "m.safetensors"
    state = build(MLP_CONFIG).state_dict()
    state["0.weight"] = torch.zeros(3, 5)
    save_file(state, str(path), metadata={"architecture": "sequential", "config": json.dumps(MLP_CONFIG)})
    with refuses(InvalidInput, "shape mismatch", "0.weight [3, 5] vs [3, 4]"):
        load_model(path)


@pytest.mark.parametrize(("value", "kind"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights(tmp_path, refuses, value, kind):
    path = tmp_path / "m.safetensors"
    state = build(MLP_CONFIG).state_dict()
    state["0.weight"][1, 2] = value
    save_sequential(path, MLP_CONFIG, state)
    with refuses(InvalidInput, "'0.weight'", kind):
        load_model(path)


def test_non_finite_buffer(cnn_file, tmp_path, refuses):
    _, module = cnn_file
    state = module.state_dict()
    state["1.running_var"][0] = float("inf")
    path = tmp_path / "bn.safetensors"
    save_sequential(path, CNN_CONFIG, state)
    with refuses(InvalidInput, "'1.running_var'", "Inf"):
        load_model(path)


def test_save_sequential_refuses_a_mismatched_state_dict(tmp_path, refuses):
    with refuses(InvalidInput, "missing ['0.bias']"):
        save_sequential(tmp_path / "x.safetensors", MLP_CONFIG, {"0.weight": torch.zeros(3, 4)})


def test_missing_num_batches_tracked_is_tolerated(cnn_file, tmp_path):
    _, module = cnn_file
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "nbt.safetensors"
    save_file(state, str(path), metadata={"architecture": "sequential", "config": json.dumps(CNN_CONFIG)})
    assert load_model(path).num_parameters == sum(p.numel() for p in module.parameters())
