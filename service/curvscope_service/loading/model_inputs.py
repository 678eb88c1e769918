"""The inputs a loaded model takes, in the order the engine passes them positionally."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: torch.dtype | None  # None = any floating
    sample_shape: tuple[int | None, ...] | None  # one sample, None = dynamic dim
