"""LipSDP bounds of a whole network: a chain split into sub-networks small enough to solve (each
solved in the solver pool and certified, their bounds multiplied), and a graph that is not a chain
solved as one matrix inequality, or else per chain piece combined by the naive bound's rules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import Aborted, DeadlineExceeded, ResourceExhausted
from . import lipsdp, lipsdp_graph
from .graph_bound import COMBINED_BY_THE_NAIVE_RULES, GraphBound
from .network import Slope
from .solver_pool import default_pool

# Above this many LMI rows a network is split into sub-networks unless split_size says otherwise.
MAX_WHOLE_ROWS = 1200
# A graph's single matrix inequality (no block-tridiagonal structure, no layer normalisation) is
# much harder for SCS than a chain's of the same size (measured: 176 rows in 3 s, 592 rows over
# 8 minutes), so beyond this it is bounded per chain piece.
MAX_WHOLE_GRAPH_ROWS = 400


@dataclass
class Solves:
    """How LipSDP problems are solved: by ``solver`` ("CVXOPT", "SCS"; None: by size), a chain in
    pieces of ``split_size`` weight layers (0: automatic), each in the solver pool under the caps.
    ``reached`` holds the bounds reached so far, which an error over a cap names."""

    solver: str | None
    split_size: int
    time_limit_s: float
    memory_limit_mib: int
    check: Callable[[], None] | None = None
    reached: dict[str, float] = field(default_factory=dict)

    def solve(self, problem: dict[str, Any], what: str) -> dict[str, Any]:
        """One solve in the solver pool; over a cap, the error says which bounds were reached before it."""
        try:
            return default_pool().solve(problem, time_limit_s=self.time_limit_s, memory_limit_mib=self.memory_limit_mib,
                                        check=self.check, what=what)
        except (Aborted, DeadlineExceeded, ResourceExhausted) as error:
            so_far = ", ".join(f"{k} {v:.6g}" for k, v in self.reached.items()) or "nothing"
            raise type(error)(f"{error}; bounds reached before it: {so_far}") from None


def split_points(weights: list[np.ndarray], split_size: int, max_rows: int = MAX_WHOLE_ROWS) -> list[tuple[int, int]]:
    """Ranges [a, b) of weight indices per sub-network: ``split_size`` layers each, or (0) as few
    pieces as keep every piece's LMI within ``max_rows``."""
    n = len(weights)
    if split_size:
        return [(a, min(n, a + split_size)) for a in range(0, n, split_size)]
    pieces, start = [], 0
    for end in range(start + 2, n + 1):
        if end - start > 2 and lipsdp.lmi_rows(weights[start:end]) > max_rows:
            pieces.append((start, end - 1))
            start = end - 1
    pieces.append((start, n))
    return pieces


def chain_lipsdp(weights: list[np.ndarray], activations: list[Slope], variant: str, solves: Solves) -> dict[str, Any]:
    """LipSDP-``variant`` ("neuron", "layer") of the chain W_0, φ_1, …, W_L, split into sub-networks
    (``split_points``), each certified; the report's detail of the method, with or without a bound."""
    method = f"lipsdp_{variant}"
    if not all(np.any(w) for w in weights):  # nothing to solve, and the solver's scaling needs norms > 0
        return {"method": method, "value": 0.0, "status": "ok", "seconds": 0.0, "solver": "",
                "solver_value": 0.0, "pieces": 0, "note": "a layer of zero weights: the map is constant"}
    pieces = split_points(weights, solves.split_size)
    started = time.perf_counter()
    bound, raw, solvers = 1.0, 1.0, set()
    for a, b in pieces:
        piece_weights = weights[a:b]
        if b - a == 1:  # a single affine map: its norm is exact
            norm = float(torch.linalg.matrix_norm(torch.from_numpy(piece_weights[0]), ord=2))
            bound, raw = bound * norm, raw * norm
        else:
            alphas, betas = [s.alpha for s in activations[a:b - 1]], [s.beta for s in activations[a:b - 1]]
            problem = lipsdp.make_problem(piece_weights, alphas, betas, variant, solves.solver)
            what = f"LipSDP-{variant.capitalize()} ({problem['rows']} LMI rows, {problem['solver']})"
            result = solves.solve(problem, what)
            solvers.add(result.get("solver", problem["solver"]))
            detail = {"method": method, "seconds": time.perf_counter() - started,
                      "solver": "+".join(sorted(solvers)), "pieces": len(pieces)}
            if result["status"] != "optimal":
                return {**detail, "status": str(result["status"]), "note": f"{what} ended '{result['status']}'; no bound taken from it"}
            certificate = lipsdp.certify(piece_weights, alphas, betas, result["lambdas"])
            if certificate.bound is None:
                return {**detail, "status": "uncertified", "note": certificate.reason}
            bound *= certificate.bound
            raw *= math.sqrt(max(result["rho"], 0.0))
        if b < len(weights):
            between = activations[b - 1].lipschitz
            bound, raw = bound * between, raw * between
    detail = {"method": method, "value": bound, "status": "ok", "seconds": time.perf_counter() - started,
              "solver": "+".join(sorted(solvers)), "solver_value": raw, "pieces": len(pieces)}
    if len(pieces) > 1:
        detail["note"] = f"product of {len(pieces)} sub-networks' bounds (network splitting): looser than one solve"
    return detail


