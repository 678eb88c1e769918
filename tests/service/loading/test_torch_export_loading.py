"""torch.export archives: dynamic and static batch, the LipSDP reference, bad files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import describe_model, load_model
from loading_fixtures import REFERENCE, mlp

LIPSDP_RANDOM = REFERENCE / "lipsdp" / "random_2-10-30-20-2.pt2"


def _export(model: nn.Module, x: torch.Tensor, path, dynamic: bool = True):
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), path)
    return path


def test_dynamic_batch(exported_dynamic):
    path, original = exported_dynamic
    model = load_model(path)
    assert (model.format, model.architecture) == ("torch_export", "torch_export")
    assert (model.input_shape, model.fixed_batch_size) == ((4,), None)
    assert model.parameter_blocks == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert model.num_parameters == 4 * 8 + 8 + 8 * 3 + 3
    for batch in (1, 7):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(model.module(x), original(x))


def test_functional_call_on_the_loaded_module(exported_dynamic):
    path, original = exported_dynamic
    model = load_model(path)
    params = {k: v * 2 for k, v in model.module.named_parameters()}
    x = torch.randn(3, 4)
    out = torch.func.functional_call(model.module, params, (x,))
    doubled = torch.func.functional_call(original, {k: v * 2 for k, v in original.named_parameters()}, (x,))
    torch.testing.assert_close(out, doubled)


def test_float64(exported_dynamic):
    path, original = exported_dynamic
    model = load_model(path, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert model.module(x).dtype == torch.float64
    torch.testing.assert_close(model.module(x), original.double()(x))
    original.float()


def test_static_batch(tmp_path):
    model = mlp()
    path = _export(model, torch.randn(6, 4), tmp_path / "static.pt2", dynamic=False)
    loaded = load_model(path)
    assert (loaded.input_shape, loaded.fixed_batch_size) == ((4,), 6)


def test_lipsdp_reference_network():
    model = load_model(LIPSDP_RANDOM)
    assert (model.input_shape, model.fixed_batch_size) == ((2,), None)
    assert model.num_parameters == (2 * 10 + 10) + (10 * 30 + 30) + (30 * 20 + 20) + (20 * 2 + 2)
    assert model.module(torch.randn(5, 2)).shape == (5, 2)
    described = describe_model(model)
    assert described["lipschitz_chain"]["found"] is True
    assert [layer["type"] for layer in described["layers"]] == ["linear", "relu"] * 3 + ["linear"]


def test_training_mode_export_is_refused(tmp_path, refuses):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    path = _export(model, torch.randn(3, 4), tmp_path / "train.pt2")
    with refuses(InvalidInput, "training mode", "model.eval()"):
        load_model(path)


def test_nan_weights_are_refused(tmp_path, refuses):
    model = mlp()
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    path = _export(model, torch.randn(3, 4), tmp_path / "nan.pt2")
    with refuses(InvalidInput, "'2.bias'", "NaN"):
        load_model(path)


def test_truncated_archive(exported_dynamic, tmp_path, refuses):
    path = tmp_path / "cut.pt2"
    path.write_bytes(exported_dynamic[0].read_bytes()[:1500])
    with refuses(InvalidInput, "zip"):
        load_model(path)


def test_corrupt_archive(tmp_path, refuses):
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with refuses(InvalidInput, "corrupt or truncated zip"):
        load_model(path)


def test_zip_that_is_not_an_export(tmp_path, refuses):
    import zipfile

    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("stuff/readme.txt", "hello")
    with refuses(InvalidInput, "not a torch.export archive", "torch.export.save"):
        load_model(path)


def test_several_inputs_are_described_by_the_signature(tmp_path):
    class Two(nn.Module):
        def forward(self, x, ids):
            return x + ids.to(x.dtype)

    path = tmp_path / "two.pt2"
    batch = torch.export.Dim("batch")
    example = (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    torch.export.save(torch.export.export(Two(), example, dynamic_shapes=({0: batch}, {0: batch})), path)
    model = load_model(path)
    assert [(i.name, i.dtype, i.sample_shape) for i in model.inputs] == [("x", None, (3,)), ("ids", torch.int64, (3,))]
    assert (model.input_shape, model.fixed_batch_size) == (None, None)
