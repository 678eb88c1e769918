"""HessianOperator against torch.func.hessian, for every method, model, loss and dtype."""

import pytest
import torch
from torch import nn

from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.errors import Cancelled, InvalidInput

METHODS = ["retained", "double_backward", "jvp_grad"]


def vectors(dim: int, k: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("method", METHODS)
def test_matvec_and_matmat_equal_dense(case, method, rel):
    op = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, method=method)
    V = vectors(op.dim, 3)
    assert op.dim == case.hessian.shape[0]
    assert rel(op.matvec(V[:, 0]), case.hessian @ V[:, 0]) < 1e-10
    assert rel(op.matmat(V), case.hessian @ V) < 1e-10
    assert op.products == 4


@pytest.mark.parametrize("method", METHODS)
def test_micro_batches_sum_to_the_full_batch(case, method, rel):
    # 10 samples in micro-batches of 3, 3, 3, 1: the weights must follow the sizes.
    op = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, method=method, micro_batch_size=3)
    V = vectors(op.dim, 2)
    assert rel(op.matvec(V[:, 0]), case.hessian @ V[:, 0]) < 1e-10
    assert rel(op.matmat(V), case.hessian @ V) < 1e-10


def test_loss_and_gradient(case, rel):
    names = [k for k, _ in case.model.named_parameters()]
    out = case.model(case.inputs)
    loss = case.loss_fn(out, case.targets)
    grads = torch.autograd.grad(loss, list(case.model.parameters()))
    expected = torch.cat([g.reshape(-1) for g in grads])
    for method in METHODS:
        op = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, method=method, micro_batch_size=4)
        assert op.param_names == names
        assert op.loss() == pytest.approx(loss.item(), rel=1e-12)
        assert rel(op.gradient(), expected) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_parameter_block_is_the_dense_diagonal_block(case, method, hessian_of, rel):
    names = [k for k, _ in case.model.named_parameters()][-2:]
    op = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, param_names=names, method=method)
    block = hessian_of(case.model, case.inputs, case.targets, case.loss_fn, names)
    sizes = [p.numel() for _, p in case.model.named_parameters()]
    start = sum(sizes) - sum(sizes[-2:])
    assert torch.allclose(block, case.hessian[start:, start:], rtol=1e-12, atol=1e-14)
    V = vectors(op.dim, 2)
    assert rel(op.matvec(V[:, 0]), block @ V[:, 0]) < 1e-10
    assert rel(op.matmat(V), block @ V) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_exported_graph_module(cnn_case, method, rel):
    case = cnn_case
    exported = torch.export.export(case.model, (case.inputs,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    module = exported.module()
    op = HessianOperator(module, case.inputs, case.targets, case.loss_fn, method=method, micro_batch_size=4)
    V = vectors(op.dim, 2)
    assert rel(op.matvec(V[:, 0]), case.hessian @ V[:, 0]) < 1e-10
    assert rel(op.matmat(V), case.hessian @ V) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_float32(case, method, rel):
    case32 = case.to(torch.float32)
    op = HessianOperator(case32.model, case32.inputs, case32.targets, case32.loss_fn, method=method)
    assert op.dtype == torch.float32
    V = vectors(op.dim, 2)
    assert rel(op.matvec(V[:, 0].float()).double(), case.hessian @ V[:, 0]) < 1e-5
    assert rel(op.matmat(V.float()).double(), case.hessian @ V) < 1e-5


def test_linear_regression_closed_form(rel):
    # Half mean squared error of a linear model: H = X^T X / n exactly.
    torch.manual_seed(0)
    X, y = torch.randn(50, 8, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    model = nn.Linear(8, 1, bias=False).double()
    op = HessianOperator(model, X, y, lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean(), micro_batch_size=16)
    assert rel(op.matmat(torch.eye(8, dtype=torch.float64)), X.T @ X / 50) < 1e-12


def test_auto_picks_by_batch_size(cnn_case):
    case = cnn_case
    args = (case.model, case.inputs, case.targets, case.loss_fn)
    assert HessianOperator(*args).method == "retained"
    assert HessianOperator(*args, retain_max_samples=5).method == "double_backward"
    with pytest.raises(InvalidInput, match="double_backward"):
        HessianOperator(*args, method="retained", retain_max_samples=5)


def test_invalid_inputs(cnn_case):
    case = cnn_case
    args = (case.model, case.inputs, case.targets, case.loss_fn)
    with pytest.raises(InvalidInput, match="unknown parameter"):
        HessianOperator(*args, param_names=["nope"])
    with pytest.raises(InvalidInput, match="batch size"):
        HessianOperator(case.model, case.inputs, case.targets[:3], case.loss_fn)
    with pytest.raises(InvalidInput, match="method"):
        HessianOperator(*args, method="finite_differences")
    op = HessianOperator(*args)
    with pytest.raises(ValueError):
        op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError):
        op.matvec(torch.zeros(op.dim, dtype=torch.float32))


@pytest.mark.parametrize("method", METHODS)
def test_check_runs_before_every_product_and_stops_it(cnn_case, method):
    case = cnn_case
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise Cancelled("the client went away")

    op = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, method=method, check=check)
    v = torch.ones(op.dim, dtype=torch.float64)
    op.matvec(v)
    assert calls
    with pytest.raises(Cancelled):
        for _ in range(3):
            op.matvec(v)
    assert op.products < 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda(cnn_case, method, rel):
    case = cnn_case
    model = case.to(torch.float64).model.cuda()
    op = HessianOperator(model, case.inputs.cuda(), case.targets.cuda(), case.loss_fn, method=method)
    V = vectors(op.dim, 2).cuda()
    assert rel(op.matmat(V).cpu(), case.hessian @ V.cpu()) < 1e-10


@pytest.mark.parametrize(
    "method",
    [
        "retained",
        "double_backward",
        pytest.param(
            "jvp_grad",
            # pytorch/pytorch#123996 (and #112013, both open since 2023-24): seen here on 2.13.0, reported
            # upstream on 2.14.0 and 2.15 nightlies; the proposed fix (pytorch/pytorch#197723) is in no
            # release. From 2.15 on the test runs unmarked: it passes once the fix is out, else the
            # known range grows.
            marks=pytest.mark.xfail(
                torch.__version__ < "2.15", raises=RuntimeError, strict=True,
                reason="torch < 2.15 (seen on 2.13.0, reported on 2.14.0: pytorch/pytorch#123996): jvp of F.mse_loss's "
                       "gradient hits an immutable ZeroTensor",
            ),
        ),
    ],
)
def test_functional_mse_loss(method, hessian_of, rel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, Y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    op = HessianOperator(model, X, Y, nn.functional.mse_loss, method=method)
    v = vectors(op.dim, 1)[:, 0]
    assert rel(op.matvec(v), hessian_of(model, X, Y, nn.functional.mse_loss) @ v) < 1e-10


class Residual(nn.Module):
    """x + tanh(LayerNorm(W x)): a pre-activation residual block with LayerNorm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.norm(self.linear(x)))


def reverse_over_reverse(model, inputs, targets, loss_fn) -> torch.Tensor:
    """The dense Hessian by torch.autograd.functional.hessian (double backward, no vmap).

    Not ``dense_reference.dense_hessian`` here: on torch 2.13 torch.func's vmap'd second derivatives
    (jacfwd(jacrev), jacrev(jacrev)) through LayerNorm are off by ~4 % against central finite
    differences of the gradient, while this and the operator agree with them to 2e-10.
    """
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]

    def loss(theta):
        values = {k: t.reshape(p.shape) for (k, p), t in zip(params.items(), theta.split(sizes))}
        return loss_fn(torch.func.functional_call(model, values, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in params.values()]))


@pytest.mark.parametrize("method", METHODS)
def test_layer_norm_and_residual_connections(method, rel):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), Residual(6), Residual(6), nn.Linear(6, 3)).double().eval()
    for block in (model[1], model[2]):  # LayerNorm's affine parameters away from (1, 0)
        nn.init.uniform_(block.norm.weight, 0.5, 1.5)
        nn.init.uniform_(block.norm.bias, -0.5, 0.5)
    inputs = torch.randn(12, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,))
    dense = reverse_over_reverse(model, inputs, targets, nn.functional.cross_entropy)
    op = HessianOperator(model, inputs, targets, nn.functional.cross_entropy, method=method, micro_batch_size=5)
    V = vectors(op.dim, 4)
    assert op.dim == dense.shape[0] == 4 * 6 + 6 + 2 * (6 * 6 + 6 + 2 * 6) + 6 * 3 + 3
    assert rel(op.matmat(V), dense @ V) < 1e-10
    assert rel(op.matvec(V[:, 0]), dense @ V[:, 0]) < 1e-10
