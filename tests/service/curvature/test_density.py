"""Stochastic Lanczos quadrature and the broadened density against exact spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from curvscope_service.curvature.estimators.probes import BlockProducts, rademacher
from curvscope_service.curvature.estimators.slq import slq
from curvscope_service.curvature.estimators.spectral_density import broadened_density, spectral_masses
from curvscope_service.curvature.operators.hessian import HessianOperator
from dense_reference import dense_hessian


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return (Q * eigenvalues) @ Q.T


def dense_apply(A: torch.Tensor):
    return lambda V: A @ V


def w1_over_range(quadrature, eigenvalues: torch.Tensor) -> float:
    distance = scipy.stats.wasserstein_distance(
        quadrature.nodes.reshape(-1).numpy(), eigenvalues.numpy(), quadrature.weights.reshape(-1).numpy())
    return distance / (eigenvalues.max() - eigenvalues.min()).item()


def test_rules_are_exact_for_low_degree_polynomials_of_each_probe():
    # Gauss quadrature with m nodes integrates degree <= 2m - 1 exactly: sum tau theta^k = v^T A^k v.
    eigenvalues = torch.linspace(-1.0, 4.0, 60, dtype=torch.float64)
    A = spectrum_matrix(eigenvalues)
    q = slq(dense_apply(A), 60, steps=6, probes=4, seed=7)
    probes = rademacher(torch.Generator().manual_seed(7), 60, 4, torch.device("cpu")) / math.sqrt(60)
    for k in range(12):
        exact = (probes * (torch.linalg.matrix_power(A, k) @ probes)).sum(0)
        assert torch.allclose((q.weights * q.nodes**k).sum(1), exact, rtol=1e-9, atol=1e-11)
    assert q.products == 24


def test_moments_and_wasserstein_against_the_dense_hessian(cnn_case):
    operator = HessianOperator(cnn_case.model, cnn_case.inputs, cnn_case.targets, cnn_case.loss_fn)
    eigenvalues = torch.linalg.eigvalsh(cnn_case.hessian)
    n = operator.dim
    q = slq(BlockProducts(operator), n, steps=30, probes=10, seed=0)
    assert torch.allclose(q.weights.sum(1), torch.ones(10, dtype=torch.float64), atol=1e-12)
    for k in (1, 2):
        # Each probe's k-th moment is a Hutchinson sample of tr(H^k) / n: within 3 standard errors.
        samples = (q.weights * q.nodes**k).sum(1)
        stderr = samples.std().item() / math.sqrt(10)
        assert abs(samples.mean().item() - (eigenvalues**k).mean().item()) <= 3 * stderr
    assert w1_over_range(q, eigenvalues) < 0.02


def test_wasserstein_falls_with_more_steps_and_probes():
    # A bulk near zero and outliers, as in trained networks; W1 is limited by the steps (node
    # resolution) and by the probes (the weights' sampling noise), so both grow.
    eigenvalues = torch.cat([0.05 * torch.randn(180, generator=torch.Generator().manual_seed(0)).double(),
                             torch.linspace(1.0, 8.0, 20, dtype=torch.float64)])
    A = spectrum_matrix(eigenvalues)

    def mean_w1(steps: int, probes: int) -> float:
        return sum(w1_over_range(slq(dense_apply(A), 200, steps=steps, probes=probes, seed=s), eigenvalues)
                   for s in range(3)) / 3

    few, many = mean_w1(5, 8), mean_w1(60, 64)
    assert many < few / 3 and many < 0.01


def test_low_rank_operator_stops_early_with_an_exact_rule():
    A = spectrum_matrix(torch.tensor([3.0, -2.0, 1.0] + [0.0] * 47, dtype=torch.float64))
    q = slq(dense_apply(A), 50, steps=20, probes=3, seed=0)
    # Each Krylov space is invariant after at most 4 vectors (3 eigenvalues and 0).
    assert q.products <= 3 * 5
    assert q.nodes.shape == (3, 20)
    probes = rademacher(torch.Generator().manual_seed(0), 50, 3, torch.device("cpu")) / math.sqrt(50)
    exact = (probes * (A @ A @ A @ probes)).sum(0)
    assert torch.allclose((q.weights * q.nodes**3).sum(1), exact, atol=1e-12)


def test_density_integrates_to_one_and_its_band_is_the_spread_of_the_probes_curves():
    eigenvalues = torch.cat([torch.linspace(-3.0, -1.0, 30), torch.linspace(1.0, 6.0, 90)]).double()
    A = spectrum_matrix(eigenvalues)
    q = slq(dense_apply(A), 120, steps=40, probes=10, seed=3)
    curve = broadened_density(q.nodes, q.weights, grid_points=2000)
    grid, density = np.array(curve["grid"]), np.array(curve["density"])
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
    assert (density >= 0).all() and grid[0] < eigenvalues.min().item() and grid[-1] > eigenvalues.max().item()
    # Each probe's own broadened rule, written out: the band is their standard error.
    width = 1e-5**0.5 * (q.nodes.max() - q.nodes.min()).item()
    z = (grid[None, :, None] - q.nodes.numpy()[:, None, :]) / width
    curves = (np.exp(-0.5 * z**2) * q.weights.numpy()[:, None, :]).sum(2) / (width * math.sqrt(2 * math.pi))
    assert np.allclose(density, curves.mean(0), rtol=1e-10, atol=1e-12)
    assert np.allclose(curve["density_stderr"], curves.std(0, ddof=1) / math.sqrt(10), rtol=1e-6, atol=1e-10)


def test_masses_of_a_spectrum_with_a_gap_at_zero():
    eigenvalues = torch.cat([torch.linspace(-3.0, -1.0, 30), torch.linspace(1.0, 6.0, 90)]).double()
    q = slq(dense_apply(spectrum_matrix(eigenvalues)), 120, steps=40, probes=10, seed=3)
    masses = spectral_masses(q.nodes, q.weights, tolerance=0.0)
    # Probes' estimates of the share below zero (1/4), from the same rules: within 3 standard errors.
    per_probe = (q.weights * (q.nodes < 0)).sum(1)
    assert masses["negative_mass"] == pytest.approx(per_probe.mean().item(), abs=1e-12)
    assert masses["negative_mass_stderr"] == pytest.approx(per_probe.std().item() / math.sqrt(10), rel=1e-9)
    assert abs(masses["negative_mass"] - 0.25) <= 3 * masses["negative_mass_stderr"]
    # Nothing lies within 0.1 x 6 of zero; everything negative lies below -0.1 x 6.
    wide = spectral_masses(q.nodes, q.weights, tolerance=0.1)
    assert wide["near_zero_mass"] == 0.0 and wide["negative_mass"] == masses["negative_mass"]


def test_density_of_a_multiple_of_the_identity():
    q = slq(dense_apply(2.5 * torch.eye(10, dtype=torch.float64)), 10, steps=5, probes=2)
    curve = broadened_density(q.nodes, q.weights, grid_points=101)
    assert curve["grid"][50] == pytest.approx(2.5) and max(curve["density"]) == curve["density"][50]
    assert max(curve["density_stderr"]) < 1e-9 * max(curve["density"])
    masses = spectral_masses(q.nodes, q.weights)
    assert masses["negative_mass"] == masses["near_zero_mass"] == masses["negative_mass_stderr"] == 0.0


@pytest.fixture(scope="module")
def trained_digits_mlp():
    """A 64-8-10 tanh MLP (610 parameters) trained on 256 digits to a loss of 0.02 (a near-null
    cloud of eigenvalues around zero, a few tiny negative ones): its dense float64 spectrum and
    the default density's quadrature (10 probes of 90 steps)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    inputs = torch.tensor(digits.data[:256], dtype=torch.float64) / 16
    targets = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(300):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, inputs, targets, loss_fn))
    operator = HessianOperator(model, inputs, targets, loss_fn)
    return slq(BlockProducts(operator, block_size=10), operator.dim, steps=90, probes=10, seed=0), eigenvalues


