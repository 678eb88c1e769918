"""Fixtures of the loading tests; the helpers they use live in loading_fixtures.py."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from curvscope_service.loading import save_sequential
from loading_fixtures import CNN_CONFIG, mlp


@pytest.fixture
def refuses():
    """``with refuses(InvalidInput, "fragment", ...)``: the error is one helpful line."""

    @contextmanager
    def check(exc_type: type[Exception], *fragments: str):
        with pytest.raises(exc_type) as info:
            yield info
        message = str(info.value)
        assert message and "\n" not in message and len(message) < 400, message
        assert "Traceback" not in message
        for fragment in fragments:
            assert fragment in message, message

    return check


@pytest.fixture
def cnn_file(tmp_path) -> tuple[Path, nn.Module]:
    """A sequential CNN checkpoint with non-trivial batch-norm statistics, and its module."""
    from curvscope_service.loading.sequential import build

    torch.manual_seed(1)
    module = build(CNN_CONFIG)
    module[1].running_mean.uniform_(-0.5, 0.5)
    module[1].running_var.uniform_(0.5, 2.0)
    module.eval()
    path = tmp_path / "cnn.safetensors"
    save_sequential(path, CNN_CONFIG, module.state_dict())
    return path, module


@pytest.fixture(scope="session")
def exported_dynamic(tmp_path_factory) -> tuple[Path, nn.Module]:
    """The MLP exported with a dynamic batch dimension."""
    model = mlp()
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(5, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path, model
