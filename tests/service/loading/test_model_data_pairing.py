"""validate_pair: does this model run on this data, and do the targets fit the loss?"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_data, load_model, validate_pair
from loading_fixtures import mlp


def _data(tmp_path, inputs, targets):
    path = tmp_path / "data.safetensors"
    save_file({"inputs": inputs, "targets": targets}, str(path))
    return load_data(path)


def test_good_pairs(cnn_file, exported_dynamic, tmp_path):
    cnn = load_model(cnn_file[0])
    validate_pair(cnn, _data(tmp_path, torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])), "cross_entropy")
    validate_pair(cnn, _data(tmp_path, torch.randn(6, 1, 8, 8), torch.randn(6, 3)), "mse")
    exported = load_model(exported_dynamic[0])
    validate_pair(exported, _data(tmp_path, torch.randn(2, 4), torch.softmax(torch.randn(2, 3), 1)), "cross_entropy")


def test_input_shape_mismatch_with_known_shape(cnn_file, tmp_path, refuses):
    data = _data(tmp_path, torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64))
    with refuses(InvalidInput, "model expects inputs of shape (1, 8, 8), data has (3, 8, 8)"):
        validate_pair(load_model(cnn_file[0]), data, "cross_entropy")


def test_input_shape_mismatch_found_by_running(tmp_path, refuses):
    from curvscope_service.loading import save_sequential

    config = {"layers": [{"type": "linear", "in_features": 4, "out_features": 2}]}
    path = tmp_path / "m.safetensors"
    save_sequential(path, config, {f"0.{k}": v for k, v in torch.nn.Linear(4, 2).state_dict().items()})
    data = _data(tmp_path, torch.randn(4, 5), torch.zeros(4, dtype=torch.int64))
    with refuses(InvalidInput, "model does not accept inputs of shape (5)", "mat1 and mat2"):
        validate_pair(load_model(path), data, "cross_entropy")


def test_exported_model_on_the_wrong_features(exported_dynamic, tmp_path, refuses):
    data = _data(tmp_path, torch.randn(4, 5), torch.zeros(4, dtype=torch.int64))
    with refuses(InvalidInput, "model expects inputs of shape (4), data has (5)"):
        validate_pair(load_model(exported_dynamic[0]), data, "cross_entropy")


def test_fixed_batch_size_that_does_not_divide_the_data(tmp_path, refuses):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(mlp(), (torch.randn(4, 4),)), path)
    model = load_model(path)
    validate_pair(model, _data(tmp_path, torch.randn(8, 4), torch.zeros(8, dtype=torch.int64)), "cross_entropy")
    with refuses(InvalidInput, "fixed batch size of 4", "6 samples", "dynamic batch"):
        validate_pair(model, _data(tmp_path, torch.randn(6, 4), torch.zeros(6, dtype=torch.int64)), "cross_entropy")


@pytest.mark.parametrize(
    ("targets", "loss", "fragment"),
    [
        (torch.tensor([0, 1, 3, 1]), "cross_entropy", "class indices 0..3 but the model has 3 classes"),
        (torch.tensor([[0], [1], [2], [1]]), "cross_entropy", "shape (n,)"),
        (torch.randn(4, 5), "cross_entropy", "got (4, 5)"),
        (torch.tensor([0, 1, 2, 1]), "mse", "class indices? use cross_entropy"),
        (torch.randn(4, 2), "mse", "targets have shape (4, 2) but the model outputs (4, 3)"),
        (torch.tensor([0, 1, 2, 1]), "hinge", "unknown loss 'hinge'; choose one of: cross_entropy, mse"),
    ],
)
def test_targets_that_do_not_fit(exported_dynamic, tmp_path, refuses, targets, loss, fragment):
    data = _data(tmp_path, torch.randn(4, 4), targets)
    with refuses(InvalidInput, fragment):
        validate_pair(load_model(exported_dynamic[0]), data, loss)


def test_non_finite_outputs(tmp_path, refuses):
    from curvscope_service.loading import save_sequential

    config = {"layers": [{"type": "linear", "in_features": 2, "out_features": 2}]}
    path = tmp_path / "big.safetensors"
    save_sequential(path, config, {"0.weight": torch.full((2, 2), 3e38), "0.bias": torch.zeros(2)})
    data = _data(tmp_path, torch.full((2, 2), 10.0), torch.zeros(2, dtype=torch.int64))
    with refuses(InvalidInput, "NaN or Inf"):
        validate_pair(load_model(path), data, "cross_entropy")
