"""The built-in ``sequential`` architecture: an ``nn.Sequential`` described by a JSON config.

Config: ``{"input_shape": [1, 8, 8], "layers": [{"type": "conv2d", "in_channels": 1, ...}, ...]}``.
Each layer takes the keyword arguments of its torch module, with torch's defaults; anything
else is refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn
from torch.func import functional_call

from curvscope_service.errors import InvalidInput, ResourceExhausted
from curvscope_service.loading.messages import brief, one_line

ARCHITECTURE = "sequential"

# Caps on what a config may declare, checked before any module exists. The file's tensors must
# match the declared shapes and the parameter count has its own cap (checkpoint.load_model), but
# a config also declares things no tensor holds: layers without weights, strides and padding that
# set activation sizes, the input shape. Real sequential specs are small MLPs and CNNs.
MAX_LAYERS = 1024  # module objects cost ~2 KB each; a 1 MiB config could otherwise declare 70,000
MAX_WIDTH = 1 << 20  # features, channels, groups: 4x the widest real layer (a 256k-token vocabulary head)
MAX_WINDOW = 256  # kernel, stride, dilation, padding: large-kernel CNNs use 31-51; padding adds zeros
MAX_INPUT_RANK = 8
MAX_SAMPLE_ELEMENTS = 1 << 26  # one input sample: a 3 x 4096 x 4096 image is 50M values
# One sample's activations summed over the layers, what a backward pass keeps (1 GiB in float32).
MAX_ACTIVATION_ELEMENTS = 1 << 28
_SIZE_CAPS = {
    "in_features": MAX_WIDTH, "out_features": MAX_WIDTH, "in_channels": MAX_WIDTH, "out_channels": MAX_WIDTH,
    "num_features": MAX_WIDTH, "groups": MAX_WIDTH,
    "kernel_size": MAX_WINDOW, "stride": MAX_WINDOW, "dilation": MAX_WINDOW, "padding": MAX_WINDOW,
}

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
    """Build the ``nn.Sequential`` a config describes; raise InvalidInput on any bad entry.

    Tensors go to the current default device: build a user's config under
    ``torch.device("meta")`` and check its sizes before materialising it.
    """
    if not isinstance(config, dict):
        raise InvalidInput("sequential config must be a JSON object with 'layers' (and optionally 'input_shape')")
    unknown = set(config) - {"layers", "input_shape"}
    if unknown:
        raise InvalidInput(f"sequential config has unknown keys {sorted(unknown)}; allowed: input_shape, layers")
    input_shape(config)  # validate early, before any module is built
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InvalidInput("sequential config needs a non-empty list 'layers'")
    if len(layers) > MAX_LAYERS:
        raise InvalidInput(f"sequential config declares {len(layers)} layers; the limit is {MAX_LAYERS}")
    return nn.Sequential(*(_build_layer(i, spec) for i, spec in enumerate(layers)))


def input_shape(config: dict) -> tuple[int, ...] | None:
    """One sample's shape from the config, if it gives one."""
    shape = config.get("input_shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise InvalidInput(f"sequential config: input_shape must be a list of positive integers, got {brief(shape)}")
    return check_input_shape(tuple(shape), what="sequential config: input_shape")


def check_input_shape(shape: tuple[int, ...], *, what: str) -> tuple[int, ...]:
    """``shape`` if one sample of it is within the caps; analyses allocate inputs of this shape."""
    if len(shape) > MAX_INPUT_RANK:
        raise InvalidInput(f"{what} has {len(shape)} dimensions; the limit is {MAX_INPUT_RANK}")
    if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        raise InvalidInput(f"{what} {list(shape)} is {math.prod(shape)} values per sample; the limit is {MAX_SAMPLE_ELEMENTS}")
    return shape


def check_activations(module: nn.Sequential, sample_shape: tuple[int, ...]) -> None:
    """Refuse a model whose activations for one sample exceed MAX_ACTIVATION_ELEMENTS.

    The layers run on the meta device (shapes only, nothing allocated), so padding or channel
    counts that would blow a sample up are refused before a real forward pass allocates them.
    """
    x = torch.empty((1, *sample_shape), device="meta")
    total = 0
    for index, layer in enumerate(module):
        # float32 throughout: only the shapes matter, and one dtype keeps every layer's inputs agreeing
        state = {
            name: torch.empty_like(t, device="meta", dtype=torch.float32 if t.is_floating_point() else t.dtype)
            for name, t in (*layer.named_parameters(), *layer.named_buffers())
        }
        try:
            x = functional_call(layer, state, (x,))
        except (RuntimeError, ValueError, IndexError):
            # a layer that refuses this shape refuses it on the real device too, where the caller
            # reports it; the layers before it were counted and stayed under the cap
            return
        total += x.numel()
        if total > MAX_ACTIVATION_ELEMENTS:
            raise ResourceExhausted(
                f"one input sample of shape {list(sample_shape)} takes {total} activation values by layer {index} "
                f"({SPEC_TYPE_OF.get(type(layer), type(layer).__name__)}); the limit is {MAX_ACTIVATION_ELEMENTS}"
            )


def _build_layer(index: int, spec: Any) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise InvalidInput(f"sequential config: layer {index} must be an object with a string 'type'")
    kind = spec["type"]
    if kind not in _LAYERS:
        raise InvalidInput(
            f"sequential config: layer {index} has unknown type {brief(kind)}; choose one of: {', '.join(LAYER_TYPES)}"
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
    cap = _SIZE_CAPS.get(key)
    if cap is not None:
        sizes = value if isinstance(value, list) else [value]
        if any(type(v) is int and v > cap for v in sizes):
            raise InvalidInput(f"sequential config: layer {index} ({kind}) {key} {brief(value)} is over the limit of {cap}")
    # JSON has lists, torch wants tuples for per-dimension arguments
    if isinstance(value, list) and 0 < len(value) <= MAX_INPUT_RANK and all(type(v) is int for v in value):
        return tuple(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise InvalidInput(f"sequential config: layer {index} ({kind}) key '{key}' has unsupported value {brief(value)}")



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
