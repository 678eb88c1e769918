"""The losses and their target checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvscope_service.errors import InvalidInput
from curvscope_service.losses import LOSSES, check_targets, get_loss


def _refused(name, outputs, targets, fragment):
    with pytest.raises(InvalidInput) as info:
        check_targets(name, outputs, targets)
    message = str(info.value)
    assert "\n" not in message and fragment in message, message


def test_registry():
    assert set(LOSSES) == {"cross_entropy", "mse"}
    assert get_loss("mse") is LOSSES["mse"]


def test_unknown_loss():
    with pytest.raises(InvalidInput, match=r"^unknown loss 'hinge'; choose one of: cross_entropy, mse$"):
        get_loss("hinge")


def test_cross_entropy_with_indices_and_probabilities():
    outputs = torch.randn(5, 3)
    indices = torch.tensor([0, 2, 1, 1, 0], dtype=torch.int32)
    torch.testing.assert_close(LOSSES["cross_entropy"](outputs, indices), F.cross_entropy(outputs, indices.long()))
    one_hot = F.one_hot(indices.long(), 3).float()
    torch.testing.assert_close(LOSSES["cross_entropy"](outputs, one_hot), F.cross_entropy(outputs, indices.long()))
    check_targets("cross_entropy", outputs, indices)
    check_targets("cross_entropy", outputs, one_hot)


def test_mse_is_the_mean_over_all_elements():
    outputs, targets = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(LOSSES["mse"](outputs, targets), ((outputs - targets) ** 2).mean())
    check_targets("mse", outputs, targets)


@pytest.mark.parametrize(
    ("name", "outputs", "targets", "fragment"),
    [
        ("cross_entropy", torch.randn(4, 3), torch.tensor([0, 1, -1, 2]), "class indices -1..2"),
        ("cross_entropy", torch.randn(4, 3), torch.tensor([0, 1, 2]), "targets have 3 rows but the model gave 4"),
        ("cross_entropy", torch.randn(4, 3), torch.ones(4, 3), "sum to 1"),
        ("cross_entropy", torch.randn(4, 3), -torch.ones(4, 3) / 3, "non-negative"),
        ("cross_entropy", torch.randn(4, 3), torch.ones(4, dtype=torch.bool), "dtype torch.bool"),
        ("cross_entropy", torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.int64), "labels of shape (4, 3)"),
        ("mse", torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), "use cross_entropy"),
        ("mse", torch.randn(4, 3), torch.zeros(4, 3).fill_(float("nan")), "NaN or Inf"),
        ("mse", torch.randn(4, 3), torch.zeros(4, 1), "shape (4, 1)"),
    ],
)
def test_targets_that_do_not_fit(name, outputs, targets, fragment):
    _refused(name, outputs, targets, fragment)


def test_mse_works_under_torch_func_batched_products():
    # torch.func's jvp of F.mse_loss's gradient fails in torch 2.13; ours must not.
    from curvscope_service.curvature.operators.hessian import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    inputs, targets = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    vectors = torch.randn(8, 3, dtype=torch.float64)
    jvp = HessianOperator(model, inputs, targets, LOSSES["mse"], method="jvp_grad").matmat(vectors)
    reference = HessianOperator(model, inputs, targets, LOSSES["mse"], method="double_backward").matmat(vectors)
    torch.testing.assert_close(jvp, reference, rtol=1e-10, atol=1e-12)
