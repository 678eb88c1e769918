"""Hostile data batches: sizes declared without the bytes to back them are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.errors import InvalidInput, ResourceExhausted
from curvscope_service.loading import load_data
from hostile_files import raw_safetensors


def _entry(shape: list[int], begin: int = 0, dtype: str = "F32") -> dict:
    size = 4 if dtype == "F32" else 8
    count = 1
    for d in shape:
        count *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + count * size]}


@pytest.mark.parametrize(("inputs", "targets", "fragment"), [
    # 10**12 samples in zero bytes: sampling a subset would allocate a permutation of all of them
    ([10**12, 0], [10**12, 0], "'inputs' has shape [1000000000000, 0] and holds no values"),
    ([3, 2], [3, 0], "'targets' has shape [3, 0] and holds no values"),
])
def test_empty_tensors_cannot_declare_samples(tmp_path, refuses, inputs, targets, fragment):
    first = _entry(inputs)
    second = _entry(targets, first["data_offsets"][1])
    path = raw_safetensors(tmp_path / "d.safetensors", {"inputs": first, "targets": second},
                           bytes(second["data_offsets"][1]))
    with refuses(InvalidInput, fragment):
        load_data(path)


def test_an_empty_extra_is_refused_too(tmp_path, refuses):
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(3, 2), "targets": torch.zeros(3), "mask": torch.zeros(3, 0)}, str(path))
    with refuses(InvalidInput, "'mask' has shape [3, 0]"):
        load_data(path)


def test_names_in_the_message_are_few_and_short(tmp_path, refuses):
    names = [f"{'x' * 200}{i}" for i in range(50)]
    path = tmp_path / "d.safetensors"
    save_file({name: torch.zeros(1) for name in names}, str(path))
    with refuses(InvalidInput, "lacks 'inputs' and 'targets'", "and 44 more"):
        load_data(path)


def test_data_with_a_gap_in_its_bytes(tmp_path, refuses):
    # bytes no tensor indexes: the library refuses these files too, our reader must as well
    header = {"inputs": _entry([2, 2]), "targets": _entry([2], begin=32)}
    path = raw_safetensors(tmp_path / "gap.safetensors", header, bytes(40))
    with refuses(InvalidInput, "data:", "16 bytes after tensor 'inputs' belong to no tensor"):
        load_data(path)


@pytest.mark.parametrize(("cap", "value", "fragment"), [
    ("MAX_DATA_SAMPLES", 4, "data batch has 5 samples; the limit is 4"),
    ("MAX_DATA_VALUES", 20, "data batch holds 25 values; the limit is 20"),
])
def test_batch_size_caps_before_any_tensor_is_read(tmp_path, refuses, monkeypatch, cap, value, fragment):
    from curvscope_service.loading import data
    from curvscope_service.loading.safetensors_file import SafetensorsReader

    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(5, 4), "targets": torch.zeros(5)}, str(path))
    monkeypatch.setattr(data, cap, value)

    def no_read(self, name):
        raise AssertionError(f"tensor {name} was read before the batch was checked")

    monkeypatch.setattr(SafetensorsReader, "read", no_read)
    with refuses(ResourceExhausted, fragment):
        load_data(path)
