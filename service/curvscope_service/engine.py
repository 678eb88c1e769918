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

from . import __version__, metrics
from .analyses import ANALYSES, AnalysisContext, EngineLimits
from .analyses.base import CheckFn, ProgressFn
from .errors import CurvscopeError, ResourceExhausted
from .loading import LoadedData, LoadedModel, describe_model, load_data, load_model, validate_pair
from .loading.checkpoint import available_formats
from .losses import LOSSES, get_loss
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


def _run_timed(name: str, run: Any) -> dict[str, Any]:
    """One analysis, its wall time recorded by status (OK or the status code of its error)."""
    started = time.perf_counter()
    status = "OK"
    try:
        return run()
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
    keep = keep.to(data.inputs.device)
    return LoadedData(
        inputs=data.inputs[keep], targets=data.targets[keep],
        extra={name: tensor[keep] for name, tensor in data.extra.items()}, num_samples=max_samples,
    )


def _micro_batch_size(job: AnalysisJob, model: LoadedModel, limits: EngineLimits) -> int:
    if model.fixed_batch_size:
        # validate_pair refused a batch that is not a multiple of the exported one.
        return model.fixed_batch_size
    return job.micro_batch_size or limits.micro_batch_size


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
    model = load_model(
        job.model_path, format=job.model_format, architecture=job.architecture,
        config=job.architecture_config, device=device, dtype=dtype, max_parameters=parameter_cap(limits),
    )
    data = None
    if job.data_path is not None:
        data = _subsample(load_data(job.data_path, device=device, dtype=dtype), job.max_samples, job.seed)
        validate_pair(model, data, job.loss)
    _check_size(model, data, limits)
    if check:
        check()

    context = AnalysisContext(
        model=model, data=data, loss=job.loss, loss_fn=get_loss(job.loss) if data is not None else None,
        curvature=job.curvature, seed=job.seed, device=device, limits=limits,
        micro_batch_size=_micro_batch_size(job, model, limits), progress_sink=progress, check=check,
    )
    contexts = [context]
    try:
        results: dict[str, Any] = {}
        for name, spec in specs.items():
            results[name] = _run_timed(name, lambda: ANALYSES[name].run(context, spec))
            context.earlier[name] = results[name]
        per_layer: dict[str, dict[str, Any]] = {}
        if job.per_layer:
            for block, names in model.parameter_blocks.items():
                contexts.append(block_context := context.for_block(block, names))
                per_layer[block] = {name: _run_timed(name, lambda: ANALYSES[name].run(block_context, spec))
                                    for name, spec in specs.items() if ANALYSES[name].per_layer}
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
    report["seconds"] = time.perf_counter() - started
    return report


def known_losses() -> list[str]:
    return sorted(LOSSES)
