"""The engine's one entry point: a checkpoint and a batch in, a report (plain dict) out.

The servicer and the CLI's ``--local`` mode both call ``run_analysis``; nothing here knows of
gRPC. The report follows the JSON schema ``curvscope.report/v1``. The analyses themselves are
listed in ``curvscope_service.analyses``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, memory_plan, metrics
from .analyses import ANALYSES, AnalysisContext, EngineLimits, hessian_eigen
from .analyses.base import CheckFn, ProgressFn
from .memory_plan import AnalysisPlan, PeakMeter
from .errors import CurvscopeError, ResourceExhausted, Unimplemented
from .loading.messages import one_line
from .loading import LoadedData, LoadedModel, describe_model, load_data, load_model, validate_pair
from .loading.checkpoint import available_formats
from .losses import LOSSES, bind_loss
from .requests import PRECISIONS, AnalysisJob, ValidatedJob, validate_job

REPORT_SCHEMA = "curvscope.report/v1"
IMPLEMENTED_ANALYSES = tuple(ANALYSES)
IMPLEMENTED_CURVATURES = tuple(sorted({c for analysis in ANALYSES.values() for c in analysis.curvatures}))
MODEL_FORMATS = available_formats()

__all__ = ["AnalysisJob", "EngineLimits", "ServerLimits", "ValidatedJob", "describe", "run_analysis", "validate_job"]


@dataclass(frozen=True)
class ServerLimits(EngineLimits):
    """The engine's limits plus the size caps of a shared server (0 = no cap)."""

    max_parameters: int = 0
    max_samples: int = 0


def parameter_cap(limits: EngineLimits) -> int | None:
    """A server's --max-parameters, checked by the loader before it allocates; None = the loader's own cap."""
    return (limits.max_parameters or None) if isinstance(limits, ServerLimits) else None


def _check_size(model: LoadedModel, data: LoadedData | None, limits: EngineLimits) -> None:
    """Refuse a model or batch over the server's caps before any product is computed."""
    if not isinstance(limits, ServerLimits):
        return
    if limits.max_parameters and model.num_parameters > limits.max_parameters:
        raise ResourceExhausted(
            f"the model has {model.num_parameters} parameters, over this server's limit of "
            f"{limits.max_parameters}; use a smaller model or another server")
    if limits.max_samples and data is not None and data.num_samples > limits.max_samples:
        raise ResourceExhausted(
            f"the batch has {data.num_samples} samples, over this server's limit of {limits.max_samples}; "
            f"pass --max-samples {limits.max_samples} (or fewer) to analyse a random subset")


# What torch says when an operator lacks a derivative (forward mode, second order, under vmap).
_AUTODIFF_LIMITS = ("Batching rule not implemented", "forward AD", "derivative for", "is not implemented")


def _run_timed(name: str, run: Any) -> dict[str, Any]:
    """One analysis, its wall time recorded by status (OK or the status code of its error)."""
    started = time.perf_counter()
    status = "OK"
    try:
        try:
            return run()
        except (RuntimeError, NotImplementedError) as error:
            if not any(marker in str(error) for marker in _AUTODIFF_LIMITS):
                raise
            # torch lacks a derivative this analysis needs for one of the model's operators
            raise Unimplemented(f"{name} needs derivatives torch does not have for this model: {one_line(error)}; "
                                "try another method or curvature") from None
    except CurvscopeError as error:
        status = error.code
        raise
    except BaseException:
        status = "INTERNAL"
        raise
    finally:
        metrics.ANALYSIS_SECONDS.labels(name, status).observe(time.perf_counter() - started)


def describe(
    model_path: Path, *, model_format: str = "auto", architecture: str | None = None,
    architecture_config: dict | None = None, max_parameters: int | None = None,
) -> dict:
    """The DescribeModel answer: loads on the CPU, runs nothing; ``max_parameters`` None = the loader's cap."""
    model = load_model(model_path, format=model_format, architecture=architecture, config=architecture_config,
                       max_parameters=max_parameters)
    return describe_model(model)


def _subsample(data: LoadedData, max_samples: int, seed: int) -> LoadedData:
    if not max_samples or max_samples >= data.num_samples:
        return data
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(data.num_samples, generator=generator)[:max_samples].sort().values
    keep = keep.to(data.targets.device)
    return LoadedData(
        inputs=tuple(x[keep] for x in data.inputs), targets=data.targets[keep],
        extra={name: tensor[keep] for name, tensor in data.extra.items()}, num_samples=max_samples,
        input_names=data.input_names,
    )


