"""Networks that are not a plain chain: residual blocks and max pooling get the naive bound over
their graph (a block as ‖skip‖ + L(block), a pool as √N), never an SDP bound; anything else a
reason and the lower bound only. Each against a truth computed here by hand."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from curvscope_service.engine import AnalysisJob, run_analysis
from curvscope_service.errors import InvalidInput
from curvscope_service.lipschitz import graph_bound, lipsdp, lipsdp_bound, lipsdp_graph
from curvscope_service.lipschitz.graph_bound import bound_graph, max_pool_factor
from curvscope_service.lipschitz.eclipse_fast import eclipse_fast
from curvscope_service.lipschitz.lower import jacobian_norms
from curvscope_service.lipschitz.network import activation_slope
from curvscope_service.loading import load_model

from conftest import loaded


def norm(m: nn.Module | torch.Tensor) -> float:
    w = m if isinstance(m, torch.Tensor) else m.weight
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def export(module: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    module.eval()
    program = torch.export.export(module, (torch.randn(2, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def write_data(root: Path, model: nn.Module, shape: tuple[int, ...], n: int = 24, seed: int = 5) -> Path:
    """Inputs, and zero targets of the model's output shape for the mse loss."""
    inputs = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        targets = torch.zeros_like(model(inputs))
    path = root / "data.safetensors"
    save_file({"inputs": inputs, "targets": targets}, str(path))
    return path


def lipschitz(model: Path, data: Path | None = None, **spec) -> dict:
    job = AnalysisJob(model_path=model, model_sha256="0" * 64, data_path=data, data_sha256="1" * 64 if data else "",
                      loss="mse", analyses={"lipschitz": spec})
    return run_analysis(job)["results"]["lipschitz"]


