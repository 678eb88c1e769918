"""Lanczos against dense eigendecompositions: symmetric matrices with a known spectrum and Hessians."""

import pytest
import torch

from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.solvers.lanczos import lanczos
from curvscope_service.curvature.solvers.power_iteration import power_iteration
from curvscope_service.errors import Cancelled


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return Q @ torch.diag(eigenvalues) @ Q.T


@pytest.fixture(scope="module")
def indefinite() -> tuple[torch.Tensor, torch.Tensor]:
    """200 x 200, well separated extremes on both sides of a bulk in [-1, 1]."""
    spectrum = torch.cat([torch.linspace(-1, 1, 194, dtype=torch.float64), torch.tensor([6.0, 4.5, 3.0, -4.0, -2.5, -2.0], dtype=torch.float64)])
    return with_spectrum(spectrum), torch.sort(spectrum).values


def assert_extremes(result, truth: torch.Tensor, top_k: int, bottom_k: int, rtol: float) -> None:
    assert result.largest == pytest.approx(truth.flip(0)[:top_k].tolist(), rel=rtol)
    assert result.smallest == pytest.approx(truth[:bottom_k].tolist(), rel=rtol)


@pytest.mark.parametrize("max_basis", [None, 12])
def test_extremes_of_a_known_spectrum(indefinite, max_basis):
    A, truth = indefinite
    result = lanczos(lambda v: A @ v, 200, top_k=3, bottom_k=3, tol=1e-10, max_basis=max_basis)
    assert result.converged
    assert_extremes(result, truth, 3, 3, 1e-9)
    if max_basis is not None:
        assert result.restarts > 0


def test_reported_residuals_are_the_true_ones(indefinite):
    A, _ = indefinite
    result = lanczos(lambda v: A @ v, 200, top_k=2, bottom_k=2, tol=1e-4, max_basis=10, return_eigenvectors=True)
    largest, smallest = result.eigenvectors
    for values, vectors, residuals in [
        (result.largest, largest, result.largest_residuals),
        (result.smallest, smallest, result.smallest_residuals),
    ]:
        for theta, y, reported in zip(values, vectors, residuals):
            assert y.norm().item() == pytest.approx(1.0, abs=1e-12)
            assert (A @ y - theta * y).norm().item() == pytest.approx(reported, rel=1e-6, abs=1e-13)
            assert reported <= 1e-4 * abs(theta)


def test_budget_too_small_is_not_converged(indefinite):
    A, _ = indefinite
    result = lanczos(lambda v: A @ v, 200, top_k=3, bottom_k=3, tol=1e-10, max_products=8)
    assert not result.converged
    assert result.products == 8
    assert len(result.largest) == len(result.smallest) == 3


def test_same_seed_same_result(indefinite):
    A, _ = indefinite
    runs = [lanczos(lambda v: A @ v, 200, top_k=2, bottom_k=1, seed=seed, tol=1e-6) for seed in (3, 3, 4)]
    assert runs[0].largest == runs[1].largest and runs[0].products == runs[1].products
    assert runs[0].largest == pytest.approx(runs[2].largest, rel=1e-5)


def test_on_step_and_stopping_through_the_operator(indefinite):
    A, _ = indefinite
    steps = []
    lanczos(lambda v: A @ v, 200, top_k=1, tol=1e-8, on_step=lambda k, estimate: steps.append((k, estimate)))
    assert [k for k, _ in steps] == list(range(1, len(steps) + 1))
    assert steps[-1][1] == pytest.approx(6.0, rel=1e-8)

    def cancelled_after_five(v, calls=[]):
        calls.append(1)
        if len(calls) > 5:
            raise Cancelled("stop")
        return A @ v

    with pytest.raises(Cancelled):
        lanczos(cancelled_after_five, 200, top_k=1, tol=1e-12)


def test_exhausted_space_is_exact():
    A = with_spectrum(torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float64))
    result = lanczos(lambda v: A @ v, 4, top_k=3, bottom_k=3, tol=1e-14)
    assert result.converged and result.products == 4
    assert result.largest == pytest.approx([3.0, 2.0, 0.5], abs=1e-12)
    assert result.smallest == pytest.approx([-1.0, 0.5, 2.0], abs=1e-12)


