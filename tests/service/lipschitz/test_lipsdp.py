"""LipSDP-Neuron/Layer against the paper's published values, an independent formulation written
from the paper, the certificate, and the order of the bounds."""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import scipy.linalg

from curvscope_service.lipschitz import lipsdp
from curvscope_service.lipschitz.eclipse_fast import eclipse_fast
from curvscope_service.lipschitz.network import Slope

from conftest import reference_weights, relu_net, weights_of


def certified(weights, alphas, betas, variant, solver=None) -> tuple[float, dict]:
    result = lipsdp.solve(lipsdp.make_problem(weights, alphas, betas, variant, solver))
    assert result["status"] == "optimal"
    certificate = lipsdp.certify(weights, alphas, betas, result["lambdas"])
    assert certificate.reason == ""
    return certificate.bound, result


def paper_lipsdp(weights: list[np.ndarray], alpha: float, beta: float, variant: str) -> float:
    """Theorem 2 of Fazlyab et al. (2019) as written there: A = [blkdiag(W_0..W_{l-1}) 0],
    B = [0 I], Q = [[-2αβT, (α+β)T], [(α+β)T, -2T]], M = [A; B]ᵀ Q [A; B] + diag(-ρI, 0.., W_lᵀW_l)."""
    hidden = [w.shape[0] for w in weights[:-1]]
    n0, n = weights[0].shape[1], sum(hidden)
    a_mat = np.hstack([scipy.linalg.block_diag(*weights[:-1]), np.zeros((n, hidden[-1]))])
    b_mat = np.hstack([np.zeros((n, n0)), np.eye(n)])
    ab = np.vstack([a_mat, b_mat])
    if variant == "neuron":
        lam = cp.Variable(n, nonneg=True)
        t = cp.diag(lam)
    else:
        lams = cp.Variable(len(hidden), nonneg=True)
        t = cp.diag(cp.hstack([lams[i] * np.ones(h) for i, h in enumerate(hidden)]))
    rho = cp.Variable(nonneg=True)
    q = cp.bmat([[-2 * alpha * beta * t, (alpha + beta) * t], [(alpha + beta) * t, -2 * t]])
    last = np.zeros((n0 + n, n0 + n))
    last[-hidden[-1]:, -hidden[-1]:] = weights[-1].T @ weights[-1]
    first = np.zeros((n0 + n, n0 + n))
    first[:n0, :n0] = np.eye(n0)
    m = ab.T @ q @ ab - rho * first + last
    problem = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    problem.solve(solver="CVXOPT")
    assert problem.status == "optimal"
    return math.sqrt(rho.value)


def test_published_values_of_the_paper_network():
    weights = reference_weights("random_weights.mat")
    relu = ([0.0] * 3, [1.0] * 3)
    # published to three decimals in the LipSDP repository
    assert certified(weights, *relu, "neuron")[0] == pytest.approx(36.482, abs=6e-4)
    assert certified(weights, *relu, "layer")[0] == pytest.approx(39.839, abs=6e-4)


@pytest.mark.parametrize("solver", ["CVXOPT", "SCS"])
@pytest.mark.parametrize("variant", ["neuron", "layer"])
def test_agrees_with_the_papers_formulation(variant, solver):
    weights = weights_of(relu_net([5, 16, 12, 3], seed=3))
    ours, result = certified(weights, [0.0, 0.0], [1.0, 1.0], variant, solver)
    theirs = paper_lipsdp(weights, 0.0, 1.0, variant)
    assert ours == pytest.approx(theirs, rel=2e-5)  # solver tolerance
    assert ours >= theirs * (1 - 1e-7)  # a certified value never sits below the optimum


@pytest.mark.parametrize("chordal", [True, False])
def test_clique_decomposition_keeps_the_papers_optimum(chordal):
    weights = weights_of(relu_net([5, 10, 8, 6, 3], seed=6))
    problem = lipsdp.make_problem(weights, [0.0] * 3, [1.0] * 3, "neuron", "SCS")
    result = lipsdp.solve({**problem, "chordal": chordal})
    assert result["status"] == "optimal"
    ours = lipsdp.certify(weights, [0.0] * 3, [1.0] * 3, result["lambdas"]).bound
    theirs = paper_lipsdp(weights, 0.0, 1.0, "neuron")
    assert theirs * (1 - 1e-7) <= ours <= theirs * (1 + 1e-4)  # SCS at 1e-6, then certified


