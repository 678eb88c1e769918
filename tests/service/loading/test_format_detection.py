"""Which files are refused before any parser runs: pickles, torch.save files, unknown formats."""

from __future__ import annotations

import pickle

import torch

from curvscope_service.errors import InvalidInput, NotFound
from curvscope_service.loading import detect_format, load_model
from loading_fixtures import evil_pickle, mlp


def test_raw_pickle_is_refused_without_unpickling(tmp_path, refuses):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pkl"
    path.write_bytes(evil_pickle(marker))
    with refuses(InvalidInput, "torch.save pickle", "never unpickles", "torch.export.save"):
        load_model(path)
    assert not marker.exists()


def test_torch_save_zip_is_refused(tmp_path, refuses):
    path = tmp_path / "model.pt"
    torch.save(mlp().state_dict(), path)
    with refuses(InvalidInput, "torch.save pickle", "safetensors"):
        load_model(path)


def test_legacy_torch_save_is_refused(tmp_path, refuses):
    path = tmp_path / "model.pt"
    torch.save(mlp().state_dict(), path, _use_new_zipfile_serialization=False)
    with refuses(InvalidInput, "never unpickles"):
        load_model(path, format="torch_export")


def test_plain_pickle_of_a_tensor_is_refused(tmp_path, refuses):
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with refuses(InvalidInput, "never unpickles"):
        detect_format(path)


def test_empty_file(tmp_path, refuses):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with refuses(InvalidInput, "too short"):
        load_model(path)


def test_missing_file(tmp_path, refuses):
    with refuses(NotFound, "does not exist"):
        load_model(tmp_path / "nope.pt2")


def test_unknown_format_argument(exported_dynamic, refuses):
    with refuses(InvalidInput, "unknown model format 'onnx'", "torch_export"):
        load_model(exported_dynamic[0], format="onnx")


def test_format_argument_that_contradicts_the_file(exported_dynamic, refuses):
    with refuses(InvalidInput, "given as safetensors", "torch_export"):
        load_model(exported_dynamic[0], format="safetensors")


def test_unsupported_dtype(exported_dynamic, refuses):
    with refuses(InvalidInput, "float64"):
        load_model(exported_dynamic[0], dtype=torch.float16)


def test_protocol_0_pickle_is_refused_without_unpickling(tmp_path, refuses):
    marker = tmp_path / "ran"
    path = tmp_path / "model.bin"
    path.write_bytes(evil_pickle(marker, protocol=0))
    with refuses(InvalidInput, "not a valid safetensors file"):
        load_model(path)
    assert not marker.exists()

