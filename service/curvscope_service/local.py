"""The CLI's ``--local`` mode: the same request, the same engine entry point, no server."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from curvscope import CurvscopeError as ClientError
from curvscope import Report
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb

from . import engine
from .errors import CurvscopeError, InvalidInput
from .requests import job_from_request, report_document, report_message, validate_job
from .store import folder_digest, path_of_file_uri, sha256_of_file


def _local_file(ref: pb.ModelRef | pb.DataRef, held: Mapping[str, Path] | None = None) -> tuple[Path, str]:
    if ref.WhichOneof("source") == "blob" and held and ref.blob.sha256 in held:
        return held[ref.blob.sha256], ref.blob.sha256
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
    blobs: Mapping[str, bytes] | None = None,
) -> Report:
    """Run ``request`` in this process on ``device`` (default: the first CUDA device, else cpu).

    ``blobs`` (sha256 -> bytes) hold the content of the request's blob references: a model and
    a batch serialised in memory (``curvscope.in_memory``), read by the same loaders as files.
    The request's ``memory_budget_bytes`` (``--memory-budget``) is this process' own ceiling, so
    it replaces the machine's available memory instead of only lowering it; progress events
    (stages, then each analysis' steps) are the ones a server streams."""
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if request.options.memory_budget_bytes:
        limits = replace(limits, memory_budget_bytes=request.options.memory_budget_bytes)

    def on_progress(payload: dict) -> None:
        if progress is not None:
            progress(pb.AnalyzeEvent(progress=pb.Progress(**payload)))

    try:
        with _memory_files(blobs or {}) as held:
            data = _local_file(request.data, held) if request.HasField("data") else None
            job = validate_job(job_from_request(request, _local_file(request.model, held), data), limits)
            report = engine.run_analysis(job, device=device, limits=limits, progress=on_progress)
        return Report(report_message(report_document(report)))
    except CurvscopeError as error:
        raise ClientError(error.code, str(error)) from None


@contextlib.contextmanager
def _memory_files(blobs: Mapping[str, bytes]) -> Iterator[dict[str, Path]]:
    """Each blob as a path the loaders open like a file: an anonymous in-memory file
    (``memfd_create``, Linux) reached through /proc/self/fd, nothing written to a disk. Where
    there is none (macOS, Windows), a private temporary directory removed on exit."""
    if not blobs:
        yield {}
        return
    with contextlib.ExitStack() as stack:
        paths: dict[str, Path] = {}
        if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            for digest, content in blobs.items():
                descriptor = os.memfd_create(f"curvscope-{digest[:12]}", os.MFD_CLOEXEC)
                stack.callback(os.close, descriptor)
                _write_all(descriptor, content)
                paths[digest] = Path(f"/proc/self/fd/{descriptor}")
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="curvscope-")))
            for digest, content in blobs.items():
                (folder / digest).write_bytes(content)
                paths[digest] = folder / digest
        yield paths


def _write_all(descriptor: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(descriptor, view):]
