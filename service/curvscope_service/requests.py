"""The API's side of the engine: a request decoded once into a job, the job validated once into
typed per-analysis options, and the engine's report encoded as the API message.

Shared by the servicer and the CLI's ``--local`` mode, so both build and validate the same job
from the same request. Nothing past ``validate_job`` sees a proto spelling.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import torch
from google.protobuf import json_format
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope.report import json_ready

from . import __version__
from .analyses import ANALYSES, EngineLimits
from .analyses.adaptive_sharpness import SharpnessNorm
from .analyses.hessian_trace import TraceMethod
from .analyses.lipschitz import LipschitzMethod, SdpSolver
from .analyses.non_uniformity import NonUniformityMethod
from .errors import InvalidInput, Unimplemented
from .loading.json_text import parse_json
from .losses import check_task, get_loss

MAX_CONFIG_JSON_BYTES = 1 << 20
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
# The analyses' option enums, each with the API enum it is decoded from and its name in messages.
WIRE_ENUMS: dict[type[Enum], tuple[EnumTypeWrapper, str]] = {
    TraceMethod: (pb.TraceMethod, "trace method"),
    NonUniformityMethod: (pb.NonUniformityMethod, "non-uniformity method"),
    LipschitzMethod: (pb.LipschitzMethod, "Lipschitz method"),
    SdpSolver: (pb.SdpSolver, "SDP solver"),
    SharpnessNorm: (pb.SharpnessNorm, "sharpness norm"),
}
# The specs' fields whose API name differs: the engine's product budget is ``max_hvps`` on the wire.
WIRE_FIELDS = {"max_products": "max_hvps"}


@dataclass
class AnalysisJob:
    """One request, with blob references already resolved to files; each analysis' options in
    the API's JSON form (its spec message's field names and enum names)."""

    model_path: Path
    model_sha256: str
    loss: str
    analyses: dict[str, Mapping[str, Any]]
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
    task: str = ""  # losses.TASKS: "" infers the loss' form from the shapes
    # The request's memory ceiling (0 = the server's), see memory_plan.resolve_budget.
    memory_budget_bytes: int = 0

    def model_options(self) -> dict[str, Any]:
        """The loader's options for the model, as ``model_options`` decoded them from the request."""
        return {"model_format": self.model_format, "architecture": self.architecture,
                "architecture_config": self.architecture_config}


@dataclass(frozen=True)
class ValidatedJob:
    """A job that ``validate_job`` accepted: each analysis' typed options (its ``Analysis.spec``)
    with the defaults filled in, in request order."""

    job: AnalysisJob
    specs: dict[str, Any]


def wire_name(enum: EnumTypeWrapper, value: int | str, what: str) -> str | None:
    """An API enum value (a number, or a name as the JSON form writes it) as its name without the
    enum's prefix, lowercased; None for the unspecified value."""
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    try:
        number = enum.Value(value) if isinstance(value, str) else int(value)
        name = enum.Name(number)
    except ValueError:
        if isinstance(value, str):
            choices = ", ".join(name.removeprefix(prefix).lower() for name in enum.keys()[1:])
            raise InvalidInput(f"unknown {what} {value!r}; choose one of {choices}") from None
        raise InvalidInput(f"unknown {what} value {value}; update the client or the server") from None
    return name.removeprefix(prefix).lower() if number else None


