"""The built-in ``sequential`` architecture: an ``nn.Sequential`` described by a JSON config.

Config: ``{"input_shape": [1, 8, 8], "layers": [{"type": "conv2d", "in_channels": 1, ...}, ...]}``.
Each layer takes the keyword arguments of its torch module, with torch's defaults; anything
else is refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.messages import one_line

ARCHITECTURE = "sequential"

# spec type -> (module class, required keys, optional keys)
_LAYERS: dict[str, tuple[Callable[..., nn.Module], set[str], set[str]]] = {
    "linear": (nn.Linear, {"in_features", "out_features"}, {"bias"}),
    "conv2d": (
        nn.Conv2d,
        {"in_channels", "out_channels", "kernel_size"},
        {"stride", "padding", "dilation", "groups", "bias", "padding_mode"},
    ),
    "relu": (nn.ReLU, set(), set()),
    "leaky_relu": (nn.LeakyReLU, set(), {"negative_slope"}),
    "tanh": (nn.Tanh, set(), set()),
    "sigmoid": (nn.Sigmoid, set(), set()),
    "gelu": (nn.GELU, set(), {"approximate"}),
    "max_pool2d": (nn.MaxPool2d, {"kernel_size"}, {"stride", "padding", "dilation", "ceil_mode"}),
    "avg_pool2d": (nn.AvgPool2d, {"kernel_size"}, {"stride", "padding", "ceil_mode", "count_include_pad"}),
    "flatten": (nn.Flatten, set(), {"start_dim", "end_dim"}),
    "batchnorm1d": (nn.BatchNorm1d, {"num_features"}, {"eps", "momentum", "affine", "track_running_stats"}),
    "batchnorm2d": (nn.BatchNorm2d, {"num_features"}, {"eps", "momentum", "affine", "track_running_stats"}),
    "dropout": (nn.Dropout, set(), {"p"}),
}
LAYER_TYPES: tuple[str, ...] = tuple(_LAYERS)

# module class -> spec type, so describe_model reports the names users wrote
SPEC_TYPE_OF: dict[type, str] = {cls: name for name, (cls, _, _) in _LAYERS.items()}


def build(config: Any) -> nn.Module:
    """Build the ``nn.Sequential`` a config describes; raise InvalidInput on any bad entry."""
    if not isinstance(config, dict):
        raise InvalidInput("sequential config must be a JSON object with 'layers' (and optionally 'input_shape')")
    unknown = set(config) - {"layers", "input_shape"}
    if unknown:
        raise InvalidInput(f"sequential config has unknown keys {sorted(unknown)}; allowed: input_shape, layers")
    input_shape(config)  # validate early, before any module is built
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InvalidInput("sequential config needs a non-empty list 'layers'")
    return nn.Sequential(*(_build_layer(i, spec) for i, spec in enumerate(layers)))


def input_shape(config: dict) -> tuple[int, ...] | None:
    """One sample's shape from the config, if it gives one."""
    shape = config.get("input_shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise InvalidInput(f"sequential config: input_shape must be a list of positive integers, got {shape!r}")
    return tuple(shape)


def _build_layer(index: int, spec: Any) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise InvalidInput(f"sequential config: layer {index} must be an object with a string 'type'")
    kind = spec["type"]
    if kind not in _LAYERS:
        raise InvalidInput(
            f"sequential config: layer {index} has unknown type '{kind}'; choose one of: {', '.join(LAYER_TYPES)}"
        )
    cls, required, optional = _LAYERS[kind]
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    unknown = set(kwargs) - required - optional
    if unknown:
        allowed = ", ".join(sorted(required | optional)) or "none"
        raise InvalidInput(f"sequential config: layer {index} ({kind}) has unknown keys {sorted(unknown)}; allowed: {allowed}")
    missing = required - set(kwargs)
    if missing:
        raise InvalidInput(f"sequential config: layer {index} ({kind}) is missing {sorted(missing)}")
    for key, value in kwargs.items():
        kwargs[key] = _argument(index, kind, key, value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidInput(f"sequential config: layer {index} ({kind}) is invalid: {one_line(e)}") from None


def _argument(index: int, kind: str, key: str, value: Any) -> Any:
    # JSON has lists, torch wants tuples for per-dimension arguments
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return tuple(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise InvalidInput(f"sequential config: layer {index} ({kind}) key '{key}' has unsupported value {value!r}")


def save_sequential(path: Path | str, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a ``.safetensors`` checkpoint of the built-in sequential architecture.

    The file's metadata carries ``architecture`` = ``"sequential"`` and ``config`` = the JSON
    config, so ``load_model(path)`` needs nothing else.
    """
    module = build(config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise InvalidInput(f"state dict does not match the config: missing {missing}, unexpected {unexpected}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"architecture": ARCHITECTURE, "config": json.dumps(config)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
