"""Translate API messages into engine jobs and engine reports into API messages.

Shared by the servicer and the CLI's ``--local`` mode, so both build the same job from the
same request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format

from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb

from . import __version__
from .engine import AnalysisJob, EngineLimits
from .errors import InvalidInput
from .loading.json_text import parse_json

MAX_CONFIG_JSON_BYTES = 1 << 20

MODEL_FORMAT_NAMES = {
    pb.MODEL_FORMAT_UNSPECIFIED: "auto",
    pb.MODEL_FORMAT_TORCH_EXPORT: "torch_export",
    pb.MODEL_FORMAT_SAFETENSORS: "safetensors",
    pb.MODEL_FORMAT_PLUGIN: "plugin",
}


def _enum_name(enum_type: Any, value: int, prefix: str, unspecified: str) -> str:
    if value == 0:
        return unspecified
    try:
        return enum_type.Name(value).removeprefix(prefix).lower()
    except ValueError:
        raise InvalidInput(f"unknown {prefix.rstrip('_').lower()} value {value}; update the client or the server") from None


def model_options(model: pb.ModelRef) -> dict[str, Any]:
    """Format, architecture and config overrides of a model reference, for the loader."""
    if model.format not in MODEL_FORMAT_NAMES:
        raise InvalidInput(f"unknown model format value {model.format}")
    config = None
    if model.architecture_config_json:
        # Text from the client: bounded in size and depth, so deep nesting is INVALID_ARGUMENT.
        config = parse_json(model.architecture_config_json, what="architecture_config_json",
                            max_bytes=MAX_CONFIG_JSON_BYTES)
        if not isinstance(config, dict):
            raise InvalidInput("architecture_config_json must be a JSON object")
    return {
        "model_format": MODEL_FORMAT_NAMES[model.format],
        "architecture": model.architecture or None,
        "architecture_config": config,
    }


def job_from_request(
    request: pb.AnalyzeRequest, model: tuple[Path, str], data: tuple[Path, str] | None
) -> AnalysisJob:
    """An engine job from a request whose model and data were resolved to (path, sha256)."""
    options = request.options
    analyses: dict[str, dict[str, Any]] = {}
    for spec in request.analyses:
        name = spec.WhichOneof("analysis")
        if name is None:
            raise InvalidInput("an analysis entry is empty; set one of its fields, e.g. hessian_eigen")
        if name in analyses:
            raise InvalidInput(f"analysis '{name}' is listed twice")
        analyses[name] = json_format.MessageToDict(
            getattr(spec, name), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    return AnalysisJob(
        model_path=model[0], model_sha256=model[1],
        data_path=data[0] if data else None, data_sha256=data[1] if data else "",
        loss=request.loss or "cross_entropy",
        analyses=analyses,
        curvature=_enum_name(pb.Curvature, options.curvature, "CURVATURE_", "hessian"),
        precision=_enum_name(pb.Precision, options.precision, "PRECISION_", "float32"),
        seed=options.seed, micro_batch_size=options.micro_batch_size, per_layer=options.per_layer,
        max_samples=options.max_samples,
        **model_options(request.model),
    )


def canonical_request(job: AnalysisJob, specs: dict[str, dict[str, Any]], limits: EngineLimits) -> dict[str, Any]:
    """What determines a report: the inputs' digests and every option with its default filled
    in (``specs`` from ``engine.validate_job``), so that requests that differ only in how they
    were written share one cache entry. The server version is part of it: an upgrade recomputes."""
    return {
        "server_version": __version__,
        "model": {"sha256": job.model_sha256, "format": job.model_format, "architecture": job.architecture,
                  "architecture_config": job.architecture_config},
        "data": job.data_sha256,
        "loss": job.loss if job.data_path is not None else "",
        # In request order: a later analysis may reuse an earlier one's result.
        "analyses": [[name, spec] for name, spec in specs.items()],
        "curvature": job.curvature, "precision": job.precision, "seed": job.seed,
        "micro_batch_size": job.micro_batch_size or limits.micro_batch_size,
        "per_layer": job.per_layer, "max_samples": job.max_samples,
    }


def report_message(report: dict) -> pb.Report:
    """The engine's report dict as the API message (same field names)."""
    return json_format.ParseDict(report, pb.Report())


def description_message(sha256: str, description: dict) -> pb.ModelDescription:
    message = json_format.ParseDict(
        {key: value for key, value in description.items() if value is not None}, pb.ModelDescription(),
        ignore_unknown_fields=True,
    )
    message.sha256 = sha256
    return message