def _micro_batch_size(job: AnalysisJob, model: LoadedModel, limits: EngineLimits) -> int:
    if model.fixed_batch_size:
        # validate_pair refused a batch that is not a multiple of the exported one.
        return model.fixed_batch_size
    return job.micro_batch_size or limits.micro_batch_size


def _size(path: Path) -> str:
    try:
        return memory_plan.format_bytes(path.stat().st_size)
    except OSError:
        return "?"


def _run_measured(name: str, plan: AnalysisPlan, meter: PeakMeter, run: Any) -> dict[str, Any]:
    """One analysis, its peak memory measured into its plan."""
    result, growth = meter.measure(lambda: _run_timed(name, run))
    plan.measured_bytes = plan.resident + growth
    return result


@dataclass
class RunPlan:
    """The plans of a run's analyses, by (analysis, block; "" = the whole model)."""

    budget: memory_plan.Budget
    dtype: torch.dtype
    plans: dict[tuple[str, str], AnalysisPlan]

    def get(self, name: str, block: str) -> AnalysisPlan:
        return self.plans[(name, block)]

    def choices(self, block: str) -> dict[str, dict[str, Any]]:
        return {name: plan.choices for (name, where), plan in self.plans.items() if where == block}

    def summary(self) -> dict[str, Any]:
        return memory_plan.summary(list(self.plans.values()), self.budget, self.dtype)


def plan_memory(context: AnalysisContext, specs: dict[str, Any], *, per_layer: bool, server_bytes: int,
                request_bytes: int, meter: PeakMeter) -> RunPlan:
    """Plan every analysis of the run (each block's too) before any starts; raises
    ResourceExhausted naming what would fit. Measures the product's cost on the batch first
    (``memory_plan.calibrate``) when an analysis needs products."""
    model = context.model
    tensors = [] if context.data is None else [*context.data.inputs, context.data.targets, *context.data.extra.values()]
    resident = memory_plan.resident_bytes(model.module, tensors)
    budget = memory_plan.resolve_budget(context.device, resident, server_bytes=server_bytes,
                                        request_bytes=request_bytes)
    parameters = dict(model.module.named_parameters())
    dtype = next(iter(parameters.values())).dtype if parameters else torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    needs_products = context.data is not None and any(ANALYSES[name].needs_data for name in specs)
    product = memory_plan.calibrate(context.operator(), meter) if needs_products else None
    names = list(specs)
    wanted = 0
    if "hessian_eigen" in specs:
        wanted = specs["hessian_eigen"].top_k + specs["hessian_eigen"].bottom_k

    def plans_for(block: str, dim: int) -> dict[tuple[str, str], AnalysisPlan]:
        eigen_first = "hessian_eigen" in names and ("hessian_trace" not in names
                                                    or names.index("hessian_eigen") < names.index("hessian_trace"))
        # hessian_eigen keeps its Ritz vectors for a later trace when they fit 512 MiB (hessian_eigen.run).
        keeps_ritz = eigen_first and "hessian_trace" in names and 8 * dim * wanted <= 512 << 20
        out = {}
        for name, spec in specs.items():
            if block and not ANALYSES[name].per_layer:
                continue
            later = names.index(name) > names.index("hessian_eigen") if "hessian_eigen" in names else False
            shape = memory_plan.Shape(dim=dim, itemsize=itemsize, resident=resident,
                                      product=product if ANALYSES[name].needs_data else None,
                                      ritz_bytes=8 * dim * wanted if keeps_ritz and later else 0)
            plan = memory_plan.plan_analysis(
                name, spec, shape, budget, eigen_earlier=later, trace_later=keeps_ritz,
                seeded=wanted if keeps_ritz and name == "hessian_trace" else 0)
            plan.block, plan.resident = block, resident
            out[(name, block)] = plan
        return out

    plans = plans_for("", sum(p.numel() for p in parameters.values()))
    for block, block_names in (model.parameter_blocks.items() if per_layer else ()):
        plans.update(plans_for(block, sum(parameters[n].numel() for n in block_names)))
    return RunPlan(budget, dtype, plans)


