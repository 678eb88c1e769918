"""Load a data batch: a safetensors file with ``inputs``, ``targets`` and optional named extras."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from curvscope_service.errors import InvalidInput, NotFound, ResourceExhausted
from curvscope_service.loading.safetensors_file import SafetensorsReader, TensorEntry

# Values in one batch, all tensors together: what a 4 GiB upload of float32 holds. Integer pixels
# are cast to floats, so a 4 GiB uint8 file would otherwise become 32 GiB of float64.
MAX_DATA_VALUES = 1 << 30
# Samples in one batch (MNIST's whole training set is 60,000). Subsampling draws a permutation
# of all of them: 128 MB at this cap.
MAX_DATA_SAMPLES = 1 << 24


@dataclass
class LoadedData:
    inputs: Tensor  # floating, in the requested dtype
    targets: Tensor  # int64 class indices or floating targets, as stored (floats in the requested dtype)
    extra: dict[str, Tensor]
    num_samples: int


def load_data(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedData:
    """Load and check a data file; every tensor shares the first (sample) dimension.

    Names, shapes, sample counts and sizes are checked on the header before any tensor is read.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"data file {path.name} does not exist")
    with SafetensorsReader(path, what="data") as reader:
        n = _check_entries(reader.header.tensors)
        tensors = {name: reader.read(name) for name in reader.header.tensors}

    inputs = tensors.pop("inputs")
    if inputs.dtype == torch.bool or inputs.is_complex():
        raise InvalidInput(f"data 'inputs' has dtype {inputs.dtype}; store real numbers (ints are cast to float)")
    inputs = inputs.to(device=device, dtype=dtype)  # integer pixels etc. become floats
    if not torch.isfinite(inputs).all():
        raise InvalidInput("data 'inputs' contains NaN or Inf values")
    targets = _to(tensors.pop("targets"), device, dtype)
    extra = {k: _to(v, device, dtype) for k, v in tensors.items()}
    return LoadedData(inputs=inputs, targets=targets, extra=extra, num_samples=n)


def _check_entries(entries: dict[str, TensorEntry]) -> int:
    """The batch's sample count, once every declared shape is checked (nothing is read yet)."""
    missing = [k for k in ("inputs", "targets") if k not in entries]
    if missing:
        raise InvalidInput(
            f"data file lacks {' and '.join(repr(k) for k in missing)}; it needs tensors named 'inputs' and 'targets' "
            f"(found: {_names(sorted(entries))})"
        )
    for name, entry in entries.items():
        if not entry.shape:
            raise InvalidInput(f"data tensor '{name}' is a scalar; every tensor needs a first dimension of samples")
    n = entries["inputs"].shape[0]
    if n == 0:
        raise InvalidInput("data file has zero samples; 'inputs' needs at least one row")
    for name, entry in entries.items():
        # An empty tensor holds no bytes yet could declare 10**12 samples, which sampling and
        # batching would then allocate for; with every dimension non-zero, samples <= file bytes.
        if math.prod(entry.shape) == 0:
            raise InvalidInput(f"data tensor '{name}' has shape {list(entry.shape)} and holds no values; "
                               "every sample needs at least one")
    for name, entry in entries.items():
        if entry.shape[0] != n:
            raise InvalidInput(f"data tensor '{name}' has {entry.shape[0]} samples but 'inputs' has {n}; they must match")
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
