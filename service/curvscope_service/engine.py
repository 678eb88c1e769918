"""The engine's one entry point: a checkpoint and a batch in, a report (plain dict) out.

The servicer and the CLI's ``--local`` mode both call ``run_analysis``; nothing here knows of
gRPC. The report follows the JSON schema ``curvscope.report/v1``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .curvature.hessian import HessianOperator
from .curvature.hessian_eigen import compute_hessian_eigen
from .errors import InvalidInput, Unimplemented
from .loading import LoadedData, LoadedModel, describe_model, load_data, load_model, validate_pair
from .losses import LOSSES, get_loss

REPORT_SCHEMA = "curvscope.report/v1"
IMPLEMENTED_ANALYSES = ("hessian_eigen",)
ALL_ANALYSES = (
    "hessian_eigen", "hessian_trace", "hessian_density", "sharpness", "non_uniformity",
    "lipschitz", "epsilon_sharpness", "adaptive_sharpness", "weight_spectra",
)
IMPLEMENTED_CURVATURES = ("hessian",)
ALL_CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
MODEL_FORMATS = ("torch_export", "safetensors", "plugin")
MAX_EIGENVALUES = 100

ProgressFn = Callable[[dict], None]
CheckFn = Callable[[], None]


@dataclass(frozen=True)
class EngineLimits:
    """Server-side defaults and caps applied to every request."""

    micro_batch_size: int = 256
    max_hvps: int = 2000
    retain_max_samples: int = 4096


@dataclass
class AnalysisJob:
    """One request, with blob references already resolved to files."""

    model_path: Path
    model_sha256: str
    loss: str
    analyses: dict[str, dict[str, Any]]
    data_path: Path | None = None
    data_sha256: str = ""
    model_format: str = "auto"
    architecture: str | None = None
    architecture_config: dict | None = None
    curvature: str = "hessian"
    precision: str = "float32"
    seed: int = 0
    micro_batch_size: int = 0
    per_layer: bool = False
    max_samples: int = 0


def validate_job(job: AnalysisJob, limits: EngineLimits) -> None:
    """Refuse what cannot run before it is queued: unbuilt analyses, unknown names, bad numbers."""
    if not job.analyses:
        raise InvalidInput("the request names no analysis; ask for at least one, e.g. hessian_eigen")
    for name in job.analyses:
        if name not in IMPLEMENTED_ANALYSES:
            raise Unimplemented(
                f"analysis '{name}' is not built in this server; available: {', '.join(IMPLEMENTED_ANALYSES)}"
            )
    if job.curvature not in IMPLEMENTED_CURVATURES:
        raise Unimplemented(
            f"curvature '{job.curvature}' is not built in this server; available: {', '.join(IMPLEMENTED_CURVATURES)}"
        )
    if job.precision not in PRECISIONS:
        raise InvalidInput(f"unknown precision '{job.precision}'; choose float32 or float64")
    get_loss(job.loss)
    if job.data_path is None:
        raise InvalidInput("these analyses need a data batch; pass one with --data")
    if "hessian_eigen" in job.analyses:
        eigen_spec(job.analyses["hessian_eigen"], limits)


def eigen_spec(spec: dict[str, Any], limits: EngineLimits) -> dict[str, Any]:
    """The eigen options with defaults filled in, checked against the server's limits."""
    top_k = int(spec.get("top_k", 0))
    bottom_k = int(spec.get("bottom_k", 0))
    if top_k == 0 and bottom_k == 0:
        top_k = 1
    tolerance = float(spec.get("tolerance", 0.0)) or 1e-3
    max_hvps = int(spec.get("max_hvps", 0)) or limits.max_hvps
    if top_k + bottom_k > MAX_EIGENVALUES:
        raise InvalidInput(f"asked for {top_k + bottom_k} eigenvalues; at most {MAX_EIGENVALUES} per request")
    if not (0.0 < tolerance < 1.0) or math.isnan(tolerance):
        raise InvalidInput(f"tolerance {tolerance} must lie in (0, 1)")
    if max_hvps > limits.max_hvps:
        raise InvalidInput(f"max_hvps {max_hvps} is over this server's limit of {limits.max_hvps}")
    return {"top_k": top_k, "bottom_k": bottom_k, "tolerance": tolerance, "max_hvps": max_hvps}


def describe(
    model_path: Path, *, model_format: str = "auto", architecture: str | None = None,
    architecture_config: dict | None = None,
) -> dict:
    """The DescribeModel answer: loads on the CPU, runs nothing."""
    model = load_model(model_path, format=model_format, architecture=architecture, config=architecture_config)
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


def _micro_batch_size(job: AnalysisJob, model: LoadedModel, data: LoadedData, limits: EngineLimits) -> int:
    if model.fixed_batch_size:
        # validate_pair refused a batch that is not a multiple of the exported one.
        return model.fixed_batch_size
    return job.micro_batch_size or limits.micro_batch_size


def run_analysis(
    job: AnalysisJob, *, device: str = "cpu", limits: EngineLimits = EngineLimits(),
    progress: ProgressFn | None = None, check: CheckFn | None = None,
) -> dict:
    """Load, validate and analyse; returns the report as a JSON-ready dict."""
    started = time.perf_counter()
    validate_job(job, limits)
    dtype = PRECISIONS[job.precision]
    model = load_model(
        job.model_path, format=job.model_format, architecture=job.architecture,
        config=job.architecture_config, device=device, dtype=dtype,
    )
    assert job.data_path is not None  # validate_job refused a job without data
    data = _subsample(load_data(job.data_path, device=device, dtype=dtype), job.max_samples, job.seed)
    validate_pair(model, data, job.loss)
    if check:
        check()

    def operator(param_names: list[str] | None) -> HessianOperator:
        return HessianOperator(
            model.module, data.inputs, data.targets, get_loss(job.loss), param_names=param_names,
            micro_batch_size=_micro_batch_size(job, model, data, limits),
            retain_max_samples=limits.retain_max_samples, check=check,
        )

    full = operator(None)
    results: dict[str, Any] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    if "hessian_eigen" in job.analyses:
        spec = eigen_spec(job.analyses["hessian_eigen"], limits)
        results["hessian_eigen"] = _eigen(full, spec, job.seed, progress, block="")
        if job.per_layer:
            for block, names in model.parameter_blocks.items():
                per_layer.setdefault(block, {})["hessian_eigen"] = _eigen(
                    operator(names), spec, job.seed, progress, block=block
                )

    report = {
        "schema": REPORT_SCHEMA,
        "model": {"sha256": job.model_sha256, "format": model.format, "num_parameters": model.num_parameters},
        "data": {"sha256": job.data_sha256, "num_samples": data.num_samples},
        "loss": {"name": job.loss, "value": full.loss()},
        "device": device,
        "curvature": job.curvature,
        "precision": job.precision,
        "seed": job.seed,
        "server_version": __version__,
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    if job.per_layer:
        report["per_layer"] = per_layer
    return report


def _eigen(
    operator: HessianOperator, spec: dict[str, Any], seed: int, progress: ProgressFn | None, *, block: str
) -> dict:
    def report_progress(step: int, total: int, estimate: float) -> None:
        if progress:
            progress({"analysis": "hessian_eigen", "step": step, "total": total,
                      "current_estimate": estimate, "block": block})

    return compute_hessian_eigen(
        operator, top_k=spec["top_k"], bottom_k=spec["bottom_k"], tol=spec["tolerance"],
        max_hvps=spec["max_hvps"], seed=seed, progress=report_progress,
    )


def known_losses() -> list[str]:
    return sorted(LOSSES)
