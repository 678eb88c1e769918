"""The losses curvscope differentiates: mean over the samples, as in Wu, Ma & E (2018)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from curvscope_service.errors import InvalidInput

_PROBABILITY_TOLERANCE = 1e-3


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy; targets are int class indices (n,) or class probabilities (n, C)."""
    if not targets.is_floating_point():
        targets = targets.long()
    return F.cross_entropy(outputs, targets, reduction="mean")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over all elements (``F.mse_loss`` with reduction ``mean``).

    Written out because ``F.mse_loss`` fails under torch.func's jvp of grad in torch 2.13
    ("ZeroTensors are immutable"), which the batched products use.
    """
    return ((outputs - targets) ** 2).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": cross_entropy, "mse": mse}


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss called ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise InvalidInput(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}") from None


def check_targets(name: str, outputs: Tensor, targets: Tensor) -> None:
    """Raise InvalidInput unless ``targets`` fit loss ``name`` for these model ``outputs``."""
    get_loss(name)
    n = outputs.shape[0]
    if targets.shape[:1] != outputs.shape[:1]:
        raise InvalidInput(f"targets have {targets.shape[0] if targets.dim() else 0} rows but the model gave {n} outputs")
    if name == "cross_entropy":
        _check_classification(outputs, targets)
    else:
        _check_regression(outputs, targets)


def _check_classification(outputs: Tensor, targets: Tensor) -> None:
    if outputs.dim() != 2:
        raise InvalidInput(
            f"cross_entropy needs model outputs of shape (n, classes); the model gives {_shape(outputs)}"
        )
    classes = outputs.shape[1]
    if targets.dtype == torch.bool or targets.is_complex():
        raise InvalidInput(f"cross_entropy targets have dtype {targets.dtype}; use int64 class indices or float probabilities")
    if not targets.is_floating_point():
        if targets.dim() != 1:
            raise InvalidInput(f"cross_entropy class-index targets must have shape (n,); got {_shape(targets)}")
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise InvalidInput(
                f"cross_entropy targets hold class indices {low}..{high} but the model has {classes} classes (0..{classes - 1})"
            )
        return
    if tuple(targets.shape) != tuple(outputs.shape):
        raise InvalidInput(
            f"cross_entropy float targets are class probabilities of shape {_shape(outputs)}; got {_shape(targets)} "
            "(store class indices as int64 instead)"
        )
    if not torch.isfinite(targets).all() or (targets < 0).any():
        raise InvalidInput("cross_entropy probability targets must be finite and non-negative")
    sums = targets.sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=_PROBABILITY_TOLERANCE):
        raise InvalidInput("cross_entropy probability targets must sum to 1 in every row")


def _check_regression(outputs: Tensor, targets: Tensor) -> None:
    if not targets.is_floating_point():
        raise InvalidInput(
            f"mse needs float targets of the outputs' shape {_shape(outputs)}; got {targets.dtype} "
            "(class indices? use cross_entropy, or store one-hot floats)"
        )
    if tuple(targets.shape) != tuple(outputs.shape):
        raise InvalidInput(f"mse targets have shape {_shape(targets)} but the model outputs {_shape(outputs)}")
    if not torch.isfinite(targets).all():
        raise InvalidInput("mse targets contain NaN or Inf values")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"
