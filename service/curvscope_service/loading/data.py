"""Load a data batch: a safetensors file with the model's inputs (``inputs``, or one tensor per named
input), ``targets`` and optional named extras."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from curvscope_service.errors import InvalidInput, NotFound, ResourceExhausted
from curvscope_service.loading.model_inputs import (
    SINGLE_INPUT, ModelInput, bind_inputs, data_names, match_inputs, single_input,
)
from curvscope_service.loading.safetensors_file import SafetensorsReader, TensorEntry
from curvscope_service.losses import IGNORE_INDEX

# Values in one batch, all tensors together: what a 4 GiB upload of float32 holds. Integer pixels
# are cast to floats, so a 4 GiB uint8 file would otherwise become 32 GiB of float64.
MAX_DATA_VALUES = 1 << 30
# Samples in one batch (MNIST's whole training set is 60,000). Subsampling draws a permutation
# of all of them: 128 MB at this cap.
MAX_DATA_SAMPLES = 1 << 24


@dataclass
class LoadedData:
    inputs: tuple[Tensor, ...]  # the model's inputs in its order: floating ones in the requested dtype, integers as stored
    targets: Tensor  # int64 class indices or floating targets, as stored (floats in the requested dtype)
    extra: dict[str, Tensor]
    num_samples: int
    input_names: tuple[str, ...] = (SINGLE_INPUT,)  # the data tensors that feed the inputs

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Tensor):  # a one-input batch built by hand
            self.inputs = (self.inputs,)


def load_data(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              model_inputs: Sequence[ModelInput] | None = None, task: str = "") -> LoadedData:
    """Load and check a data file; every tensor shares the first (sample) dimension.

    ``model_inputs`` (default: one floating input, the data's ``inputs``) says which tensors feed
    the model and in what dtype (``model_inputs``). ``targets`` may be left out for the task
    ``causal-lm``: they are then ``input_ids`` with the positions the ``attention_mask`` masks set
    to -100. Names, shapes, sample counts and sizes are checked on the header before any tensor is read.
    """
    path = Path(path)
    specs = tuple(model_inputs) if model_inputs else single_input(None)
    if not path.is_file():
        raise NotFound(f"data file {path.name} does not exist")
    with SafetensorsReader(path, what="data") as reader:
        names = _input_names(specs, reader.header.tensors, task)
        n = _check_entries(reader.header.tensors, names[0])
        tensors = {name: reader.read(name) for name in reader.header.tensors}

    inputs, _ = bind_inputs(specs, {name: tensors.pop(name) for name in names}, device=device, dtype=dtype)
    if "targets" in tensors:
        targets = _to(tensors.pop("targets"), device, dtype)
    else:
        targets = causal_lm_targets(specs, inputs)
    extra = {k: _to(v, device, dtype) for k, v in tensors.items()}
    return LoadedData(inputs=inputs, targets=targets, extra=extra, num_samples=n, input_names=tuple(names))


def causal_lm_targets(specs: Sequence[ModelInput], inputs: Sequence[Tensor]) -> Tensor:
    """Labels for next-token prediction: the token ids, -100 (ignored) where the attention mask is 0."""
    by_name = {spec.name: tensor for spec, tensor in zip(specs, inputs)}
    ids = by_name.get("input_ids", inputs[0] if len(inputs) == 1 else None)
    if ids is None or ids.is_floating_point() or ids.dim() != 2:
        raise InvalidInput("the task causal-lm derives its labels from integer 'input_ids' of shape (n, T); "
                           "this model takes none: store 'targets' in the data file")
    labels = ids.long().clone()
    mask = by_name.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(ids.shape):
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _input_names(specs: Sequence[ModelInput], entries: dict[str, TensorEntry], task: str) -> list[str]:
    """The data tensors that feed the model's inputs; InvalidInput when one or the targets are missing."""
    needs_targets = task != "causal-lm"
    if len(specs) == 1:
        found = next((name for name in data_names(specs)[0] if name in entries), None)
        missing = [k for k, present in ((SINGLE_INPUT, found is not None), ("targets", "targets" in entries or not needs_targets))
                   if not present]
        if missing:
            raise InvalidInput(
                f"data file lacks {' and '.join(repr(k) for k in missing)}; it needs tensors named 'inputs' and 'targets' "
                f"(found: {_names(sorted(entries))})"
            )
        return [found]  # type: ignore[list-item]
    names = match_inputs(specs, list(entries))
    if needs_targets and "targets" not in entries:
        raise InvalidInput(f"data file lacks 'targets'; store the labels under that name (found: {_names(sorted(entries))})"
                           + ("" if task else "; a causal language model derives them from input_ids with --task causal-lm"))
    return names


def _check_entries(entries: dict[str, TensorEntry], first: str) -> int:
    """The batch's sample count, once every declared shape is checked (nothing is read yet)."""
    for name, entry in entries.items():
        if not entry.shape:
            raise InvalidInput(f"data tensor '{name}' is a scalar; every tensor needs a first dimension of samples")
    n = entries[first].shape[0]
    if n == 0:
        raise InvalidInput(f"data file has zero samples; '{first}' needs at least one row")
    for name, entry in entries.items():
        # An empty tensor holds no bytes yet could declare 10**12 samples, which sampling and
        # batching would then allocate for; with every dimension non-zero, samples <= file bytes.
        if math.prod(entry.shape) == 0:
            raise InvalidInput(f"data tensor '{name}' has shape {list(entry.shape)} and holds no values; "
                               "every sample needs at least one")
    for name, entry in entries.items():
        if entry.shape[0] != n:
            raise InvalidInput(f"data tensor '{name}' has {entry.shape[0]} samples but '{first}' has {n}; they must match")
    if n > MAX_DATA_SAMPLES:
        raise ResourceExhausted(f"data batch has {n} samples; the limit is {MAX_DATA_SAMPLES}: upload a subset")
    values = sum(math.prod(entry.shape) for entry in entries.values())
    if values > MAX_DATA_VALUES:
        raise ResourceExhausted(f"data batch holds {values} values; the limit is {MAX_DATA_VALUES}: upload fewer samples")
    return n


def _to(tensor: Tensor, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    return tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)


def _names(names: list[str], limit: int = 6) -> str:
    # names come from the file: a few, each clipped, keep the message one short line
    shown = ", ".join(name if len(name) <= 40 else name[:37] + "..." for name in names[:limit]) or "none"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
