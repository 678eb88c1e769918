"""Shared cases of the Lipschitz tests: the LipSDP paper's networks and small random nets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvscope_service.loading.checkpoint import LoadedModel, parameter_blocks
from curvscope_service.loading.model_inputs import ModelInput

# The LipSDP repository's example networks (MIT License), with the values its README publishes.
REFERENCE = Path(__file__).resolve().parents[2] / "data" / "lipsdp"


def reference_weights(name: str) -> list[np.ndarray]:
    """The weight matrices (out x in) of a reference network's .mat file."""
    import scipy.io

    return [np.asarray(w, dtype=np.float64) for w in scipy.io.loadmat(reference_file(name))["weights"][0]]


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    assert path.is_file(), f"LipSDP reference data {path} is missing from the repository"
    return path


def relu_net(widths: list[int], seed: int = 0, activation: type[nn.Module] = nn.ReLU, **kwargs) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(activation(**kwargs))
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).eval()


def loaded(module: nn.Module, input_shape: tuple[int, ...]) -> LoadedModel:
    """A module as the loader would hand it over (eval mode, sequential format)."""
    module.eval()
    return LoadedModel(
        module=module, format="safetensors", architecture="sequential", input_shape=input_shape,
        fixed_batch_size=None, num_parameters=sum(p.numel() for p in module.parameters()),
        parameter_blocks=parameter_blocks(module), config=None, inputs=(ModelInput("inputs", None, input_shape),),
    )


def weights_of(module: nn.Sequential) -> list[np.ndarray]:
    return [m.weight.detach().double().numpy() for m in module if isinstance(m, nn.Linear)]


@pytest.fixture
def small_relu_nets() -> list[nn.Sequential]:
    return [relu_net([4, 12, 8, 3], seed=s) for s in range(3)] + [relu_net([6, 20, 2], seed=7)]