def _decode_value(hint: Any, value: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # a repeated field
        items = [_decode_value(args[0], item) for item in value]
        if None in items:
            raise InvalidInput(f"unknown {WIRE_ENUMS[args[0]][1]} 'unspecified' in a list")
        return tuple(items)
    kind = next((arg for arg in args if arg is not type(None)), hint)  # X | None: X
    if isinstance(kind, type) and issubclass(kind, Enum):
        enum, what = WIRE_ENUMS[kind]
        name = wire_name(enum, value, what)
        if name is None:
            return None
        if name.upper() not in kind.__members__:
            raise Unimplemented(f"{what} '{name}' is not built in this server; available: "
                                f"{', '.join(member.name.lower() for member in kind)}")
        return kind[name.upper()]
    return kind(value)


def decode_spec(name: str, options: Mapping[str, Any]) -> Any:
    """An analysis' options in the API's JSON form as its typed spec (``Analysis.spec``)."""
    spec_type = ANALYSES[name].spec
    hints = typing.get_type_hints(spec_type)
    wire = {field.name: WIRE_FIELDS.get(field.name, field.name) for field in dataclasses.fields(spec_type)}
    return spec_type(**{name: _decode_value(hints[name], options[wire[name]])
                        for name in wire if wire[name] in options})


def validate_job(job: AnalysisJob, limits: EngineLimits) -> ValidatedJob:
    """Refuse what cannot run before it is queued; the job with each analysis' typed options."""
    if not job.analyses:
        raise InvalidInput("the request names no analysis; ask for at least one, e.g. hessian_eigen")
    unbuilt = [name for name in job.analyses if name not in ANALYSES]
    if unbuilt:
        raise Unimplemented(
            f"analysis '{unbuilt[0]}' is not built in this server; available: {', '.join(ANALYSES)}")
    for name in job.analyses:
        if job.curvature not in ANALYSES[name].curvatures:
            raise Unimplemented(
                f"curvature '{job.curvature}' is not built for {name}; available: "
                f"{', '.join(ANALYSES[name].curvatures)}")
    if job.precision not in PRECISIONS:
        raise InvalidInput(f"unknown precision '{job.precision}'; choose float32 or float64")
    if job.data_path is None and any(ANALYSES[name].needs_data for name in job.analyses):
        raise InvalidInput("these analyses need a data batch; pass one with --data")
    check_task(job.task)
    if job.data_path is not None:
        get_loss(job.loss)
    if job.task == "causal-lm" and job.loss != "cross_entropy":
        raise InvalidInput(f"the task causal-lm needs the loss cross_entropy, not '{job.loss}'")
    return ValidatedJob(job, {name: ANALYSES[name].normalize(decode_spec(name, options), limits)
                              for name, options in job.analyses.items()})


def model_options(model: pb.ModelRef) -> dict[str, Any]:
    """Format, architecture and config overrides of a model reference, for the loader."""
    model_format = wire_name(pb.ModelFormat, model.format, "model format") or "auto"
    config = None
    if model.architecture_config_json:
        # Text from the client: bounded in size and depth, so deep nesting is INVALID_ARGUMENT.
        config = parse_json(model.architecture_config_json, what="architecture_config_json",
                            max_bytes=MAX_CONFIG_JSON_BYTES)
        if not isinstance(config, dict):
            raise InvalidInput("architecture_config_json must be a JSON object")
    return {"model_format": model_format, "architecture": model.architecture or None, "architecture_config": config}


def job_from_request(
    request: pb.AnalyzeRequest, model: tuple[Path, str], data: tuple[Path, str] | None
) -> AnalysisJob:
    """An engine job from a request whose model and data were resolved to (path, sha256)."""
    options = request.options
    analyses: dict[str, Mapping[str, Any]] = {}
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
        curvature=wire_name(pb.Curvature, options.curvature, "curvature") or "hessian",
        precision=wire_name(pb.Precision, options.precision, "precision") or "float32",
        seed=options.seed, micro_batch_size=options.micro_batch_size, per_layer=options.per_layer,
        max_samples=options.max_samples, task=options.task, memory_budget_bytes=options.memory_budget_bytes,
        **model_options(request.model),
    )


def canonical_request(validated: ValidatedJob, limits: EngineLimits) -> dict[str, Any]:
    """What determines a report: the inputs' digests and every option with its default filled
    in, so that requests that differ only in how they were written share one cache entry. The
    server version is part of it: an upgrade recomputes."""
    job = validated.job
    return {
        "server_version": __version__,
        "model": {"sha256": job.model_sha256, "format": job.model_format, "architecture": job.architecture,
                  "architecture_config": job.architecture_config},
        "data": job.data_sha256,
        "loss": job.loss if job.data_path is not None else "",
        # In request order: a later analysis may reuse an earlier one's result.
        "analyses": [[name, {WIRE_FIELDS.get(field, field): value for field, value in dataclasses.asdict(spec).items()}]
                     for name, spec in validated.specs.items()],
        "curvature": job.curvature, "precision": job.precision, "seed": job.seed,
        "micro_batch_size": job.micro_batch_size or limits.micro_batch_size,
        "per_layer": job.per_layer, "max_samples": job.max_samples,
        # only when set, so that the reports cached before the option existed stay valid
        **({"task": job.task} if job.task else {}),
    }


def report_document(report: dict) -> dict:
    """The engine's report in the shape of the report's JSON Schema (same field names; a
    non-finite number spelled as protobuf's JSON mapping spells it, e.g. "Infinity"): what the
    store keeps as is and what ``report_message`` builds the API message from."""
    return json_ready(report)


def report_message(document: dict) -> pb.Report:
    """The API message of a report document, fresh from ``report_document`` or read back from
    the store, so that a cached report goes out as the same message a fresh run sends."""
    return json_format.ParseDict(document, pb.Report())


def description_message(sha256: str, description: dict) -> pb.ModelDescription:
    message = json_format.ParseDict(
        {key: value for key, value in description.items() if value is not None}, pb.ModelDescription(),
        ignore_unknown_fields=True,
    )
    message.sha256 = sha256
    return message
