"""What an analysis is to the engine: a report key, its option defaults and checks, and a run
function over an ``AnalysisContext``. Each analysis lives in its own module of this package and
is listed in ``ANALYSES`` (``__init__.py``); the engine and GetCapabilities read that list, so
an analysis that is not listed answers UNIMPLEMENTED and is not advertised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..curvature.operators.base import CurvatureOperator
from ..curvature.operators.curvatures import CURVATURES, OperatorRequest
from ..curvature.solvers.lanczos import RitzPairs
from ..loading import LoadedData, LoadedModel
from ..losses import bind_loss

ProgressFn = Callable[[dict], None]
CheckFn = Callable[[], None]


@dataclass(frozen=True)
class EngineLimits:
    """Server-side defaults and caps applied to every request."""

    micro_batch_size: int = 256
    max_products: int = 2000
    retain_max_samples: int = 4096
    # Ceiling of the memory plan in bytes (0 = the device's or the machine's free memory).
    memory_budget_bytes: int = 0


@dataclass
class AnalysisContext:
    """Everything an analysis may use; ``block``/``param_names`` restrict it to one layer."""

    model: LoadedModel
    data: LoadedData | None
    loss: str
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    curvature: str
    seed: int
    device: str
    limits: EngineLimits
    micro_batch_size: int
    progress_sink: ProgressFn | None = None
    check: CheckFn | None = None
    block: str = ""
    task: str = ""
    param_names: list[str] | None = None
    # Results of analyses that ran earlier in the same request (whole model only), so that
    # one can reuse another's work (e.g. sharpness reads hessian_eigen's largest eigenvalue).
    earlier: dict[str, Any] = field(default_factory=dict)
    # The Ritz pairs of this context's operator from a hessian_eigen run earlier in the request
    # (whole model or this block), which hessian_trace deflates; not part of any report.
    ritz: RitzPairs | None = None
    # The memory plan's choices for each analysis of this context (memory_plan.py), e.g.
    # {"hessian_trace": {"block_size": 4}}; an analysis without an entry uses its defaults.
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    _operators: dict[tuple[str, ...] | None, CurvatureOperator] = field(default_factory=dict)

    def operator(self) -> CurvatureOperator:
        """The operator of this context's curvature (a name of ``CURVATURES``) over its
        parameters, built once and shared."""
        key = tuple(self.param_names) if self.param_names is not None else None
        if key not in self._operators:
            if self.data is None or self.loss_fn is None:
                raise AssertionError("an analysis that needs data was run without it")
            self._operators[key] = CURVATURES[self.curvature](OperatorRequest(
                module=self.model.module, inputs=self.data.inputs, targets=self.data.targets, loss_fn=self.loss_fn,
                loss=self.loss, seed=self.seed, param_names=self.param_names, micro_batch_size=self.micro_batch_size,
                retain_max_samples=self.limits.retain_max_samples, check=self.check))
        return self._operators[key]

    def plan(self, analysis: str) -> dict[str, Any]:
        """The memory plan's choices for ``analysis`` here ({} = its defaults)."""
        return self.plans.get(analysis, {})

    def for_block(self, block: str, param_names: list[str]) -> "AnalysisContext":
        """The same context restricted to one parameter block (operators are not shared)."""
        return AnalysisContext(
            model=self.model, data=self.data, loss=self.loss, loss_fn=self.loss_fn, curvature=self.curvature,
            seed=self.seed, device=self.device, limits=self.limits, micro_batch_size=self.micro_batch_size,
            progress_sink=self.progress_sink, check=self.check, block=block, task=self.task,
            param_names=list(param_names),
        )

    def loss_for(self, targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loss with its normaliser fixed over a subset's ``targets`` (``losses.bind_loss``)."""
        return bind_loss(self.loss, targets, self.task)

    def progress(self, analysis: str, step: int, total: int, estimate: float) -> None:
        if self.progress_sink is not None:
            self.progress_sink({"analysis": analysis, "step": step, "total": total,
                                "current_estimate": float(estimate), "block": self.block})


@dataclass(frozen=True)
class Analysis:
    """One entry of the report's ``results``."""

    name: str
    # The options' dataclass (fields named as the API's spec message; zeros and None ask for the
    # defaults), which ``requests`` decodes the wire into.
    spec: type
    # spec -> the options with defaults filled in; raises InvalidInput for values out of range.
    # Runs once, before the job is queued.
    normalize: Callable[[Any, EngineLimits], Any]
    run: Callable[[AnalysisContext, Any], dict[str, Any]]
    needs_data: bool = True
    # Whether --per-layer also runs it on each parameter block.
    per_layer: bool = True
    curvatures: tuple[str, ...] = ("hessian",)
