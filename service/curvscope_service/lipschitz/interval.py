"""The certified interval [lower, upper] of a network's ℓ2 Lipschitz constant (input to output),
with every bound that was computed and why any other is missing.

``METHODS`` maps each method's name (the API's ``LipschitzMethod`` without its prefix, lowercased)
to its bound: naive (product of layer norms), ECLipsE-Fast, LipSDP-Neuron and LipSDP-Layer (solved
in subprocesses, certified afterwards, split into sub-networks when too large) bound from above,
``lower`` (gradient ascent on the data) from below. Each bounds a plain chain (``network``) or, for
a network that is not one (residual blocks, max pooling), its graph (``graph_bound``), or says why
it does not apply. A method is added by writing its bound function and listing it in ``METHODS``.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import InvalidInput
from ..loading import LoadedModel
from .eclipse_fast import eclipse_fast
from .graph_bound import COMBINED_BY_THE_NAIVE_RULES, GraphBound, bound_graph
from .lipsdp_bound import Solves, chain_lipsdp, graph_lipsdp
from .lower import lower_bound
from .naive import naive_bound
from .network import Extraction, Network, extract_network

ESTIMATED_NORM = "a layer too large to unroll: its norm is a converged power-iteration estimate"


@dataclass
class Subject:
    """What a bound reads: the model, its chain (or why it is none), its graph's naive bound when a
    method asked for it, the data (for the lower bound) and how LipSDP problems are solved."""

    model: LoadedModel
    extraction: Extraction
    graph: GraphBound | None
    inputs: torch.Tensor | None
    solves: Solves
    ascent_steps: int
    seed: int
    check: Callable[[], None] | None

    @property
    def network(self) -> Network | None:
        return self.extraction.network

    @property
    def bounded(self) -> bool:
        """Whether the graph of a network that is not a chain has a naive bound."""
        return self.graph is not None and self.graph.value is not None


@dataclass(frozen=True)
class Method:
    """A Lipschitz method: its bound (the report's detail, with a value or the reason for none)."""

    bound: Callable[[Subject], dict[str, Any]]
    upper: bool = True  # an upper bound; the others (the lower bound) run after all of them
    walks_graph: bool = False  # asks for the graph's naive bound when the network is not a chain
    needs_data: bool = False


def bound_interval(model: LoadedModel, inputs: torch.Tensor | None, methods: list[str], solves: Solves, *,
                   ascent_steps: int, seed: int, check: Callable[[], None] | None = None,
                   progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """The interval by ``methods`` (names in ``METHODS``); ``progress`` gets (methods done, methods,
    best upper bound so far) after each. InvalidInput when no method gives any bound."""
    extraction = extract_network(model)
    graph = None
    if extraction.network is None and model.input_shape is not None and any(
            METHODS[m].walks_graph and (inputs is not None or not METHODS[m].needs_data) for m in methods):
        graph = bound_graph(model.module, tuple(model.input_shape), check=check)
    subject = Subject(model, extraction, graph, inputs, solves, ascent_steps, seed, check)
    details: list[dict[str, Any]] = []
    for name in sorted(methods, key=lambda m: not METHODS[m].upper):  # stable: the requested order otherwise
        if check:
            check()
        started = time.perf_counter()
        method = METHODS[name]
        if method.needs_data and inputs is None:
            detail = _not_applicable(name, f"the {name} bound needs data (--data)")
        else:
            detail = method.bound(subject)
        detail.setdefault("seconds", time.perf_counter() - started if detail["status"] == "ok" else 0.0)
        details.append(detail)
        if detail.get("value") is not None:
            solves.reached[name] = detail["value"]
        if progress:
            progress(len(details), len(methods), min((v for k, v in solves.reached.items() if METHODS[k].upper), default=0.0))
    return _interval(subject, details)


def _interval(subject: Subject, details: list[dict[str, Any]]) -> dict[str, Any]:
    graph, reason = subject.graph, subject.extraction.reason
    bounds = {d["method"]: d["value"] for d in details if d.get("value") is not None}
    uppers = {name: value for name, value in bounds.items() if METHODS[name].upper}
    lower = max((value for name, value in bounds.items() if not METHODS[name].upper), default=0.0)
    method = min(uppers, key=uppers.__getitem__) if uppers else ""
    upper = uppers[method] if uppers else math.inf
    note = "" if subject.network is not None else f"not a LipSDP chain: {reason}"
    if subject.bounded and "naive" in uppers:
        note += "; upper bounds over the graph (residual adds as the sum of their paths, max pooling as √N)"
    elif graph is not None and graph.reason and graph.reason != reason:
        note += f"; no sound upper bound: {graph.reason}"
    if not uppers and lower == 0.0:
        why = graph.reason if graph is not None and not subject.bounded and graph.reason else reason
        raise InvalidInput(f"no Lipschitz bound applies to this network ({why}); pass data for a lower bound")
    return {
        # no sound upper bound: infinite (a 0 could pass a gate)
        "lower": lower, "upper": upper, "method": method, "bounds": bounds,
        # a constant map (upper 0) has a closed interval; no upper bound at all, an open one
        "relative_gap": ((upper - lower) / upper if upper > 0 else 0.0) if uppers else 1.0,
        "note": note, "details": details,
        "chain": {"found": subject.network is not None, "reason": reason},
    }


def _ok(method: str, value: float, note: str = "") -> dict[str, Any]:
    return {"method": method, "value": value, "status": "ok", "note": note}


def _not_applicable(method: str, note: str) -> dict[str, Any]:
    return {"method": method, "status": "not_applicable", "note": note}


def _needs_chain(subject: Subject, method: str, or_else: str = "") -> dict[str, Any]:
    """A method of chains on a network that is not one, and none of whose chain pieces it could bound."""
    note = f"needs a plain chain of affine layers and slope-restricted activations: {subject.extraction.reason}"
    if subject.bounded:
        note += ("; the naive bound covers the network (no chain piece between its joins and pools could use it: "
                 f"none has an activation{or_else}, or a layer is too large to unroll)")
    return _not_applicable(method, note)


def _naive(subject: Subject) -> dict[str, Any]:
    network, graph, reason = subject.network, subject.graph, subject.extraction.reason
    if network is not None:
        naive = naive_bound(network, seed=subject.seed)
        return _ok("naive", naive.value, "" if naive.exact else ESTIMATED_NORM)
    if subject.bounded:
        assert graph is not None and graph.value is not None
        note = f"not a plain chain ({reason}); the product of layer norms over the graph: {graph.describe()}"
        return _ok("naive", graph.value, note if graph.exact else f"{note}; {ESTIMATED_NORM}")
    why = f"; no upper bound is known for the graph: {graph.reason}" if graph is not None and graph.reason != reason else ""
    return _not_applicable("naive", reason + why)


def _eclipse_fast(subject: Subject) -> dict[str, Any]:
    network, graph = subject.network, subject.graph
    if network is None:
        if subject.bounded and graph is not None and graph.eclipse is not None and graph.eclipse_pieces:
            return _ok("eclipse_fast", graph.eclipse,
                       f"not a plain chain ({subject.extraction.reason}): ECLipsE-Fast on each of the {graph.eclipse_pieces} "
                       f"chain pieces with activations between the joins and pools, {COMBINED_BY_THE_NAIVE_RULES}")
        return _needs_chain(subject, "eclipse_fast", ", or a negative slope")
    if not network.dense:
        return _not_applicable("eclipse_fast", "a layer is too large to unroll to a matrix; only the naive bound applies")
    if any(a.alpha < 0 for a in network.activations):
        return _not_applicable("eclipse_fast", "an activation has a negative slope; ECLipsE-Fast needs slopes in [0, β]")
    return _ok("eclipse_fast", eclipse_fast(network.weights, network.activations))


def _lipsdp(subject: Subject, variant: str) -> dict[str, Any]:
    network, graph, method = subject.network, subject.graph, f"lipsdp_{variant}"
    if network is None:
        if subject.bounded and graph is not None and graph.pieces and graph.exact:
            return graph_lipsdp(graph, variant, subject.solves, subject.extraction.reason)
        return _needs_chain(subject, method)
    if not network.dense:
        return _not_applicable(method, "a layer is too large to unroll to a matrix; only the naive bound applies")
    if not network.activations:
        return _not_applicable(method, "the network is one affine map: the naive bound is its exact constant")
    return chain_lipsdp(network.weights, network.activations, variant, subject.solves)


def _lower(subject: Subject) -> dict[str, Any]:
    assert subject.inputs is not None
    module = copy.deepcopy(subject.model.module).to(device="cpu", dtype=torch.float64)
    # the ascent runs on the chain, or on the graph with its ReLUs smoothed; with neither, the data alone
    graph = subject.graph if subject.graph is not None and subject.graph.forward_fn is not None else None
    try:
        result = lower_bound(module, subject.network if subject.network is not None else graph,
                             subject.inputs.to("cpu", torch.float64), steps=subject.ascent_steps, seed=subject.seed,
                             check=subject.check)
    except ValueError as error:
        return _not_applicable("lower", str(error))
    return _ok("lower", result.value, f"data alone {result.from_data:.6g}; {result.ascent_steps} ascent steps")


METHODS: dict[str, Method] = {
    "naive": Method(_naive, walks_graph=True),
    "eclipse_fast": Method(_eclipse_fast),
    "lipsdp_neuron": Method(functools.partial(_lipsdp, variant="neuron")),
    "lipsdp_layer": Method(functools.partial(_lipsdp, variant="layer")),
    "lower": Method(_lower, upper=False, walks_graph=True, needs_data=True),
}