def run_analysis(
    job: ValidatedJob | AnalysisJob, *, device: str = "cpu", limits: EngineLimits = EngineLimits(),
    progress: ProgressFn | None = None, check: CheckFn | None = None,
) -> dict:
    """Load and analyse; returns the report as a dict (``requests.report_document`` encodes it
    for the store and the wire). The servicer and ``--local`` pass the job they validated; a job
    not yet validated is validated here, once."""
    started = time.perf_counter()
    validated = job if isinstance(job, ValidatedJob) else validate_job(job, limits)
    job, specs = validated.job, validated.specs
    dtype = PRECISIONS[job.precision]

    def notify(stage: str) -> None:
        if progress is not None:
            progress({"analysis": "", "step": 0, "total": 0, "current_estimate": 0.0, "block": "", "stage": stage})

    notify(f"loading the model ({_size(job.model_path)})")
    model = load_model(
        job.model_path, format=job.model_format, architecture=job.architecture,
        config=job.architecture_config, device=device, dtype=dtype, max_parameters=parameter_cap(limits),
    )
    data = None
    if job.data_path is not None:
        notify(f"loading the data ({_size(job.data_path)})")
        data = _subsample(load_data(job.data_path, device=device, dtype=dtype, model_inputs=model.inputs, task=job.task),
                          job.max_samples, job.seed)
        validate_pair(model, data, job.loss, job.task)
    _check_size(model, data, limits)
    if check:
        check()

    context = AnalysisContext(
        model=model, data=data, loss=job.loss, loss_fn=bind_loss(job.loss, data.targets, job.task) if data is not None else None,
        curvature=job.curvature, seed=job.seed, device=device, limits=limits, task=job.task,
        micro_batch_size=_micro_batch_size(job, model, limits), progress_sink=progress, check=check,
    )
    contexts = [context]
    try:
        meter = PeakMeter(device)
        notify("planning memory")
        plans = plan_memory(context, specs, per_layer=job.per_layer, server_bytes=limits.memory_budget_bytes,
                            request_bytes=job.memory_budget_bytes, meter=meter)
        context.plans = plans.choices("")
        results: dict[str, Any] = {}
        for name, spec in specs.items():
            notify(f"running {name}")
            results[name] = _run_measured(name, plans.get(name, ""), meter,
                                          lambda: ANALYSES[name].run(context, spec))
            context.earlier[name] = results[name]
        per_layer: dict[str, dict[str, Any]] = {}
        if job.per_layer:
            blocks: dict[str, AnalysisContext] = {}
            for block, names in model.parameter_blocks.items():
                contexts.append(block_context := context.for_block(block, names))
                block_context.plans = plans.choices(block)
                blocks[block] = block_context
                per_layer[block] = {}
            if "hessian_eigen" in specs:
                # Every block's eigenvalues at once, on the whole model's graph (before the
                # other per-layer analyses, which reuse each block's Ritz pairs).
                notify(f"running hessian_eigen on {len(blocks)} blocks")
                eigen = [plans.get("hessian_eigen", block) for block in blocks]
                found = _run_measured("hessian_eigen", eigen[0], meter,
                                      lambda: hessian_eigen.run_per_layer(context, blocks, specs["hessian_eigen"]))
                for block, plan in zip(blocks, eigen):
                    per_layer[block]["hessian_eigen"] = found[block]
                    plan.measured_bytes = eigen[0].measured_bytes
            for block, block_context in blocks.items():
                for name, spec in specs.items():
                    if ANALYSES[name].per_layer and name != "hessian_eigen":
                        notify(f"running {name} [{block}]")
                        per_layer[block][name] = _run_measured(
                            name, plans.get(name, block), meter, lambda: ANALYSES[name].run(block_context, spec))
    finally:
        # Products computed, cancelled or failed work included (it used the device too).
        metrics.HVPS.labels(device, job.curvature).inc(
            sum(operator.products for c in contexts for operator in c._operators.values()))

    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "model": {"sha256": job.model_sha256, "format": model.format, "num_parameters": model.num_parameters},
        "device": device,
        "curvature": job.curvature,
        "precision": job.precision,
        "seed": job.seed,
        "server_version": __version__,
        "results": results,
    }
    if data is not None:
        report["data"] = {"sha256": job.data_sha256, "num_samples": data.num_samples}
        report["loss"] = {"name": job.loss, "value": context.operator().loss()}
    if job.per_layer:
        report["per_layer"] = per_layer
    report["run"] = plans.summary()
    report["seconds"] = time.perf_counter() - started
    return report


def known_losses() -> list[str]:
    return sorted(LOSSES)
