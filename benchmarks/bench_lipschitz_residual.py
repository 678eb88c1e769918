"""Lipschitz bounds of residual networks: time and tightness of the naive bound over the graph, of
ECLipsE-Fast and LipSDP-Neuron per chain piece, and of LipSDP-Neuron over the whole graph in one
matrix inequality, against the lower bound (Jacobians over random points plus the ascent).

    python benchmarks/bench_lipschitz_residual.py [--threads 2] [--points 64] [--steps 60] [--only NAME]

Random ReLU residual MLPs (an input map, identity-skip blocks x + W2 relu(W1 x), an output map) and a
small conv ResNet (BatchNorm, a strided projection shortcut, 2x2 max pooling; and once without the
pooling, which lets it be solved as one matrix inequality), exported with torch.export and loaded as
the service loads them. LipSDP runs in this process here (the service runs each solve in a solver
subprocess) and every bound is certified as in the service. The lower bound starts from --points
random inputs and takes --steps ascent steps (the analysis' ``ascent_steps``); --only runs the nets
whose name contains NAME.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from curvscope_service.lipschitz import lipsdp, lipsdp_graph
from curvscope_service.lipschitz.graph_bound import bound_graph
from curvscope_service.lipschitz.lipsdp_bound import MAX_WHOLE_GRAPH_ROWS
from curvscope_service.lipschitz.lower import lower_bound
from curvscope_service.loading import load_model


class ResidualMLP(nn.Module):
    def __init__(self, n_in: int, width: int, blocks: int, n_out: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, n_out)

    def forward(self, x):
        z = torch.relu(self.inp(x))
        for block in self.blocks:
            z = torch.relu(z + block(z))
        return self.out(z)


class SmallResNet(nn.Module):
    def __init__(self, c: int = 4, pool: bool = True) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(1, c, 3, padding=1), nn.MaxPool2d(2) if pool else nn.Identity()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.sc, self.bsc = nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * (2 * 2 if pool else 4 * 4), 10)

    def forward(self, x):
        z = self.pool(torch.relu(self.stem(x)))
        z = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(z))))) + self.bsc(self.sc(z)))
        return self.fc(z.flatten(1))


def certified_piece(weights, slopes) -> float | None:
    alphas, betas = [s.alpha for s in slopes], [s.beta for s in slopes]
    result = lipsdp.solve(lipsdp.make_problem(weights, alphas, betas, "neuron", None))
    if result["status"] != "optimal":
        return None
    return lipsdp.certify(weights, alphas, betas, result["lambdas"]).bound


def run(name: str, model: nn.Module, shape: tuple[int, ...], root: Path, points: int, steps: int) -> None:
    torch.manual_seed(0)
    model.eval()
    program = torch.export.export(model, (torch.randn(2, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / f"{name}.pt2")
    loaded = load_model(root / f"{name}.pt2")
    started = time.perf_counter()
    graph = bound_graph(loaded.module, shape)
    t_graph = time.perf_counter() - started
    started = time.perf_counter()
    sdp = graph.combine(lambda key, weights, slopes: certified_piece(weights, slopes))
    t_sdp = time.perf_counter() - started
    whole, t_whole = "n/a (max pooling)", ""
    problem = lipsdp_graph.make_problem(graph.lifted, "neuron") if graph.lifted is not None else None
    if problem is not None and problem["rows"] > MAX_WHOLE_GRAPH_ROWS:
        whole = f"n/a ({problem['rows']} rows, over {MAX_WHOLE_GRAPH_ROWS})"
    elif problem is not None:
        started = time.perf_counter()
        result = lipsdp_graph.solve(problem)
        bound = lipsdp_graph.certify(graph.lifted, result["lambdas"]).bound if result["status"] == "optimal" else None
        t_whole = f"{time.perf_counter() - started:.2f}"
        whole = f"{bound:.4g} ({bound / graph.value:.3f})" if bound is not None else str(result["status"])
    started = time.perf_counter()
    module = loaded.module.to(torch.float64)
    low = lower_bound(module, graph, torch.randn(points, *shape, dtype=torch.float64), steps=steps).value
    t_low = time.perf_counter() - started
    print(f"| {name} | {graph.value:.4g} | {graph.eclipse:.4g} ({graph.eclipse / graph.value:.3f}) | "
          f"{sdp:.4g} ({sdp / graph.value:.3f}) | {whole} | {low:.4g} ({low / graph.value:.3f}) | {t_graph:.2f} | "
          f"{t_sdp:.2f} | {t_whole} | {t_low:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", type=int, default=64, help="random inputs the lower bound starts from")
    parser.add_argument("--steps", type=int, default=60, help="ascent steps of the lower bound")
    parser.add_argument("--only", default="", help="run only the nets whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| net | naive | eclipse_fast (/naive) | lipsdp_neuron per piece (/naive) | lipsdp_neuron whole graph (/naive) | "
          "lower (/naive) | graph s | per piece s | whole s | lower s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    nets = [(f"res-mlp {n_in}-{width}x{blocks}", lambda n_in=n_in, width=width, blocks=blocks: ResidualMLP(n_in, width, blocks), (n_in,))
            for n_in, width, blocks in [(16, 32, 2), (16, 32, 4), (16, 64, 4), (32, 100, 3)]]
    nets += [("conv ResNet 1x8x8", SmallResNet, (1, 8, 8)),
             ("conv ResNet 1x8x8, 2 channels, no pool", lambda: SmallResNet(2, pool=False), (1, 8, 8))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, build, shape in nets:
            if args.only in name:
                torch.manual_seed(0)
                run(name, build(), shape, Path(tmp), args.points, args.steps)


if __name__ == "__main__":
    main()
