"""``curvscope demo``: a small MLP trained on scikit-learn's digits (real data shipped with the
package), served by an in-process server on a free loopback port, analysed through the client."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from curvscope import Client, Report
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb

from .config import ServerConfig
from .loading import save_sequential
from .in_process import InProcessServer

DEMO_CONFIG = {
    "input_shape": [64],
    "layers": [
        {"type": "linear", "in_features": 64, "out_features": 32},
        {"type": "tanh"},
        {"type": "linear", "in_features": 32, "out_features": 10},
    ],
}
DEMO_SAMPLES = 512


def write_demo_files(directory: Path, *, steps: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """Train the demo MLP on the digits and write (model.safetensors, data.safetensors)."""
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)
    inputs, targets = inputs[order[:DEMO_SAMPLES]], targets[order[:DEMO_SAMPLES]]

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    model_path, data_path = directory / "digits-mlp.safetensors", directory / "digits-512.safetensors"
    save_sequential(model_path, DEMO_CONFIG, model.state_dict())
    save_file({"inputs": inputs.contiguous(), "targets": targets.contiguous()}, str(data_path))
    return model_path, data_path


def run_demo(*, progress: Callable[[pb.AnalyzeEvent], None] | None = None, per_layer: bool = True) -> Report:
    with tempfile.TemporaryDirectory(prefix="curvscope-demo-") as tmp:
        directory = Path(tmp)
        model_path, data_path = write_demo_files(directory)
        with InProcessServer(ServerConfig(store=directory / "store")) as server:
            with Client(server.target) as client:
                return client.analyze(model_path, data_path, eigen=5, smallest=2, per_layer=per_layer,
                                      progress=progress)
