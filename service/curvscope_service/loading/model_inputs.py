"""What a model takes as input, and the data file's tensors matched to it.

Every loader describes its model's inputs as ``ModelInput``s, in the order the module takes them
positionally: the engine calls ``module(*tensors)``. A data file holds one tensor per input: named
as the model names it (``input_ids``, ``attention_mask``, ...), or ``inputs.0``, ``inputs.1``, ...
in the model's order, or, for a model of one input, ``inputs``. Each tensor is cast to the dtype
of the input it feeds: token ids and masks stay integers, floating inputs take the requested
precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope_service.errors import InvalidInput

# The one-input name: what a data file has always called the model's input.
SINGLE_INPUT = "inputs"


@dataclass(frozen=True)
class ModelInput:
    """One positional input of a model."""

    name: str
    dtype: torch.dtype | None  # None = any floating dtype (it follows the requested precision)
    sample_shape: tuple[int | None, ...] | None  # one sample, without the batch dimension; None = dynamic


def single_input(sample_shape: tuple[int, ...] | None) -> tuple[ModelInput, ...]:
    """A model that takes one floating tensor, called ``inputs`` in the data."""
    return (ModelInput(SINGLE_INPUT, None, sample_shape),)


def data_names(model_inputs: Sequence[ModelInput]) -> list[list[str]]:
    """For each model input, the data tensor names that may feed it, preferred first."""
    if len(model_inputs) == 1:
        return [list(dict.fromkeys([model_inputs[0].name, SINGLE_INPUT, f"{SINGLE_INPUT}.0"]))]
    return [[spec.name, f"{SINGLE_INPUT}.{index}"] for index, spec in enumerate(model_inputs)]


def match_inputs(model_inputs: Sequence[ModelInput], names: Sequence[str]) -> list[str]:
    """The data tensor feeding each model input, in the model's order; InvalidInput names what is missing."""
    chosen, missing = [], []
    for spec, candidates in zip(model_inputs, data_names(model_inputs)):
        found = next((name for name in candidates if name in names), None)
        if found is None:
            missing.append(" or ".join(repr(c) for c in candidates[:2]))
        chosen.append(found)
    if missing:
        wanted = ", ".join(spec.name for spec in model_inputs)
        raise InvalidInput(
            f"data file lacks the model's input {'; '.join(missing)}; the model takes ({wanted}): store one tensor per "
            f"input under those names (found: {_names(sorted(names))})"
        )
    return chosen  # type: ignore[return-value]


def cast_input(spec: ModelInput, name: str, tensor: Tensor, *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``tensor`` as the model input ``spec`` takes it: floating inputs in ``dtype``, others in their own dtype."""
    if tensor.dtype == torch.bool and spec.dtype != torch.bool or tensor.is_complex():
        raise InvalidInput(f"data '{name}' has dtype {tensor.dtype}; store real numbers")
    target = dtype if spec.dtype is None or spec.dtype.is_floating_point else spec.dtype
    if not target.is_floating_point and tensor.is_floating_point():
        if not torch.isfinite(tensor).all() or (tensor != tensor.round()).any():
            raise InvalidInput(
                f"data '{name}' holds fractional values but the model's input '{spec.name}' takes {target} "
                "(token ids or a mask?): store it as integers"
            )
    tensor = tensor.to(device=device, dtype=target)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InvalidInput(f"data '{name}' contains NaN or Inf values")
    return tensor


def bind_inputs(model_inputs: Sequence[ModelInput], tensors: Mapping[str, Tensor], *,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[tuple[Tensor, ...], list[str]]:
    """The model's inputs from the data's ``tensors`` (in the model's order) and the names used."""
    chosen = match_inputs(model_inputs, list(tensors))
    return tuple(cast_input(spec, name, tensors[name], device=device, dtype=dtype)
                 for spec, name in zip(model_inputs, chosen)), chosen


def _names(names: list[str], limit: int = 6) -> str:
    # names come from the file: a few, each clipped, keep the message one short line
    shown = ", ".join(name if len(name) <= 40 else name[:37] + "..." for name in names[:limit]) or "none"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
