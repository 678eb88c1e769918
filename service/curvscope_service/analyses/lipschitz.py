"""``lipschitz``: a certified interval [lower, upper] for the ℓ2 Lipschitz constant of the network
(input to output), with every bound that was computed and why any other is missing.

Upper bounds: naive (product of layer norms), ECLipsE-Fast, LipSDP-Neuron and LipSDP-Layer
(solved in subprocesses, certified afterwards, split into sub-networks when too large). A network
that is not a plain chain (residual blocks, max pooling) gets the naive bound over its graph
(``lipschitz.graph_bound``) and the reason the others do not apply. The lower bound needs data.
No data is needed otherwise.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import Aborted, DeadlineExceeded, InvalidInput, ResourceExhausted
from ..lipschitz import lipsdp, lipsdp_graph
from ..lipschitz.eclipse_fast import eclipse_fast
from ..lipschitz.graph_bound import GraphBound, bound_graph
from ..lipschitz.lower import lower_bound
from ..lipschitz.naive import naive_bound
from ..lipschitz.network import Network, extract_network
from ..lipschitz.solver_pool import DEFAULT_MEMORY_LIMIT_MIB, DEFAULT_TIME_LIMIT_S, default_pool
from .base import Analysis, AnalysisContext, EngineLimits

METHODS = ("naive", "eclipse_fast", "lipsdp_neuron", "lipsdp_layer", "lower")
MAX_TIME_LIMIT_S = 3600.0
MAX_MEMORY_LIMIT_MIB = 65536
MIN_MEMORY_LIMIT_MIB = 512
MAX_ASCENT_STEPS = 10_000
DEFAULT_ASCENT_STEPS = 60
# Above this many LMI rows a network is split into sub-networks unless split_size says otherwise.
MAX_WHOLE_ROWS = 1200
# A graph's single matrix inequality (no block-tridiagonal structure, no layer normalisation) is
# much harder for SCS than a chain's of the same size (measured: 176 rows in 3 s, 592 rows over
# 8 minutes), so beyond this it is bounded per chain piece.
MAX_WHOLE_GRAPH_ROWS = 400


def _name(value: Any, prefix: str) -> str:
    return str(value).removeprefix(prefix).lower()


def normalize(spec: dict[str, Any], limits: EngineLimits) -> dict[str, Any]:
    methods = [_name(m, "LIPSCHITZ_METHOD_") for m in spec.get("methods", [])]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidInput(f"unknown Lipschitz method '{unknown[0]}'; choose from {', '.join(METHODS)}")
    solver = _name(spec.get("solver", "SDP_SOLVER_UNSPECIFIED"), "SDP_SOLVER_")
    if solver not in ("unspecified", "0", "cvxopt", "scs"):
        raise InvalidInput(f"unknown SDP solver '{solver}'; choose cvxopt or scs")
    split_size = int(spec.get("split_size", 0))
    if split_size == 1:
        raise InvalidInput("split_size 1 would solve no SDP at all; use 0 (automatic) or at least 2 layers per sub-network")
    time_limit = float(spec.get("time_limit_seconds", 0.0)) or DEFAULT_TIME_LIMIT_S
    if not (0.0 < time_limit <= MAX_TIME_LIMIT_S):
        raise InvalidInput(f"time_limit_seconds {time_limit:g} must lie in (0, {MAX_TIME_LIMIT_S:g}]")
    steps = int(spec.get("ascent_steps", 0)) or DEFAULT_ASCENT_STEPS
    if steps > MAX_ASCENT_STEPS:
        raise InvalidInput(f"ascent_steps {steps} is over the limit of {MAX_ASCENT_STEPS}")
    memory = int(spec.get("memory_limit_mib", 0)) or DEFAULT_MEMORY_LIMIT_MIB
    if not (MIN_MEMORY_LIMIT_MIB <= memory <= MAX_MEMORY_LIMIT_MIB):
        raise InvalidInput(f"memory_limit_mib {memory} must lie in [{MIN_MEMORY_LIMIT_MIB}, {MAX_MEMORY_LIMIT_MIB}]")
    return {
        "methods": list(dict.fromkeys(methods)) or list(METHODS),
        "solver": solver.upper() if solver in ("cvxopt", "scs") else None,
        "split_size": split_size, "time_limit_seconds": time_limit, "ascent_steps": steps, "memory_limit_mib": memory,
    }


def split_points(weights: list, split_size: int, max_rows: int = MAX_WHOLE_ROWS) -> list[tuple[int, int]]:
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


def _lipsdp(
    network: Network, variant: str, spec: dict[str, Any], context: AnalysisContext, reached: dict[str, float],
) -> dict[str, Any]:
    weights = network.weights
    if not all(np.any(w) for w in weights):  # nothing to solve, and the solver's scaling needs norms > 0
        return {"method": f"lipsdp_{variant}", "value": 0.0, "status": "ok", "seconds": 0.0, "solver": "",
                "solver_value": 0.0, "pieces": 0, "note": "a layer of zero weights: the map is constant"}
    pieces = split_points(weights, spec["split_size"])
    started = time.perf_counter()
    bound, raw, solvers = 1.0, 1.0, set()
    for a, b in pieces:
        piece_weights = weights[a:b]
        if b - a == 1:  # a single affine map: its norm is exact
            norm = float(torch.linalg.matrix_norm(torch.from_numpy(piece_weights[0]), ord=2))
            bound, raw = bound * norm, raw * norm
        else:
            acts = network.activations[a:b - 1]
            problem = lipsdp.make_problem(piece_weights, [s.alpha for s in acts], [s.beta for s in acts], variant, spec["solver"])
            what = f"LipSDP-{variant.capitalize()} ({problem['rows']} LMI rows, {problem['solver']})"
            result = _solve(problem, what, spec, context, reached)
            solvers.add(result.get("solver", problem["solver"]))
            detail = {"method": f"lipsdp_{variant}", "seconds": time.perf_counter() - started,
                      "solver": "+".join(sorted(solvers)), "pieces": len(pieces)}
            if result["status"] != "optimal":
                return {**detail, "status": str(result["status"]), "note": f"{what} ended '{result['status']}'; no bound taken from it"}
            certificate = lipsdp.certify(piece_weights, [s.alpha for s in acts], [s.beta for s in acts], result["lambdas"])
            if certificate.bound is None:
                return {**detail, "status": "uncertified", "note": certificate.reason}
            bound *= certificate.bound
            raw *= math.sqrt(max(result["rho"], 0.0))
        if b < len(weights):
            between = network.activations[b - 1].lipschitz
            bound, raw = bound * between, raw * between
    detail = {"method": f"lipsdp_{variant}", "value": bound, "status": "ok", "seconds": time.perf_counter() - started,
              "solver": "+".join(sorted(solvers)), "solver_value": raw, "pieces": len(pieces)}
    if len(pieces) > 1:
        detail["note"] = f"product of {len(pieces)} sub-networks' bounds (network splitting): looser than one solve"
    return detail


def _solve(problem: dict[str, Any], what: str, spec: dict[str, Any], context: AnalysisContext,
           reached: dict[str, float]) -> dict[str, Any]:
    """One solve in the solver pool; over a cap, the error says which bounds were reached before it."""
    try:
        return default_pool().solve(problem, time_limit_s=spec["time_limit_seconds"],
                                    memory_limit_mib=spec["memory_limit_mib"], check=context.check, what=what)
    except (Aborted, DeadlineExceeded, ResourceExhausted) as error:
        so_far = ", ".join(f"{k} {v:.6g}" for k, v in reached.items()) or "nothing"
        raise type(error)(f"{error}; bounds reached before it: {so_far}") from None


def _lipsdp_whole_graph(
    graph: GraphBound, variant: str, spec: dict[str, Any], context: AnalysisContext, reached: dict[str, float], reason: str,
) -> tuple[dict[str, Any] | None, str]:
    """LipSDP over the whole graph in one matrix inequality (``lipsdp_graph``), certified; or None
    and why not (then the caller bounds it per chain piece)."""
    lifted = graph.lifted
    if lifted is None:
        return None, ""
    started = time.perf_counter()
    problem = lipsdp_graph.make_problem(lifted, variant, spec["solver"])
    rows = problem["rows"]
    if rows > MAX_WHOLE_GRAPH_ROWS:
        return None, f"the whole graph's LMI would have {rows} rows (over {MAX_WHOLE_GRAPH_ROWS})"
    what = f"LipSDP-{variant.capitalize()} over the whole graph ({rows} LMI rows, {problem['solver']})"
    result = _solve(problem, what, spec, context, reached)
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


@dataclass
class _Chain:
    """A chain piece of a residual graph, as ``_lipsdp`` reads a network."""

    weights: list
    activations: list


def _lipsdp_graph(
    graph: GraphBound, variant: str, spec: dict[str, Any], context: AnalysisContext, reached: dict[str, float], reason: str,
) -> dict[str, Any]:
    """LipSDP over the whole graph when it is made of affine maps, joins and activations only;
    else (or if that gives no certified bound) on every chain piece (each certified), combined by
    the naive bound's rules; a piece whose solve ends without a certified bound keeps its product
    of norms, and says so."""
    whole, why_not = _lipsdp_whole_graph(graph, variant, spec, context, reached, reason)
    if whole is not None:
        return whole
    started = time.perf_counter()
    values: dict[tuple[str, str], float] = {}
    solvers: set[str] = set()
    fallbacks = []
    for key, weights, slopes in graph.pieces:
        detail = _lipsdp(_Chain(weights, slopes), variant, spec, context, reached)  # type: ignore[arg-type]
        if detail.get("value") is not None:
            values[key] = detail["value"]
            solvers.update(x for x in detail.get("solver", "").split("+") if x)
        else:
            fallbacks.append(f"{key[0]}->{key[1]}: {detail.get('note') or detail.get('status')}")
    assert graph.combine is not None
    value = graph.combine(lambda key, weights, slopes: values.get(key))
    note = (f"not a plain chain ({reason}): LipSDP-{variant.capitalize()} on each of the {len(graph.pieces)} chain pieces with "
            "activations between the joins and pools, each certified, combined by the naive bound's rules "
            "(a residual block as ‖skip‖ + L(block), max pooling as √N)")
    if fallbacks:
        note += "; pieces bounded by their norms instead (no certified bound): " + "; ".join(fallbacks)
    if why_not:
        note += f"; not solved as one matrix inequality: {why_not}"
    return {"method": f"lipsdp_{variant}", "value": value, "status": "ok", "seconds": time.perf_counter() - started,
            "solver": "+".join(sorted(solvers)), "pieces": len(graph.pieces), "note": note}


def run(context: AnalysisContext, spec: dict[str, Any]) -> dict[str, Any]:
    methods = spec["methods"]
    extraction = extract_network(context.model)
    network = extraction.network
    graph: GraphBound | None = None
    if network is None and context.model.input_shape is not None and (
            "naive" in methods or ("lower" in methods and context.data is not None)):
        graph = bound_graph(context.model.module, tuple(context.model.input_shape), check=context.check)
    bounded = graph is not None and graph.value is not None
    details: list[dict[str, Any]] = []
    reached: dict[str, float] = {}
    total = len(methods)

    def record(detail: dict[str, Any]) -> None:
        details.append(detail)
        if detail.get("value") is not None:
            reached[detail["method"]] = detail["value"]
        context.progress("lipschitz", len(details), total, min((v for k, v in reached.items() if k != "lower"), default=0.0))

    for method in [m for m in methods if m != "lower"]:
        if context.check:
            context.check()
        started = time.perf_counter()
        if network is None:
            if method == "naive" and bounded:
                note = f"not a plain chain ({extraction.reason}); the product of layer norms over the graph: {graph.describe()}"
                if not graph.exact:
                    note += "; a layer too large to unroll: its norm is a converged power-iteration estimate"
                record({"method": method, "value": graph.value, "status": "ok", "seconds": time.perf_counter() - started,
                        "note": note})
            elif method == "naive":
                why = f"; no upper bound is known for the graph: {graph.reason}" if graph is not None and graph.reason != extraction.reason else ""
                record({"method": method, "status": "not_applicable", "seconds": 0.0, "note": extraction.reason + why})
            elif method.startswith("lipsdp_") and bounded and graph.pieces and graph.exact:
                record(_lipsdp_graph(graph, method.removeprefix("lipsdp_"), spec, context, reached, extraction.reason))
            elif method == "eclipse_fast" and bounded and graph.eclipse is not None and graph.eclipse_pieces:
                record({"method": method, "value": graph.eclipse, "status": "ok", "seconds": time.perf_counter() - started,
                        "note": f"not a plain chain ({extraction.reason}): ECLipsE-Fast on each of the {graph.eclipse_pieces} "
                                "chain pieces with activations between the joins and pools, combined by the naive bound's "
                                "rules (a residual block as ‖skip‖ + L(block), max pooling as √N)"})
            else:
                note = f"needs a plain chain of affine layers and slope-restricted activations: {extraction.reason}"
                if bounded:
                    note += "; the naive bound covers the network"
                    if method != "naive":
                        note += (" (no chain piece between its joins and pools could use it: none has an activation"
                                 + (", or a negative slope" if method == "eclipse_fast" else "") + ", or a layer is too large to unroll)")
                record({"method": method, "status": "not_applicable", "seconds": 0.0, "note": note})
            continue
        if method == "naive":
            naive = naive_bound(network, seed=context.seed)
            note = "" if naive.exact else "a layer too large to unroll: its norm is a converged power-iteration estimate"
            record({"method": method, "value": naive.value, "status": "ok", "seconds": time.perf_counter() - started, "note": note})
        elif not network.dense:
            record({"method": method, "status": "not_applicable", "seconds": 0.0,
                    "note": "a layer is too large to unroll to a matrix; only the naive bound applies"})
        elif method == "eclipse_fast":
            if any(a.alpha < 0 for a in network.activations):
                record({"method": method, "status": "not_applicable", "seconds": 0.0,
                        "note": "an activation has a negative slope; ECLipsE-Fast needs slopes in [0, β]"})
            else:
                value = eclipse_fast(network.weights, network.activations)
                record({"method": method, "value": value, "status": "ok", "seconds": time.perf_counter() - started})
        elif not network.activations:
            record({"method": method, "status": "not_applicable", "seconds": 0.0,
                    "note": "the network is one affine map: the naive bound is its exact constant"})
        else:
            record(_lipsdp(network, method.removeprefix("lipsdp_"), spec, context, reached))

    lower = 0.0
    if "lower" in methods:
        if context.data is None:
            record({"method": "lower", "status": "not_applicable", "seconds": 0.0, "note": "the lower bound needs data (--data)"})
        else:
            started = time.perf_counter()
            module = copy.deepcopy(context.model.module).to(device="cpu", dtype=torch.float64)
            try:
                # the ascent runs on the chain, or on the graph with its ReLUs smoothed; with neither, the data alone
                ascent = network if network is not None else graph if graph is not None and graph.forward_fn is not None else None
                result = lower_bound(module, ascent, context.data.inputs.to("cpu", torch.float64),
                                     steps=spec["ascent_steps"], seed=context.seed, check=context.check)
            except ValueError as error:
                record({"method": "lower", "status": "not_applicable", "seconds": 0.0, "note": str(error)})
            else:
                lower = result.value
                record({"method": "lower", "value": lower, "status": "ok", "seconds": time.perf_counter() - started,
                        "note": f"data alone {result.from_data:.6g}; {result.ascent_steps} ascent steps"})

    uppers = {d["method"]: d["value"] for d in details if d.get("value") is not None and d["method"] != "lower"}
    method = min(uppers, key=uppers.get) if uppers else ""
    upper = uppers[method] if uppers else math.inf
    note = "" if network is not None else f"not a LipSDP chain: {extraction.reason}"
    if bounded and "naive" in uppers:
        note += "; upper bounds over the graph (residual adds as the sum of their paths, max pooling as √N)"
    elif graph is not None and graph.reason and graph.reason != extraction.reason:
        note += f"; no sound upper bound: {graph.reason}"
    if not uppers and lower == 0.0:
        why = graph.reason if graph is not None and not bounded and graph.reason else extraction.reason
        raise InvalidInput(f"no Lipschitz bound applies to this network ({why}); pass data for a lower bound")
    return {
        # no sound upper bound: infinite, in the proto JSON spelling (a 0 could pass a gate)
        "lower": lower, "upper": upper if uppers else "Infinity", "method": method,
        "bounds": {d["method"]: d["value"] for d in details if d.get("value") is not None},
        # a constant map (upper 0) has a closed interval; no upper bound at all, an open one
        "relative_gap": ((upper - lower) / upper if upper > 0 else 0.0) if uppers else 1.0,
        "note": note, "details": details,
        "chain": {"found": network is not None, "reason": extraction.reason},
    }


ANALYSIS = Analysis(name="lipschitz", normalize=normalize, run=run, needs_data=False, per_layer=False)
