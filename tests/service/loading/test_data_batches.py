"""Data batches: safetensors with inputs, targets and optional extras."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import load_data


def _data(tmp_path, **tensors):
    path = tmp_path / "data.safetensors"
    save_file(tensors, str(path))
    return path


def test_loads_inputs_targets_and_extras(tmp_path):
    path = _data(tmp_path, inputs=torch.randn(6, 4), targets=torch.tensor([0, 1, 2, 0, 1, 2]), mask=torch.ones(6, 2))
    data = load_data(path)
    assert data.num_samples == 6
    assert data.inputs[0].dtype == torch.float32 and data.targets.dtype == torch.int64
    assert set(data.extra) == {"mask"}


def test_integer_inputs_become_floats(tmp_path):
    pixels = torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8)
    data = load_data(_data(tmp_path, inputs=pixels, targets=torch.zeros(3, 2)), dtype=torch.float64)
    assert data.inputs[0].dtype == torch.float64 and data.targets.dtype == torch.float64
    torch.testing.assert_close(data.inputs[0], pixels.double())


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"inputs": torch.zeros(3, 2)}, "lacks 'targets'"),
        ({"x": torch.zeros(3, 2), "y": torch.zeros(3)}, "lacks 'inputs' and 'targets'"),
        ({"inputs": torch.zeros(3, 2), "targets": torch.zeros(4)}, "'targets' has 4 samples but 'inputs' has 3"),
        ({"inputs": torch.zeros(0, 2), "targets": torch.zeros(0)}, "zero samples"),
        ({"inputs": torch.zeros(3, 2, dtype=torch.bool), "targets": torch.zeros(3)}, "dtype torch.bool"),
        ({"inputs": torch.tensor(1.0), "targets": torch.zeros(3)}, "scalar"),
        ({"inputs": torch.full((3, 2), float("nan")), "targets": torch.zeros(3)}, "NaN or Inf"),
    ],
)
def test_bad_data_files(tmp_path, refuses, tensors, fragment):
    with refuses(InvalidInput, fragment):
        load_data(_data(tmp_path, **tensors))


def test_truncated_data_file(tmp_path, refuses):
    path = _data(tmp_path, inputs=torch.randn(100, 4), targets=torch.zeros(100))
    path.write_bytes(path.read_bytes()[:-64])
    with refuses(InvalidInput, "data:", "truncated"):
        load_data(path)