def graph_lipsdp(graph: GraphBound, variant: str, solves: Solves, reason: str) -> dict[str, Any]:
    """LipSDP-``variant`` of a graph that is not a chain (``reason`` says why): over the whole graph
    when it is made of affine maps, joins and activations only; else (or if that gives no certified
    bound) on every chain piece (each certified), combined by the naive bound's rules; a piece whose
    solve ends without a certified bound keeps its product of norms, and says so."""
    whole, why_not = _whole_graph_lipsdp(graph, variant, solves, reason)
    if whole is not None:
        return whole
    started = time.perf_counter()
    values: dict[tuple[str, str], float] = {}
    solvers: set[str] = set()
    fallbacks = []
    for key, weights, slopes in graph.pieces:
        detail = chain_lipsdp(weights, slopes, variant, solves)
        if detail.get("value") is not None:
            values[key] = detail["value"]
            solvers.update(x for x in detail.get("solver", "").split("+") if x)
        else:
            fallbacks.append(f"{key[0]}->{key[1]}: {detail.get('note') or detail.get('status')}")
    assert graph.combine is not None
    value = graph.combine(lambda key, weights, slopes: values.get(key))
    note = (f"not a plain chain ({reason}): LipSDP-{variant.capitalize()} on each of the {len(graph.pieces)} chain pieces with "
            f"activations between the joins and pools, each certified, {COMBINED_BY_THE_NAIVE_RULES}")
    if fallbacks:
        note += "; pieces bounded by their norms instead (no certified bound): " + "; ".join(fallbacks)
    if why_not:
        note += f"; not solved as one matrix inequality: {why_not}"
    return {"method": f"lipsdp_{variant}", "value": value, "status": "ok", "seconds": time.perf_counter() - started,
            "solver": "+".join(sorted(solvers)), "pieces": len(graph.pieces), "note": note}


def _whole_graph_lipsdp(graph: GraphBound, variant: str, solves: Solves, reason: str) -> tuple[dict[str, Any] | None, str]:
    """LipSDP over the whole graph in one matrix inequality (``lipsdp_graph``), certified; or None
    and why not (then the caller bounds it per chain piece)."""
    lifted = graph.lifted
    if lifted is None:
        return None, ""
    started = time.perf_counter()
    problem = lipsdp_graph.make_problem(lifted, variant, solves.solver)
    rows = problem["rows"]
    if rows > MAX_WHOLE_GRAPH_ROWS:
        return None, f"the whole graph's LMI would have {rows} rows (over {MAX_WHOLE_GRAPH_ROWS})"
    what = f"LipSDP-{variant.capitalize()} over the whole graph ({rows} LMI rows, {problem['solver']})"
    result = solves.solve(problem, what)
    if result["status"] != "optimal":
        return None, f"{what} ended '{result['status']}'"
    certificate = lipsdp_graph.certify(lifted, result["lambdas"])
    if certificate.bound is None:
        return None, f"{what}: {certificate.reason}"
    note = (f"not a plain chain ({reason}): {what}, every neuron's constraint and the skips and joins inside one "
            "matrix inequality, certified")
    return {"method": f"lipsdp_{variant}", "value": certificate.bound, "status": "ok",
            "seconds": time.perf_counter() - started, "solver": result.get("solver", problem["solver"]),
            "solver_value": math.sqrt(max(result["rho"], 0.0)), "pieces": 1, "note": note}, ""
