"""The losses curvscope differentiates: mean over the samples, as in Wu, Ma & E (2018).

Every loss is a sum over the batch's counted units divided by a normaliser fixed for the whole
batch: n samples for classification, n * D elements for mse, the number of counted tokens for
token cross-entropy (Hugging Face's convention: labels -100 are ignored, the mean is over the
others). Written per sample, loss_i = n * (sum over sample i's units) / normaliser, the loss is
the mean of the loss_i, so micro-batch losses weighted by their share of samples add up exactly
and every per-sample formula (non-uniformity, Fisher) treats a sequence as one sample.
``bind_loss`` fixes the normaliser of a batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from curvscope_service.errors import InvalidInput

_PROBABILITY_TOLERANCE = 1e-3
# Labels at this value are not counted (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
# The request option ``task``: "" infers the loss' form from the shapes (class per sample for
# (n, C) outputs, class per token for (n, T, C)); causal-lm shifts the labels by one.
TASKS = ("", "causal-lm", "sequence-classification", "token-classification")


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


class TokenCrossEntropy:
    """Cross-entropy over tokens: outputs (m, T, C), labels (m, T), -100 ignored.

    ``tokens_per_sample`` is the batch's counted tokens over its samples, so that a call on any
    m samples is (sum of their token losses) / (tokens_per_sample * m): the mean over samples of
    the per-sample losses, and over the whole batch the mean over its counted tokens. ``shift``
    (causal language modelling): the logits at position t predict the label at t + 1.
    """

    def __init__(self, tokens_per_sample: float, *, shift: bool) -> None:
        self.tokens_per_sample = tokens_per_sample
        self.shift = shift

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.shift:
            outputs, targets = outputs[:, :-1], targets[:, 1:]
        total = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1).long(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (self.tokens_per_sample * outputs.shape[0])

    def sample_labels(self, outputs: Tensor, targets: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """``draws`` label sets (draws, m, T) from the model's predictive distribution at every
        counted position (ignored positions stay ignored): the Fisher's labels."""
        logits = outputs[:, :-1] if self.shift else outputs
        probabilities = torch.softmax(logits.to(torch.float64), dim=-1).cpu().reshape(-1, logits.shape[-1])
        drawn = torch.multinomial(probabilities, draws, replacement=True, generator=generator)
        drawn = drawn.T.reshape(draws, *logits.shape[:2]).to(targets.device)
        labels = targets.long().expand(draws, *targets.shape).clone()
        if self.shift:
            labels[:, :, 1:] = torch.where(targets[None, :, 1:] == IGNORE_INDEX, IGNORE_INDEX, drawn)
        else:
            labels = torch.where(targets[None] == IGNORE_INDEX, IGNORE_INDEX, drawn)
        return labels


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": cross_entropy, "mse": mse}


def check_task(task: str) -> None:
    if task not in TASKS:
        raise InvalidInput(f"unknown task '{task}'; choose one of: {', '.join(t for t in TASKS if t)} (or none)")


def is_token_task(name: str, targets: Tensor, task: str) -> bool:
    """Whether ``cross_entropy`` is taken per token: labels (n, T), or a task that says so."""
    if name != "cross_entropy":
        return False
    if task in ("causal-lm", "token-classification"):
        return True
    return task == "" and not targets.is_floating_point() and targets.dim() == 2


def bind_loss(name: str, targets: Tensor, task: str = "") -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``name`` with its normaliser fixed over this batch's ``targets`` (see the module
    docstring): call it on any slice of the batch along the samples."""
    loss = get_loss(name)
    check_task(task)
    if task == "causal-lm" and name != "cross_entropy":
        raise InvalidInput(f"the task causal-lm needs the loss cross_entropy, not '{name}'")
    if not is_token_task(name, targets, task):
        return loss
    labels = targets[:, 1:] if task == "causal-lm" else targets
    counted = int((labels != IGNORE_INDEX).sum())
    if counted == 0:
        raise InvalidInput("every label is -100 (ignored): the token cross-entropy counts no token; "
                           "check the targets or the attention_mask")
    return TokenCrossEntropy(counted / targets.shape[0], shift=task == "causal-lm")


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss called ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise InvalidInput(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}") from None


def check_targets(name: str, outputs: Tensor, targets: Tensor, task: str = "") -> None:
    """Raise InvalidInput unless ``targets`` fit loss ``name`` (and ``task``) for these model ``outputs``."""
    get_loss(name)
    check_task(task)
    n = outputs.shape[0]
    if targets.shape[:1] != outputs.shape[:1]:
        raise InvalidInput(f"targets have {targets.shape[0] if targets.dim() else 0} rows but the model gave {n} outputs")
    if name == "cross_entropy" and (task in ("causal-lm", "token-classification") or (task == "" and outputs.dim() == 3)):
        _check_tokens(outputs, targets, task)
    elif name == "cross_entropy":
        _check_classification(outputs, targets)
    else:
        _check_regression(outputs, targets)


def _check_tokens(outputs: Tensor, targets: Tensor, task: str) -> None:
    what = f"cross_entropy per token{' (causal-lm)' if task == 'causal-lm' else ''}"
    if outputs.dim() != 3:
        raise InvalidInput(f"{what} needs model outputs of shape (n, T, classes); the model gives {_shape(outputs)}")
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise InvalidInput(f"{what} needs integer labels of shape (n, T); got {targets.dtype}")
    if tuple(targets.shape) != tuple(outputs.shape[:2]):
        raise InvalidInput(f"{what} needs labels of shape {_shape(outputs[..., 0])} for outputs {_shape(outputs)}; "
                           f"got {_shape(targets)}")
    if task == "causal-lm" and outputs.shape[1] < 2:
        raise InvalidInput("causal-lm predicts each next token: sequences need at least 2 positions")
    classes = outputs.shape[2]
    counted = targets[targets != IGNORE_INDEX]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= classes):
        raise InvalidInput(
            f"{what} labels hold {int(counted.min())}..{int(counted.max())} but the model has {classes} classes "
            f"(0..{classes - 1}; -100 = ignored)"
        )


def _check_classification(outputs: Tensor, targets: Tensor) -> None:
    if outputs.dim() != 2:
        raise InvalidInput(
            f"cross_entropy needs model outputs of shape (n, classes) (or (n, T, classes) per token); "
            f"the model gives {_shape(outputs)}"
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
