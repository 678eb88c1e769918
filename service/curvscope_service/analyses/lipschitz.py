"""``lipschitz``: a certified interval [lower, upper] for the ℓ2 Lipschitz constant of the network
(input to output), with every bound that was computed and why any other is missing.

The methods (naive, ECLipsE-Fast, LipSDP-Neuron and -Layer, the lower bound) and how each bounds a
chain or a graph are in ``lipschitz.interval``; here the options are checked and the interval asked
for. The lower bound needs data; nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import InvalidInput
from ..lipschitz.interval import METHODS, bound_interval
from ..lipschitz.lipsdp_bound import Solves
from ..lipschitz.solver_pool import DEFAULT_MEMORY_LIMIT_MIB, DEFAULT_TIME_LIMIT_S
from .base import Analysis, AnalysisContext, EngineLimits

MAX_TIME_LIMIT_S = 3600.0
MAX_MEMORY_LIMIT_MIB = 65536
MIN_MEMORY_LIMIT_MIB = 512
MAX_ASCENT_STEPS = 10_000
DEFAULT_ASCENT_STEPS = 60


LipschitzMethod = StrEnum("LipschitzMethod", [(name.upper(), name) for name in METHODS])


class SdpSolver(StrEnum):
    """The solver cvxpy is asked for (its name as cvxpy spells it)."""

    CVXOPT = "CVXOPT"
    SCS = "SCS"


@dataclass(frozen=True)
class LipschitzSpec:
    """The request's options; empty, zeros and None ask for the defaults (every method, the
    solver chosen per problem)."""

    methods: tuple[LipschitzMethod, ...] = ()
    solver: SdpSolver | None = None
    split_size: int = 0
    time_limit_seconds: float = 0.0
    ascent_steps: int = 0
    memory_limit_mib: int = 0


def normalize(spec: LipschitzSpec, limits: EngineLimits) -> LipschitzSpec:
    split_size = spec.split_size
    if split_size == 1:
        raise InvalidInput("split_size 1 would solve no SDP at all; use 0 (automatic) or at least 2 layers per sub-network")
    time_limit = spec.time_limit_seconds or DEFAULT_TIME_LIMIT_S
    if not (0.0 < time_limit <= MAX_TIME_LIMIT_S):
        raise InvalidInput(f"time_limit_seconds {time_limit:g} must lie in (0, {MAX_TIME_LIMIT_S:g}]")
    steps = spec.ascent_steps or DEFAULT_ASCENT_STEPS
    if steps > MAX_ASCENT_STEPS:
        raise InvalidInput(f"ascent_steps {steps} is over the limit of {MAX_ASCENT_STEPS}")
    memory = spec.memory_limit_mib or DEFAULT_MEMORY_LIMIT_MIB
    if not (MIN_MEMORY_LIMIT_MIB <= memory <= MAX_MEMORY_LIMIT_MIB):
        raise InvalidInput(f"memory_limit_mib {memory} must lie in [{MIN_MEMORY_LIMIT_MIB}, {MAX_MEMORY_LIMIT_MIB}]")
    return LipschitzSpec(
        methods=tuple(dict.fromkeys(spec.methods)) or tuple(LipschitzMethod), solver=spec.solver,
        split_size=split_size, time_limit_seconds=time_limit, ascent_steps=steps, memory_limit_mib=memory,
    )


def run(context: AnalysisContext, spec: LipschitzSpec) -> dict[str, Any]:
    inputs = context.model.inputs
    if len(inputs) != 1 or inputs[0].dtype is not None:
        taken = ", ".join(f"{i.name} ({'floating' if i.dtype is None else str(i.dtype).removeprefix('torch.')})"
                          for i in inputs)
        raise InvalidInput(
            f"lipschitz bounds a network in its one floating input, but this model takes {taken}: token ids have no "
            "Lipschitz constant; export the model from its input embeddings (inputs_embeds) to bound it")
    solves = Solves(spec.solver, spec.split_size, spec.time_limit_seconds, spec.memory_limit_mib, check=context.check)
    return bound_interval(context.model, context.data.inputs[0] if context.data is not None else None, spec.methods, solves,
                          ascent_steps=spec.ascent_steps, seed=context.seed, check=context.check,
                          progress=lambda step, total, estimate: context.progress("lipschitz", step, total, estimate))


ANALYSIS = Analysis(name="lipschitz", spec=LipschitzSpec, normalize=normalize, run=run, needs_data=False, per_layer=False)