@pytest.mark.parametrize("tolerance", [1e-4, 1e-3, 1e-2, 1e-1])
def test_masses_agree_with_the_dense_spectrum_of_a_trained_network(trained_digits_mlp, tolerance):
    q, eigenvalues = trained_digits_mlp
    masses = spectral_masses(q.nodes, q.weights, tolerance=tolerance)
    cut = tolerance * eigenvalues.abs().max().item()
    negative = (eigenvalues < -cut).double().mean().item()
    near_zero = (eigenvalues.abs() <= cut).double().mean().item()
    # The claim of docs/spectrum.md: within 0.03 of the exact shares on small models.
    assert abs(masses["negative_mass"] - negative) <= 0.03
    assert abs(masses["near_zero_mass"] - near_zero) <= 0.03
    assert masses["negative_tolerance"] == tolerance


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        slq(dense_apply(torch.eye(3, dtype=torch.float64)), 3, steps=0)
    with pytest.raises(ValueError, match="grid_points"):
        broadened_density(torch.zeros(2, 2), torch.ones(2, 2) / 2, grid_points=1)
    with pytest.raises(ValueError, match="sigma"):
        broadened_density(torch.zeros(2, 2), torch.ones(2, 2) / 2, sigma=0.0)
    with pytest.raises(ValueError, match="two probes"):
        broadened_density(torch.zeros(1, 2), torch.ones(1, 2) / 2)
    with pytest.raises(ValueError, match="two probes"):
        spectral_masses(torch.zeros(1, 2), torch.ones(1, 2) / 2)
    with pytest.raises(ValueError, match="non-negative"):
        spectral_masses(torch.zeros(2, 2), torch.ones(2, 2) / 2, tolerance=-1.0)