class LinearResidual(nn.Module):
    """f(x) = B (x + A x): its constant is exactly ‖B (I + A)‖₂."""

    def __init__(self, n: int = 5, m: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(n, n), nn.Linear(n, m)

    def forward(self, x):
        return self.b(x + self.a(x))


class ResidualReLU(nn.Module):
    """input map, ReLU, an identity-skip block, a projection-shortcut block, ReLU, output map."""

    def __init__(self, n_in: int = 4, width: int = 6, wide: int = 8, n_out: int = 2, seed: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(n_in, width)
        self.l1, self.l2 = nn.Linear(width, width), nn.Linear(width, width)
        self.v1, self.v2, self.proj = nn.Linear(width, wide), nn.Linear(wide, wide), nn.Linear(width, wide, bias=False)
        self.out = nn.Linear(wide, n_out)

    def forward(self, x):
        z = torch.relu(self.inp(x))
        z = z + self.l2(torch.relu(self.l1(z)))
        z = self.proj(z) + self.v2(torch.relu(self.v1(z)))
        return self.out(torch.relu(z))

    def hand_naive(self) -> float:
        return norm(self.inp) * (1 + norm(self.l2) * norm(self.l1)) * (norm(self.proj) + norm(self.v2) * norm(self.v1)) * norm(self.out)


def test_linear_residual_block_lower_exact_naive(tmp_path):
    model = LinearResidual()
    exact = norm(model.b.weight.double() @ (torch.eye(5, dtype=torch.float64) + model.a.weight.double()))
    hand_naive = norm(model.b) * (1 + norm(model.a))
    result = lipschitz(export(model, (5,), tmp_path / "lin.pt2"), write_data(tmp_path, model, (5,)))
    b = result["bounds"]
    assert b["naive"] == pytest.approx(hand_naive, rel=1e-9)
    # the Jacobian is B (I + A) everywhere: the lower bound is the exact constant
    assert b["lower"] == pytest.approx(exact, rel=1e-9)
    assert b["lower"] <= exact * (1 + 1e-9) and exact <= b["naive"] * (1 + 1e-12)
    assert exact < b["naive"] * (1 - 1e-3)  # the triangle inequality is not tight here: a real test of the order
    assert result["upper"] == b["naive"] and result["method"] == "naive" and not result["chain"]["found"]
    assert "residual" in result["chain"]["reason"]
    details = {d["method"]: d for d in result["details"]}
    for method in ("eclipse_fast", "lipsdp_neuron", "lipsdp_layer"):
        assert details[method]["status"] == "not_applicable" and "value" not in details[method]
        assert "plain chain" in details[method]["note"] and "residual" in details[method]["note"]
    assert "identity skip 1 + L(block)" in details["naive"]["note"]
    assert result["relative_gap"] == pytest.approx((b["naive"] - b["lower"]) / b["naive"])


def test_relu_residual_net_naive_is_the_hand_product(tmp_path):
    model = ResidualReLU().eval()
    program = load_model(export(model, (4,), tmp_path / "res.pt2"))
    graph = bound_graph(program.module, (4,))
    assert graph.value == pytest.approx(model.hand_naive(), rel=1e-9)
    first, second = graph.joins
    assert first.terms[0] == 1.0 and first.terms[1] == pytest.approx(norm(model.l2) * norm(model.l1), rel=1e-9)
    assert second.terms[0] == pytest.approx(norm(model.proj), rel=1e-9)
    assert second.terms[1] == pytest.approx(norm(model.v2) * norm(model.v1), rel=1e-9)
    # ECLipsE-Fast per chain piece, combined by the same rules: the pieces are x -> inp -> relu,
    # the two blocks' inner chains, and add_1 -> relu -> out (the shortcut has no activation: its norm)
    relu = activation_slope("relu")
    eye = np.eye(6)

    def piece(*layers: np.ndarray) -> float:
        return min(math.prod(norm(torch.from_numpy(w)) for w in layers), eclipse_fast(list(layers), [relu]))

    w = {name: getattr(model, name).weight.detach().double().numpy() for name in ("inp", "l1", "l2", "v1", "v2", "proj", "out")}
    hand_eclipse = (piece(w["inp"], eye) * (1 + piece(w["l1"], w["l2"])) * (norm(model.proj) + piece(w["v1"], w["v2"]))
                    * piece(np.eye(8), w["out"]))
    assert graph.eclipse == pytest.approx(hand_eclipse, rel=1e-9) and graph.eclipse_pieces == 4
    assert graph.eclipse < graph.value * (1 - 1e-3)  # tighter here than the product of norms
    # the graph's forward (used by the ascent) is the model, and its smoothed version is close
    x = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(graph.forward(x), model.double()(x))
    # soundness: no Jacobian anywhere exceeds the bound
    points = torch.randn(2000, 4, dtype=torch.float64) * 3
    assert float(jacobian_norms(model.double(), points).max()) <= graph.eclipse


def test_scalar_residual_relu_net_against_its_true_constant(tmp_path):
    """For R -> R a ReLU net is piecewise linear: its constant is max |f'| over a dense grid."""

    class Scalar(ResidualReLU):
        def __init__(self) -> None:
            super().__init__(n_in=1, width=5, wide=6, n_out=1, seed=4)

    model = Scalar().eval()
    data = write_data(tmp_path, model, (1,))
    result = lipschitz(export(model, (1,), tmp_path / "scalar.pt2"), data, ascent_steps=30)
    grid = torch.linspace(-60.0, 60.0, 400_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(model.double()(grid[:, None]).sum(), grid)
    true = float(slope.abs().max())
    slopes = torch.unique(slope.abs().round(decimals=9))
    assert result["lower"] <= true * (1 + 1e-9) and true <= result["upper"]
    assert result["bounds"]["naive"] == pytest.approx(model.hand_naive(), rel=1e-9)
    b = result["bounds"]
    assert true <= b["lipsdp_neuron"] <= b["lipsdp_layer"] * (1 + 1e-6) <= b["eclipse_fast"] * (1 + 2e-6) <= b["naive"] * (1 + 2e-6)
    assert result["upper"] == b["lipsdp_neuron"] == min(v for k, v in b.items() if k != "lower")
    # What the lower bound claims: it is |f'(x)| at a point it evaluated exactly, so one of the
    # net's finitely many slopes (to float32 rounding of the model), and at least the largest
    # slope at the data points, which it evaluates first.
    assert (slopes - result["lower"]).abs().min().item() <= 1e-5 * true
    points = load_file(str(data))["inputs"].double().requires_grad_(True)
    (at_data,) = torch.autograd.grad(model.double()(points).sum(), points)
    assert result["lower"] >= float(at_data.abs().max()) * (1 - 1e-6)


@pytest.mark.parametrize("kernel, stride, dilation, count", [
    (2, 2, 1, 1), (3, 1, 1, 9), (3, 2, 1, 4), (2, 1, 2, 4), ((3, 1), (1, 1), 1, 3), (3, None, 1, 1),
])
def test_max_pool_factor_is_attained(kernel, stride, dilation, count):
    """√N is the pool's exact ℓ2 constant: a spike in the element lying in the most windows reaches it."""
    factor, n = max_pool_factor(kernel, stride, dilation, 2)
    assert n == count and factor == pytest.approx(math.sqrt(count))
    pool = nn.MaxPool2d(kernel, stride=stride, dilation=dilation)
    best = 0.0
    for i in range(6):
        for j in range(6):
            x = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
            x[0, 0, i, j] = 1.0
            best = max(best, float(pool(x).norm() / x.norm()))
    assert best == pytest.approx(factor, rel=1e-12)
    pairs = torch.randn(200, 1, 7, 7, dtype=torch.float64), torch.randn(200, 1, 7, 7, dtype=torch.float64)
    ratios = (pool(pairs[0]) - pool(pairs[1])).flatten(1).norm(dim=1) / (pairs[0] - pairs[1]).flatten(1).norm(dim=1)
    assert float(ratios.max()) <= factor


def pool_cnn(kernel: int, stride: int) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(kernel, stride), nn.Flatten(),
                         nn.Linear(2 * ((6 - kernel) // stride + 1) ** 2, 3)).eval()


def conv_norm(conv: nn.Conv2d, shape: tuple[int, ...]) -> float:
    conv = copy.deepcopy(conv).double()
    jac = torch.autograd.functional.jacobian(lambda x: conv(x.reshape(1, *shape)).reshape(-1),
                                             torch.zeros(math.prod(shape), dtype=torch.float64))
    return norm(jac)


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 1)])
def test_max_pool_cnn_sequential_and_exported_agree_with_the_hand_product(tmp_path, kernel, stride):
    model = pool_cnn(kernel, stride)
    hand = conv_norm(model[0], (1, 6, 6)) * max_pool_factor(kernel, stride, 1, 2)[0] * norm(model[4])
    from_module = bound_graph(loaded(model, (1, 6, 6)).module, (1, 6, 6))
    assert from_module.value == pytest.approx(hand, rel=1e-9) and from_module.exact
    from_graph = bound_graph(load_model(export(model, (1, 6, 6), tmp_path / "pool.pt2")).module, (1, 6, 6))
    assert from_graph.value == pytest.approx(hand, rel=1e-6)  # the archive holds float32 weights
    points = torch.randn(300, 1, 6, 6, dtype=torch.float64)
    assert float(jacobian_norms(model.double(), points).max()) <= hand


def test_max_pool_net_through_the_analysis(tmp_path):
    from curvscope_service.loading import save_sequential
    from curvscope_service.loading.sequential import build

    layers = [{"type": "conv2d", "in_channels": 1, "out_channels": 3, "kernel_size": 3, "padding": 1}, {"type": "relu"},
              {"type": "max_pool2d", "kernel_size": 3, "stride": 2}, {"type": "flatten"},
              {"type": "linear", "in_features": 3 * 2 * 2, "out_features": 2}]
    config = {"input_shape": [1, 5, 5], "layers": layers}
    torch.manual_seed(0)
    module = build(config).eval()
    save_sequential(tmp_path / "pool.safetensors", config, module.state_dict())
    hand = conv_norm(module[0], (1, 5, 5)) * 2.0 * norm(module[4])  # k=3, s=2: 4 windows per element, √4
    result = lipschitz(tmp_path / "pool.safetensors", write_data(tmp_path, module, (1, 5, 5)), ascent_steps=15)
    assert result["bounds"]["naive"] == pytest.approx(hand, rel=1e-9) and result["upper"] == result["bounds"]["naive"]
    assert 0 < result["lower"] <= result["upper"] and "max pooling" in result["chain"]["reason"]
    naive = next(d for d in result["details"] if d["method"] == "naive")
    assert "√4 = 2" in naive["note"]
    # the piece before the pool (conv, ReLU) by ECLipsE-Fast, times √4, times the linear layer's norm
    conv = copy.deepcopy(module[0]).double()
    w_conv = torch.autograd.functional.jacobian(lambda x: conv(x.reshape(1, 1, 5, 5)).reshape(-1),
                                                torch.zeros(25, dtype=torch.float64)).numpy()
    piece = min(norm(torch.from_numpy(w_conv)), eclipse_fast([w_conv, np.eye(75)], [activation_slope("relu")]))
    b = result["bounds"]
    assert b["eclipse_fast"] == pytest.approx(piece * 2.0 * norm(module[4]), rel=1e-9)
    assert result["lower"] <= b["lipsdp_neuron"] <= b["lipsdp_layer"] * (1 + 1e-6) <= b["eclipse_fast"] * (1 + 2e-6)
    assert result["upper"] == min(v for k, v in b.items() if k != "lower")
    # without data the naive bound alone answers
    alone = lipschitz(tmp_path / "pool.safetensors", methods=["LIPSCHITZ_METHOD_NAIVE"])
    assert alone["upper"] == b["naive"] and alone["lower"] == 0.0


class Gated(nn.Module):
    """A product of two data paths (a gate): not Lipschitz globally, so no upper bound exists."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) * self.b(x))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):  # x: (batch, tokens, 4)
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.out(x + weights @ x).flatten(1)


@pytest.mark.parametrize("model, shape, why", [(Gated(), (3,), "'mul' .*product of two data paths"),
                                               (Attention(), (3, 4), "'matmul' .*product of two data paths")])
def test_unbounded_graphs_get_a_reason_and_the_lower_bound_only(tmp_path, model, shape, why):
    path = export(model, shape, tmp_path / "m.pt2")
    result = lipschitz(path, write_data(tmp_path, model, shape), ascent_steps=9)
    assert math.isinf(float(result["upper"])) and result["method"] == "" and set(result["bounds"]) == {"lower"}
    details = {d["method"]: d for d in result["details"]}
    assert details["naive"]["status"] == "not_applicable" and re.search(why, details["naive"]["note"])
    assert result["lower"] > 0 and "no sound upper bound" in result["note"]
    with pytest.raises(InvalidInput, match=why):
        lipschitz(path)


def test_a_block_inside_a_block_nests_the_rule(tmp_path):
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(6)
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            inner = x + self.b(torch.tanh(self.a(x)))
            return x + self.c(torch.relu(inner))

    model = Nested().eval()
    graph = bound_graph(load_model(export(model, (4,), tmp_path / "n.pt2")).module, (4,))
    hand = 1 + norm(model.c) * (1 + norm(model.b) * norm(model.a))
    assert graph.value == pytest.approx(hand, rel=1e-9)
    points = torch.randn(1000, 4, dtype=torch.float64) * 2
    assert float(jacobian_norms(model.double(), points).max()) <= graph.value
    assert np.isclose(graph.joins[-1].terms[1], norm(model.c) * (1 + norm(model.b) * norm(model.a)), rtol=1e-9)


def test_softmax_head_is_half_lipschitz(tmp_path):
    """Softmax's Jacobian diag(p) − ppᵀ has norm at most 1/2 (Gershgorin), reached for two equal logits."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(8)
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            return torch.softmax(self.a(x), dim=-1)

    model = Head().eval()
    graph = bound_graph(load_model(export(model, (3,), tmp_path / "h.pt2")).module, (3,))
    assert graph.value == pytest.approx(0.5 * norm(model.a), rel=1e-9)
    logits = torch.randn(1000, 4, dtype=torch.float64) * 3
    softmax_norms = jacobian_norms(lambda z: torch.softmax(z, dim=-1), logits)
    assert float(softmax_norms.max()) <= 0.5
    assert float(jacobian_norms(lambda z: torch.softmax(z, dim=-1), torch.tensor([[0.0, 0.0, -50.0, -50.0]], dtype=torch.float64))) \
        == pytest.approx(0.5, rel=1e-9)
    assert float(jacobian_norms(model.double(), logits[:, :3]).max()) <= graph.value


def test_concatenation_counts_a_path_as_often_as_it_occurs(tmp_path):
    """cat([x, W x, x]): √(1 + ‖W‖² + 1), attained on the top singular vector when it is a linear map."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(9)
            self.w = nn.Linear(3, 3, bias=False)

        def forward(self, x):
            return torch.cat([x, self.w(x), x], dim=1)

    model = Cat().eval()
    graph = bound_graph(load_model(export(model, (3,), tmp_path / "c.pt2")).module, (3,))
    exact = norm(torch.cat([torch.eye(3, dtype=torch.float64), model.w.weight.double(), torch.eye(3, dtype=torch.float64)]))
    assert graph.value == pytest.approx(math.sqrt(2 + norm(model.w) ** 2), rel=1e-9)
    assert exact == pytest.approx(graph.value, rel=1e-9)  # ‖[I; W; I]‖² = 2 + ‖W‖²: the rule is tight here


def test_lipsdp_per_piece_against_the_papers_formulation(tmp_path, monkeypatch):
    """LipSDP-Neuron over a residual graph too large for one matrix inequality: each chain piece
    solved and certified, combined by the graph's rules; the truth here composes an independent
    cvxpy solve of each piece by hand."""
    from test_lipsdp import paper_lipsdp

    monkeypatch.setattr(graph_bound, "MAX_LIFTED_NEURONS", 0)
    model = ResidualReLU().eval()
    result = lipschitz(export(model, (4,), tmp_path / "res.pt2"), methods=["LIPSCHITZ_METHOD_NAIVE", "LIPSCHITZ_METHOD_LIPSDP_NEURON"])
    w = {name: getattr(model, name).weight.detach().double().numpy() for name in ("inp", "l1", "l2", "v1", "v2", "out")}

    def piece(first: np.ndarray, second: np.ndarray) -> float:
        return min(norm(torch.from_numpy(first)) * norm(torch.from_numpy(second)), paper_lipsdp([first, second], 0.0, 1.0, "neuron"))

    hand = (piece(w["inp"], np.eye(6)) * (1 + piece(w["l1"], w["l2"])) * (norm(model.proj) + piece(w["v1"], w["v2"]))
            * piece(np.eye(8), w["out"]))
    (detail,) = [d for d in result["details"] if d["method"] == "lipsdp_neuron"]
    assert detail["status"] == "ok" and detail["pieces"] == 4 and "each certified" in detail["note"]
    assert detail["value"] == pytest.approx(hand, rel=5e-5)
    assert detail["value"] < result["bounds"]["naive"] * (1 - 1e-3) and result["method"] == "lipsdp_neuron"


def whole_graph_lipsdp_by_hand(model: ResidualReLU) -> float:
    """LipSDP-Neuron of ResidualReLU written out from the paper's quadratic constraints: z = (x, a0,
    a1, a2, a3) with a0 = relu(W_inp x), a1 = relu(W_l1 a0), z1 = a0 + W_l2 a1, a2 = relu(W_v1 z1),
    a3 = relu(W_proj z1 + W_v2 a2), y = W_out a3; M = Eᵀ Q E + FᵀF − ρ diag(I, 0) ⪯ 0."""
    w = {name: getattr(model, name).weight.detach().double().numpy() for name in ("inp", "l1", "l2", "v1", "v2", "proj", "out")}
    sizes = [4, 6, 6, 8, 8]
    offsets = np.cumsum([0, *sizes])

    def at(block: int, matrix: np.ndarray) -> np.ndarray:
        row = np.zeros((matrix.shape[0], offsets[-1]))
        row[:, offsets[block]:offsets[block + 1]] = matrix
        return row

    z1 = at(1, np.eye(6)) + at(2, w["l2"])
    pre = np.vstack([at(0, w["inp"]), at(1, w["l1"]), w["v1"] @ z1, w["proj"] @ z1 + at(3, w["v2"])])
    hidden = pre.shape[0]
    e = np.vstack([pre, np.hstack([np.zeros((hidden, 4)), np.eye(hidden)])])
    f = at(4, w["out"])
    lam, rho = cp.Variable(hidden, nonneg=True), cp.Variable(nonneg=True)
    t = cp.diag(lam)
    q = cp.bmat([[np.zeros((hidden, hidden)), t], [t, -2 * t]])
    select = np.zeros((offsets[-1], offsets[-1]))
    select[:4, :4] = np.eye(4)
    m = e.T @ q @ e + f.T @ f - rho * select
    problem = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    problem.solve(solver="CVXOPT")
    assert problem.status == "optimal"
    return math.sqrt(rho.value)


def test_lipsdp_over_the_whole_graph_against_the_papers_constraints(tmp_path, monkeypatch):
    model = ResidualReLU().eval()
    path = export(model, (4,), tmp_path / "res.pt2")
    result = lipschitz(path, write_data(tmp_path, model, (4,)))
    (detail,) = [d for d in result["details"] if d["method"] == "lipsdp_neuron"]
    assert detail["status"] == "ok" and detail["pieces"] == 1 and "one matrix inequality" in detail["note"]
    truth = whole_graph_lipsdp_by_hand(model)
    assert truth * (1 - 1e-7) <= detail["value"] <= truth * (1 + 2e-5)  # certified, within solver tolerance
    # tighter than the chain pieces combined by the triangle inequality, and above the lower bound
    monkeypatch.setattr(graph_bound, "MAX_LIFTED_NEURONS", 0)
    per_piece = lipschitz(path, methods=["LIPSCHITZ_METHOD_NAIVE", "LIPSCHITZ_METHOD_LIPSDP_NEURON"])["bounds"]["lipsdp_neuron"]
    assert result["lower"] <= detail["value"] < per_piece * 0.99
    assert result["bounds"]["lipsdp_neuron"] <= result["bounds"]["lipsdp_layer"] <= result["bounds"]["naive"]
    # over the row limit: per chain piece, and the note says why
    monkeypatch.setattr(graph_bound, "MAX_LIFTED_NEURONS", 1200)
    monkeypatch.setattr(lipsdp_bound, "MAX_WHOLE_GRAPH_ROWS", 10)
    (detail,) = [d for d in lipschitz(path, methods=["LIPSCHITZ_METHOD_NAIVE", "LIPSCHITZ_METHOD_LIPSDP_NEURON"])["details"]
                 if d["method"] == "lipsdp_neuron"]
    assert detail["pieces"] == 4 and "would have 32 rows (over 10)" in detail["note"]
    assert detail["value"] == pytest.approx(per_piece, rel=1e-9)


def test_lifted_chain_gives_the_chain_lipsdp(tmp_path):
    # A plain chain read as a graph: the lifted matrices give the same certified bound as the
    # chain formulation (reduced, normalised, block-tridiagonal) of the same weights.
    torch.manual_seed(4)
    module = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    graph = bound_graph(load_model(export(module, (5,), tmp_path / "chain.pt2")).module, (5,))
    lifted = graph.lifted
    assert lifted is not None and lifted.r.shape == (13, 18) and lifted.f.shape == (3, 18)
    result = lipsdp_graph.solve(lipsdp_graph.make_problem(lifted, "neuron", "CVXOPT"))
    whole = lipsdp_graph.certify(lifted, result["lambdas"]).bound
    weights = [m.weight.detach().double().numpy() for m in module if isinstance(m, nn.Linear)]
    chain = lipsdp.solve(lipsdp.make_problem(weights, [0.0, 0.0], [1.0, 1.0], "neuron", "CVXOPT"))
    assert whole == pytest.approx(lipsdp.certify(weights, [0.0, 0.0], [1.0, 1.0], chain["lambdas"]).bound, rel=2e-5)


def test_max_pooling_keeps_the_graph_out_of_one_matrix_inequality(tmp_path):
    graph = bound_graph(load_model(export(pool_cnn(2, 2), (1, 6, 6), tmp_path / "pool.pt2")).module, (1, 6, 6))
    assert graph.value is not None and graph.lifted is None


def test_rounding_is_not_taken_for_an_affine_map(tmp_path):
    class Rounded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(torch.div(x, 0.5, rounding_mode="floor"))

    graph = bound_graph(load_model(export(Rounded(), (3,), tmp_path / "r.pt2")).module, (3,))
    assert graph.value is None and "not continuous" in graph.reason


def test_a_module_of_unknown_data_flow_gets_the_data_lower_bound(tmp_path):
    """Not an nn.Sequential and not a graph: no upper bound and no ascent, the data's Jacobians only."""
    from curvscope_service.analyses.base import AnalysisContext, EngineLimits
    from curvscope_service.analyses.lipschitz import LipschitzSpec, normalize, run
    from curvscope_service.loading.data import LoadedData

    model = LinearResidual().eval()
    inputs = torch.randn(6, 5)
    context = AnalysisContext(model=loaded(model, (5,)), data=LoadedData(inputs, torch.zeros(6, 3), {}, 6), loss="mse",
                              loss_fn=None, curvature="hessian", seed=0, device="cpu", limits=EngineLimits(), micro_batch_size=64)
    result = run(context, normalize(LipschitzSpec(), EngineLimits()))
    exact = norm(model.b.weight.double() @ (torch.eye(5, dtype=torch.float64) + model.a.weight.double()))
    assert math.isinf(float(result["upper"])) and result["lower"] == pytest.approx(exact, rel=1e-9)
    assert "data flow is unknown" in result["chain"]["reason"]
    assert all(d["status"] == "not_applicable" for d in result["details"] if d["method"] != "lower")


class ConvBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus the input (or a strided 1x1 conv-BN), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        for bn in [self.b1, self.b2, *[m for m in self.shortcut.modules() if isinstance(m, nn.BatchNorm2d)]]:
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.shortcut(x))


