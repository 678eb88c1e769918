"""Load a data batch: a safetensors file with ``inputs``, ``targets`` and optional named extras."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from curvscope_service.errors import InvalidInput, NotFound
from curvscope_service.loading.safetensors_file import load_tensors


@dataclass
class LoadedData:
    inputs: Tensor  # floating, in the requested dtype
    targets: Tensor  # int64 class indices or floating targets, as stored (floats in the requested dtype)
    extra: dict[str, Tensor]
    num_samples: int


def load_data(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedData:
    """Load and check a data file; every tensor shares the first (sample) dimension."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"data file {path.name} does not exist")
    _, tensors = load_tensors(path, what="data", device=device)
    missing = [k for k in ("inputs", "targets") if k not in tensors]
    if missing:
        raise InvalidInput(
            f"data file lacks {' and '.join(repr(k) for k in missing)}; it needs tensors named 'inputs' and 'targets' "
            f"(found: {_names(sorted(tensors))})"
        )
    for name, tensor in tensors.items():
        if tensor.dim() == 0:
            raise InvalidInput(f"data tensor '{name}' is a scalar; every tensor needs a first dimension of samples")
    n = tensors["inputs"].shape[0]
    if n == 0:
        raise InvalidInput("data file has zero samples; 'inputs' needs at least one row")
    for name, tensor in tensors.items():
        # An empty tensor holds no bytes yet could declare 10**12 samples, which sampling and
        # batching would then allocate for; with every dimension non-zero, samples <= file bytes.
        if tensor.numel() == 0:
            raise InvalidInput(f"data tensor '{name}' has shape {list(tensor.shape)} and holds no values; "
                               "every sample needs at least one")
    for name, tensor in tensors.items():
        if tensor.shape[0] != n:
            raise InvalidInput(f"data tensor '{name}' has {tensor.shape[0]} samples but 'inputs' has {n}; they must match")

    inputs = tensors.pop("inputs")
    if inputs.dtype == torch.bool or inputs.is_complex():
        raise InvalidInput(f"data 'inputs' has dtype {inputs.dtype}; store real numbers (ints are cast to float)")
    inputs = inputs.to(dtype)  # integer pixels etc. become floats
    if not torch.isfinite(inputs).all():
        raise InvalidInput("data 'inputs' contains NaN or Inf values")
    targets = tensors.pop("targets")
    if targets.is_floating_point():
        targets = targets.to(dtype)
    extra = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return LoadedData(inputs=inputs, targets=targets, extra=extra, num_samples=n)


def _names(names: list[str], limit: int = 6) -> str:
    # names come from the file: a few, each clipped, keep the message one short line
    shown = ", ".join(name if len(name) <= 40 else name[:37] + "..." for name in names[:limit]) or "none"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
