"""A small model and data batch stored in the formats the engine reads, shared by the analyses tests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.engine import AnalysisJob
from curvscope_service.loading import save_sequential

CONFIG = {
    "input_shape": [6],
    "layers": [
        {"type": "linear", "in_features": 6, "out_features": 5},
        {"type": "tanh"},
        {"type": "linear", "in_features": 5, "out_features": 3},
    ],
}


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A 53-parameter tanh MLP as sequential safetensors and as a .pt2 with a fixed batch, 16 samples."""
    root = tmp_path_factory.mktemp("nu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).eval()
    save_sequential(root / "mlp.safetensors", CONFIG, model.state_dict())
    inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    torch.export.save(torch.export.export(model, (inputs[:8],)), str(root / "mlp-batch8.pt2"))
    save_file({"inputs": inputs, "targets": torch.arange(16) % 3}, str(root / "classes.safetensors"))
    return root


def job(files, analyses, **options) -> AnalysisJob:
    """A float64 cross-entropy job on the stored MLP and classes."""
    return AnalysisJob(model_path=files / "mlp.safetensors", model_sha256="0" * 64,
                       data_path=files / "classes.safetensors", loss="cross_entropy", analyses=analyses,
                       precision="float64", **options)