def test_invariant_subspace_and_repeated_eigenvalues():
    # Three distinct eigenvalues in 7 dimensions: the Krylov space breaks down after three
    # steps; the copies live in its orthogonal complement.
    A = with_spectrum(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0], dtype=torch.float64))
    result = lanczos(lambda v: A @ v, 7, top_k=3, bottom_k=2, tol=1e-10)
    assert result.converged
    assert result.largest == pytest.approx([3.0, 3.0, 3.0], abs=1e-10)
    assert result.smallest == pytest.approx([1.0, 1.0], abs=1e-10)


def test_zero_eigenvalue_converges():
    A = with_spectrum(torch.tensor([0.0, 0.0, 1.0] + [0.5] * 40, dtype=torch.float64))
    result = lanczos(lambda v: A @ v, 43, top_k=1, bottom_k=1, tol=1e-6)
    assert result.converged
    assert result.smallest[0] == pytest.approx(0.0, abs=1e-12)


def test_invalid_requests():
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError):
        lanczos(lambda v: A @ v, 5, top_k=0, bottom_k=0)
    with pytest.raises(ValueError):
        lanczos(lambda v: A @ v, 5, top_k=6)
    with pytest.raises(ValueError):
        lanczos(lambda v: A @ v, 50, top_k=5, max_basis=6)


def test_linear_regression_closed_form():
    # Second truth: the Hessian of half the mean squared error of a linear model is X^T X / n.
    torch.manual_seed(0)
    X, y = torch.randn(400, 150, dtype=torch.float64), torch.randn(400, 1, dtype=torch.float64)
    model = torch.nn.Linear(150, 1, bias=False).double()
    op = HessianOperator(model, X, y, lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean(), micro_batch_size=128)
    truth = torch.linalg.eigvalsh(X.T @ X / 400)
    result = lanczos(op.matvec, op.dim, top_k=3, bottom_k=3, tol=1e-9, max_basis=20, max_products=2000)
    assert result.converged and result.restarts > 0
    assert_extremes(result, truth, 3, 3, 1e-6)


@pytest.mark.parametrize("dtype, tol, rtol", [(torch.float64, 1e-9, 1e-6), (torch.float32, 1e-4, 1e-3)])
def test_hessian_extremes(case, dtype, tol, rtol):
    truth = torch.linalg.eigvalsh(case.hessian)
    c = case.to(dtype)
    op = HessianOperator(c.model, c.inputs, c.targets, c.loss_fn)
    result = lanczos(op.matvec, op.dim, top_k=3, bottom_k=3, tol=tol, dtype=dtype, max_basis=20, max_products=1000)
    assert result.converged
    scale = truth.abs().max().item()
    # Relative to each eigenvalue, with the operator's rounding as the floor for those near 0.
    floor = 0.0 if dtype == torch.float64 else 1e-3 * scale
    for got, want in zip(result.largest + result.smallest, truth.flip(0)[:3].tolist() + truth[:3].tolist()):
        assert abs(got - want) <= rtol * abs(want) + floor


def test_power_iteration_reference(indefinite):
    A, _ = indefinite
    result = power_iteration(lambda v: A @ v, 200, top_n=3, tol=1e-6, dtype=torch.float64)
    # Largest in magnitude, found one after another: 6, 4.5, then -4.
    assert result.eigenvalues == pytest.approx([6.0, 4.5, -4.0], rel=1e-4)
    assert result.products <= 300


def test_a_tolerance_below_float32_rounding_is_never_called_converged(indefinite):
    # The Lanczos relation can look exact while float32 products are not: the reported
    # residuals stay at the products' rounding level, so 1e-10 cannot be met in float32.
    A, _ = indefinite
    A32 = A.float()
    result = lanczos(lambda v: A32 @ v, 200, top_k=2, tol=1e-10, max_products=150, dtype=torch.float32,
                     return_eigenvectors=True, eigenvector_dtype=torch.float64)
    assert not result.converged
    # The floor is eps(float32) x ||A|| (= 6), and both residuals sit on it: a bound, not a measurement.
    assert result.residual_floor == pytest.approx(torch.finfo(torch.float32).eps * 6.0, rel=1e-6)
    assert result.largest_residuals == [result.residual_floor] * 2
    # What float32 products can resolve: the true float64 residuals of the Ritz pairs are of the
    # floor's order (within 100x), and not below it.
    for theta, y in zip(result.largest, result.eigenvectors[0]):
        true_residual = (A @ y - theta * y).norm().item()
        assert 0.1 * result.residual_floor <= true_residual <= 100 * result.residual_floor
