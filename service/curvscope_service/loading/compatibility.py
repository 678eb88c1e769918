"""Check that a model, a data batch and a loss fit together before any expensive analysis."""

from __future__ import annotations

import torch

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import sequential
from curvscope_service.loading.checkpoint import LoadedModel
from curvscope_service.loading.data import LoadedData
from curvscope_service.loading.messages import one_line
from curvscope_service.losses import check_targets, get_loss

_PROBE_SAMPLES = 4


def validate_pair(model: LoadedModel, data: LoadedData, loss: str) -> None:
    """Run the model on a few samples and check inputs, outputs and targets; raise InvalidInput."""
    get_loss(loss)
    sample_shape = tuple(data.inputs.shape[1:])
    if model.input_shape is not None and sample_shape != model.input_shape:
        raise InvalidInput(
            f"model expects inputs of shape {_fmt(model.input_shape)}, data has {_fmt(sample_shape)}"
        )
    probe = model.fixed_batch_size or min(_PROBE_SAMPLES, data.num_samples)
    if model.fixed_batch_size and data.num_samples % model.fixed_batch_size:
        raise InvalidInput(
            f"model was exported with a fixed batch size of {model.fixed_batch_size} but the data has "
            f"{data.num_samples} samples; re-export with a dynamic batch dimension (see docs/formats.md)"
        )
    if model.architecture == sequential.ARCHITECTURE:
        # the config sets the activation sizes (channels, padding): refuse a blow-up before the probe allocates it
        sequential.check_activations(model.module, sample_shape)
    try:
        with torch.no_grad():
            outputs = model.module(data.inputs[:probe])
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:  # torch reports shape errors in all of these
        if model.input_shape is not None:
            raise InvalidInput(
                f"model expects inputs of shape {_fmt(model.input_shape)}, data has {_fmt(sample_shape)} ({one_line(e)})"
            ) from None
        raise InvalidInput(f"model does not accept inputs of shape {_fmt(sample_shape)} from the data: {one_line(e)}") from None
    if not isinstance(outputs, torch.Tensor):
        raise InvalidInput(f"model returns {type(outputs).__name__}; curvscope needs a single output tensor")
    if not torch.isfinite(outputs).all():
        raise InvalidInput("model outputs contain NaN or Inf on the first samples; check the weights and the input scaling")
    check_targets(loss, outputs, data.targets[:probe])


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
