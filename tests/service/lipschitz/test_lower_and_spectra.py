"""The lower bound (exact Jacobians, ascent) and the data-free weight spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvscope_service.lipschitz.lower import jacobian_norms, lower_bound
from curvscope_service.lipschitz.network import extract_network
from curvscope_service.lipschitz.weight_spectra import fit_power_law, weight_spectra

from conftest import loaded, relu_net


def test_jacobian_norms_match_autograd_per_sample():
    net = relu_net([4, 9, 3], seed=1).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    expected = [torch.linalg.matrix_norm(torch.autograd.functional.jacobian(net, xi), ord=2) for xi in x]
    torch.testing.assert_close(jacobian_norms(net, x), torch.stack(expected))


def test_lower_bound_of_a_linear_net_is_its_exact_constant():
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).double().eval()
    exact = torch.linalg.matrix_norm(net[1].weight @ net[0].weight, ord=2)
    result = lower_bound(net, None, torch.randn(3, 5, dtype=torch.float64))
    assert result.value == pytest.approx(float(exact), rel=1e-12)


def test_ascent_never_lowers_the_bound_and_finds_more_than_the_data():
    net = relu_net([2, 16, 16, 2], seed=3)
    network = extract_network(loaded(net, (2,))).network
    data = torch.randn(4, 2, dtype=torch.float64) * 0.1
    result = lower_bound(net.double(), network, data, steps=45)
    assert result.value >= result.from_data
    # every value is an exact Jacobian norm, so it cannot pass the product of the layer norms
    naive = np.prod([np.linalg.norm(s.matrix, 2) for s in network.segments])
    assert result.value <= naive


def test_power_law_fit_recovers_a_pareto_exponent():
    rng = np.random.default_rng(0)
    alpha = 3.0
    samples = (1.0 - rng.random(4000)) ** (-1.0 / (alpha - 1.0))  # density ∝ x^-alpha on x >= 1
    fit = fit_power_law(samples)
    assert fit.alpha == pytest.approx(alpha, abs=0.15)
    assert fit.ks_distance < 0.05


def test_too_few_eigenvalues_give_no_fit():
    assert fit_power_law(np.array([1.0, 2.0, 3.0])) is None


def test_weight_spectra_of_linear_and_conv_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 40))
    layers = {layer["name"]: layer for layer in weight_spectra(model)}
    assert set(layers) == {"0", "4"}  # BatchNorm's scale is no matrix
    w = model[4].weight.detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    assert layers["4"]["spectral_norm"] == pytest.approx(s[0], rel=1e-12)
    assert layers["4"]["frobenius_norm"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
    assert layers["4"]["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-12)
    k = model[0].weight.detach().double().numpy()
    slices = [np.linalg.norm(k[:, :, i, j], 2) for i in range(3) for j in range(3)]
    assert layers["0"]["spectral_norm"] == pytest.approx(max(slices), rel=1e-12)
    assert layers["0"]["frobenius_norm"] == pytest.approx(np.linalg.norm(k), rel=1e-12)
    assert layers["0"]["alpha_tail"] >= 5 and layers["0"]["alpha"] > 1.0
    assert layers["4"]["alpha_tail"] >= 5  # 8 eigenvalues of WᵀW
