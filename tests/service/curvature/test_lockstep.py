"""Per-layer solves in lockstep and the float32 basis: against dense float64 truths and separate solves."""

import pytest
import torch

from curvscope_service.curvature.operators.hessian import HessianOperator
from curvscope_service.curvature.solvers.extreme_eigenvalues import compute_block_eigen, compute_hessian_eigen
from curvscope_service.curvature.solvers.lanczos import lanczos, lanczos_steps
from curvscope_service.loading.checkpoint import parameter_blocks


def blocks_of(case) -> list[list[str]]:
    return list(parameter_blocks(case.model).values())


def block_slices(case) -> list[slice]:
    """Where each block's parameters sit in the dense Hessian (named_parameters() order)."""
    offsets, start = {}, 0
    for name, p in case.model.named_parameters():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    return [slice(offsets[block[0]].start, offsets[block[-1]].stop) for block in blocks_of(case)]


@pytest.mark.parametrize("method", ["retained", "double_backward"])
def test_diagonal_block_products_are_the_dense_diagonal_blocks(case, method):
    op = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, method=method, micro_batch_size=4)
    generator = torch.Generator().manual_seed(0)
    slices = block_slices(case)
    vectors = [torch.randn(s.stop - s.start, generator=generator, dtype=torch.float64) for s in slices]
    products = op.diagonal_block_products(blocks_of(case), vectors)
    assert op.products == len(slices)
    for s, v, product in zip(slices, vectors, products):
        # float64 products of 10 samples in micro-batches of 4: rounding only.
        assert torch.allclose(product, case.hessian[s, s] @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("budget_bytes", [512 << 20, 1])
def test_lockstep_blocks_equal_separate_solves_and_the_dense_truth(case, budget_bytes):
    whole = HessianOperator(case.model, case.inputs, case.targets, case.loss_fn)
    blocks = blocks_of(case)
    # A budget of 1 byte runs every block alone: grouping must not change any result.
    lockstep = compute_block_eigen(whole, blocks, top_k=2, bottom_k=1, tol=1e-8, budget_bytes=budget_bytes)
    for block, s, report in zip(blocks, block_slices(case), lockstep):
        separate = compute_hessian_eigen(
            HessianOperator(case.model, case.inputs, case.targets, case.loss_fn, param_names=block),
            top_k=2, bottom_k=1, tol=1e-8)
        # Same seeds, same products: the same Krylov spaces, up to the products' rounding.
        assert report["hvps"] == separate["hvps"]
        assert report["largest"] == pytest.approx(separate["largest"], rel=1e-9, abs=1e-12)
        assert report["smallest"] == pytest.approx(separate["smallest"], rel=1e-9, abs=1e-12)
        truth = torch.linalg.eigvalsh(case.hessian[s, s])
        scale = truth.abs().max().item()
        assert report["converged"]
        # The extremes are the dense block's; the second largest may miss a copy of a repeated
        # largest eigenvalue (a last layer's block under mse is I kron X^T X / n), as any
        # single-vector Krylov method can, but it is always an eigenvalue of the block.
        for got, want in ((report["largest"][0], truth[-1].item()), (report["smallest"][0], truth[0].item())):
            assert abs(got - want) <= 1e-6 * abs(want) + 1e-9 * scale
        for got in report["largest"]:
            assert (truth - got).abs().min().item() <= 1e-6 * abs(got) + 1e-9 * scale


def test_lockstep_keeps_each_blocks_ritz_pairs(cnn_case):
    whole = HessianOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn)
    blocks = blocks_of(cnn_case)
    kept = {}
    compute_block_eigen(whole, blocks, top_k=1, tol=1e-8,
                        on_ritz=[lambda ritz, i=i: kept.__setitem__(i, ritz) if i % 2 == 0 else None
                                 for i in range(len(blocks))])
    for i, s in enumerate(block_slices(cnn_case)):
        if i % 2:
            continue
        y = kept[i].vectors[:, 0]
        block = cnn_case.hessian[s, s]
        assert y.shape == (s.stop - s.start,) and y.dtype == torch.float64
        assert (y @ block @ y).item() == pytest.approx(kept[i].values[0], rel=1e-8, abs=1e-12)


def test_float32_basis_meets_the_tolerance_against_a_dense_truth(indefinite32):
    # A small basis forces thick restarts, done in place in float32.
    A, truth = indefinite32
    A32 = A.float()
    result = lanczos(lambda v: A32 @ v, A.shape[0], top_k=3, bottom_k=3, tol=1e-4, max_basis=12,
                     dtype=torch.float32, return_eigenvectors=True, eigenvector_dtype=torch.float64)
    assert result.converged and result.restarts > 0
    assert result.largest == pytest.approx(truth.flip(0)[:3].tolist(), rel=1e-4)
    assert result.smallest == pytest.approx(truth[:3].tolist(), rel=1e-4)
    # Honest residuals: the true ||A y - theta y|| (float64) is within the reported one plus the
    # float32 rounding of the products and of the basis (a few eps ||A||).
    slack = 20 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    largest, smallest = result.eigenvectors
    for values, vectors, residuals in [(result.largest, largest, result.largest_residuals),
                                       (result.smallest, smallest, result.smallest_residuals)]:
        for theta, y, reported in zip(values, vectors, residuals):
            assert (A @ y - theta * y).norm().item() <= reported + slack


def test_the_basis_is_kept_in_the_products_dtype():
    steps = lanczos_steps(50, top_k=1, dtype=torch.float32)
    assert next(steps).dtype == torch.float32
    steps = lanczos_steps(50, top_k=1, dtype=torch.float64)
    assert next(steps).dtype == torch.float64


@pytest.fixture(scope="module")
def indefinite32() -> tuple[torch.Tensor, torch.Tensor]:
    """300 x 300, extremes on both sides of a bulk in [-1, 1]."""
    spectrum = torch.cat([torch.linspace(-1, 1, 294, dtype=torch.float64),
                          torch.tensor([6.0, 4.5, 3.0, -4.0, -2.5, -2.0], dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return Q @ torch.diag(spectrum) @ Q.T, torch.sort(spectrum).values
