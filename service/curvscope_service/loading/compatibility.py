"""Check that a model, a data batch and a loss fit together before any expensive analysis."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope_service.errors import InvalidInput
from curvscope_service.loading import sequential
from curvscope_service.loading.checkpoint import LoadedModel
from curvscope_service.loading.data import LoadedData
from curvscope_service.loading.messages import one_line
from curvscope_service.losses import IGNORE_INDEX, check_targets, get_loss, is_token_task

_PROBE_SAMPLES = 4


def validate_pair(model: LoadedModel, data: LoadedData, loss: str, task: str = "") -> None:
    """Run the model on a few samples and check inputs, outputs and targets; raise InvalidInput."""
    get_loss(loss)
    _check_input_shapes(model, data)
    sample_shape = tuple(data.inputs[0].shape[1:])
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
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            outputs = model.module(*(x[:probe] for x in data.inputs))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:  # torch reports shape errors in all of these
        if len(data.inputs) > 1:
            raise InvalidInput(f"model does not accept the data's inputs {_described(data)}: {one_line(e)}") from None
        if model.input_shape is not None:
            raise InvalidInput(
                f"model expects inputs of shape {_fmt(model.input_shape)}, data has {_fmt(sample_shape)} ({one_line(e)})"
            ) from None
        raise InvalidInput(f"model does not accept inputs of shape {_fmt(sample_shape)} from the data: {one_line(e)}") from None
    if not isinstance(outputs, torch.Tensor):
        raise InvalidInput(f"model returns {type(outputs).__name__}; curvscope needs a single output tensor")
    if not torch.isfinite(outputs).all():
        raise InvalidInput("model outputs contain NaN or Inf on the first samples; check the weights and the input scaling")
    check_targets(loss, outputs, data.targets[:probe], task)
    if is_token_task(loss, data.targets, task):  # check_targets saw the first rows; the labels of all
        _check_token_labels(outputs.shape[-1], data.targets)


def _check_input_shapes(model: LoadedModel, data: LoadedData) -> None:
    """Each input's sample shape against the model's (static dimensions only); dtype mismatches
    were made impossible by the loader's casts, so a failing probe below is a shape problem."""
    for spec, name, tensor in zip(model.inputs, data.input_names, data.inputs):
        if spec.sample_shape is None:
            continue
        shape = tuple(tensor.shape[1:])
        fits = len(shape) == len(spec.sample_shape) and all(
            want is None or want == got for want, got in zip(spec.sample_shape, shape))
        if not fits:
            expected = _fmt(tuple("*" if d is None else d for d in spec.sample_shape))
            if len(model.inputs) == 1:
                raise InvalidInput(f"model expects inputs of shape {expected}, data has {_fmt(shape)}")
            raise InvalidInput(f"model input '{spec.name}' takes samples of shape {expected}, data '{name}' has {_fmt(shape)}")


def _check_token_labels(classes: int, targets: torch.Tensor) -> None:
    counted = targets[targets != IGNORE_INDEX]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= classes):
        raise InvalidInput(f"token labels hold {int(counted.min())}..{int(counted.max())} but the model has "
                           f"{classes} classes (0..{classes - 1}; -100 = ignored)")


def _described(data: LoadedData) -> str:
    return ", ".join(f"{name} {_fmt(tuple(x.shape[1:]))} {str(x.dtype).removeprefix('torch.')}"
                     for name, x in zip(data.input_names, data.inputs))


def _fmt(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
