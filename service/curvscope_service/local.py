"""The CLI's ``--local`` mode: the same request, the same engine entry point, no server."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from curvscope import CurvscopeError as ClientError
from curvscope import Report
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb

from . import engine
from .errors import CurvscopeError, InvalidInput
from .requests import job_from_request, report_document, report_message, validate_job
from .store import folder_digest, path_of_file_uri, sha256_of_file


def _local_file(ref: pb.ModelRef | pb.DataRef) -> tuple[Path, str]:
    if ref.WhichOneof("source") != "uri" or not ref.uri.startswith("file://"):
        raise InvalidInput("local mode reads local files only")
    path = path_of_file_uri(ref.uri)
    if isinstance(ref, pb.ModelRef) and path.is_dir():
        return path, folder_digest(path)  # a Hugging Face checkpoint folder
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file")
    return path, sha256_of_file(path)


def analyze_local(
    request: pb.AnalyzeRequest, *, progress: Callable[[pb.AnalyzeEvent], None] | None = None,
    device: str | None = None, limits: engine.EngineLimits = engine.EngineLimits(),
) -> Report:
    """Run ``request`` in this process on ``device`` (default: the first CUDA device, else cpu)."""
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")

    def on_progress(payload: dict) -> None:
        if progress is not None:
            progress(pb.AnalyzeEvent(progress=pb.Progress(**payload)))

    try:
        data = _local_file(request.data) if request.HasField("data") else None
        job = validate_job(job_from_request(request, _local_file(request.model), data), limits)
        report = engine.run_analysis(job, device=device, limits=limits, progress=on_progress)
        return Report(report_message(report_document(report)))
    except CurvscopeError as error:
        raise ClientError(error.code, str(error)) from None