def test_clique_constraints_hold_exactly_when_the_whole_matrix_is_negative_semidefinite():
    # Minimising t subject to the clique LMIs of M - tI gives t = λ_max(M) for a block-tridiagonal
    # M: the decomposition is exact, not a relaxation.
    rng = np.random.default_rng(4)
    sizes = [3, 5, 4, 2]
    offsets = np.cumsum([0, *sizes])
    m = np.zeros((offsets[-1], offsets[-1]))
    for k, n in enumerate(sizes):
        a, b = offsets[k], offsets[k + 1]
        block = rng.standard_normal((n, n))
        m[a:b, a:b] = block + block.T
        if k + 1 < len(sizes):
            cross = rng.standard_normal((n, sizes[k + 1]))
            m[a:b, b:offsets[k + 2]], m[b:offsets[k + 2], a:b] = cross, cross.T
    t = cp.Variable()
    constraints = lipsdp._clique_constraints(cp, m - t * np.eye(m.shape[0]), sizes)
    assert [c.args[0].shape[0] for c in constraints] == [8, 9, 6]
    problem = cp.Problem(cp.Minimize(t), constraints)
    problem.solve(solver="CVXOPT")
    assert problem.status == "optimal"
    assert t.value == pytest.approx(np.linalg.eigvalsh(m).max(), rel=1e-6)


def test_leaky_relu_sector_agrees_with_the_papers_formulation():
    weights = weights_of(relu_net([4, 10, 3], seed=5))
    ours, _ = certified(weights, [0.2], [1.0], "neuron")
    assert ours == pytest.approx(paper_lipsdp(weights, 0.2, 1.0, "neuron"), rel=2e-5)


def test_certificate_holds_and_is_the_smallest_rho():
    weights = weights_of(relu_net([4, 12, 8, 3], seed=1))
    alphas, betas = [0.0, 0.0], [1.0, 1.0]
    result = lipsdp.solve(lipsdp.make_problem(weights, alphas, betas, "neuron"))
    certificate = lipsdp.certify(weights, alphas, betas, result["lambdas"])
    lams = [np.clip(l, 0, None) for l in result["lambdas"]]
    # independently: the LMI is negative semidefinite at the certified ρ and not at 0.999 ρ
    assert np.linalg.eigvalsh(lipsdp.lmi_matrix(weights, alphas, betas, lams, certificate.rho)).max() <= 0.0
    assert np.linalg.eigvalsh(lipsdp.lmi_matrix(weights, alphas, betas, lams, 0.999 * certificate.rho)).max() > 0.0


def test_poor_multipliers_give_a_larger_certified_bound_never_a_smaller_one():
    weights = weights_of(relu_net([4, 12, 8, 3], seed=2))
    alphas, betas = [0.0, 0.0], [1.0, 1.0]
    best, result = certified(weights, alphas, betas, "neuron")
    rng = np.random.default_rng(0)
    for _ in range(5):
        perturbed = [l * rng.uniform(0.7, 1.3, size=l.shape) for l in result["lambdas"]]
        certificate = lipsdp.certify(weights, alphas, betas, perturbed)
        assert certificate.bound is None or certificate.bound >= best * (1 - 1e-9)


def test_multipliers_that_certify_nothing_are_refused():
    weights = weights_of(relu_net([4, 6, 3], seed=2))
    certificate = lipsdp.certify(weights, [0.0], [1.0], [np.zeros(6)])
    assert certificate.bound is None and "indefinite" in certificate.reason


def test_nearly_linear_activations_approach_the_linear_constant():
    # LeakyReLU with slope 0.9 lies in the sector [0.9, 1]: LipSDP must stay above the product of
    # the weights (the net with identity activations is one of the functions it bounds).
    net = relu_net([5, 7, 6, 4], seed=4, activation=__import__("torch").nn.LeakyReLU, negative_slope=0.9)
    weights = weights_of(net)
    linear = np.linalg.norm(weights[2] @ weights[1] @ weights[0], 2)
    neuron = certified(weights, [0.9, 0.9], [1.0, 1.0], "neuron")[0]
    assert linear <= neuron <= math.prod(np.linalg.norm(w, 2) for w in weights)


def test_order_of_the_bounds_on_relu_nets(small_relu_nets):
    for net in small_relu_nets:
        weights = weights_of(net)
        k = len(weights) - 1
        relus = [Slope("relu", 0.0, 1.0)] * k
        neuron = certified(weights, [0.0] * k, [1.0] * k, "neuron")[0]
        layer = certified(weights, [0.0] * k, [1.0] * k, "layer")[0]
        fast = eclipse_fast(weights, relus)
        naive = math.prod(np.linalg.norm(w, 2) for w in weights)
        # ECLipsE-Fast picks feasible LipSDP-Layer multipliers in closed form
        assert neuron <= layer * (1 + 1e-6) <= fast * (1 + 2e-6) <= naive * (1 + 3e-6)


def test_input_block_reduction_is_exact_for_wide_inputs():
    weights = weights_of(relu_net([40, 8, 3], seed=6))
    problem = lipsdp.make_problem(weights, [0.0], [1.0], "neuron")
    assert problem["weights"][0].shape == (8, 8) and problem["rows"] == 16
    ours, _ = certified(weights, [0.0], [1.0], "neuron")
    assert ours == pytest.approx(paper_lipsdp(weights, 0.0, 1.0, "neuron"), rel=2e-5)


def test_mnist_network_of_the_paper():
    weights = reference_weights("mnist_weights.mat")
    neuron, _ = certified(weights, [0.0], [1.0], "neuron")
    # the published LipSDP-Network values are 24.320 and 24.365; Neuron cannot be below them
    assert 24.32 <= neuron <= 24.5