def test_conv_resnet_with_batchnorm_and_a_projection_shortcut(tmp_path):
    torch.manual_seed(11)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.block1, self.block2 = ConvBlock(3, 3, 1), ConvBlock(3, 4, 2)
            self.fc = nn.Linear(4 * 3 * 3, 2)

        def forward(self, x):
            return self.fc(self.block2(self.block1(torch.relu(self.stem(x)))).flatten(1))

    model = ResNet().eval()
    graph = bound_graph(load_model(export(model, (1, 6, 6), tmp_path / "resnet.pt2")).module, (1, 6, 6))
    double = copy.deepcopy(model).double()

    def op_norm(f, shape) -> float:  # the norm of a (folded) affine map's linear part, from its Jacobian
        jac = torch.autograd.functional.jacobian(lambda x: f(x.reshape(1, *shape)).reshape(-1),
                                                 torch.zeros(math.prod(shape), dtype=torch.float64))
        return norm(jac)

    b1, b2 = double.block1, double.block2
    inner1 = op_norm(lambda x: b1.b1(b1.c1(x)), (3, 6, 6)) * op_norm(lambda x: b1.b2(b1.c2(x)), (3, 6, 6))
    inner2 = op_norm(lambda x: b2.b1(b2.c1(x)), (3, 6, 6)) * op_norm(lambda x: b2.b2(b2.c2(x)), (4, 3, 3))
    hand = (op_norm(double.stem, (1, 6, 6)) * (1 + inner1) * (op_norm(b2.shortcut, (3, 6, 6)) + inner2)
            * norm(double.fc))
    assert graph.value == pytest.approx(hand, rel=1e-6)  # float32 weights in the archive
    assert [j.terms[0] for j in graph.joins][0] == 1.0
    assert graph.eclipse is not None and graph.eclipse <= graph.value
    points = torch.randn(300, 1, 6, 6, dtype=torch.float64) * 2
    assert float(jacobian_norms(double, points).max()) <= graph.eclipse
