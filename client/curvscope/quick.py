"""``curvscope.analyze``: a model and a batch in, a report out, on a server or in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import in_memory
from ._proto.curvscope.v1 import curvscope_pb2 as pb
from .client import Client, CurvscopeError, ProgressCallback, build_request
from .report import Report

SERVICE_MISSING = ("local=True runs the engine in this process and needs the service package: "
                   "pip install curvscope-service (or pass server=HOST:PORT)")


def analyze(model: Any, data: Any = None, *, server: str | None = None, local: bool = False,
            progress: ProgressCallback | None = None, timeout: float | None = None,
            client: Client | None = None, **options: Any) -> Report:
    """Analyse ``model`` on ``data`` and return the report.

    ``model`` and ``data`` are paths or torch objects, as ``Client.analyze`` takes them:
    ``curvscope.analyze(model, (x, y), eigen=5, trace=True)``. ``local=True`` runs the same
    engine in this process (the service package must be installed) on the same serialised bytes,
    so the report is the one a server gives. Otherwise the call goes to ``client``, or to a new
    connection to ``server`` (default: ``CURVSCOPE_SERVER``, else localhost:50051).
    """
    if local:
        if server is not None or client is not None:
            raise ValueError("local=True runs in this process; leave out server and client")
        return _analyze_here(model, data, progress=progress, **options)
    if client is not None:
        return client.analyze(model, data, progress=progress, timeout=timeout, **options)
    with Client(server) as connected:
        return connected.analyze(model, data, progress=progress, timeout=timeout, **options)


def _analyze_here(model: Any, data: Any, *, progress: ProgressCallback | None, **options: Any) -> Report:
    try:
        from curvscope_service.local import analyze_local
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in {"curvscope_service", "torch"}:
            raise CurvscopeError("FAILED_PRECONDITION", SERVICE_MISSING) from None
        raise
    prepared = in_memory.prepare(model, data) if in_memory.holds_torch(model) or in_memory.holds_torch(data) \
        else in_memory.Prepared(model=None, data=None)
    blobs = {blob.sha256: blob.content for blob in (prepared.model, prepared.data) if blob is not None}
    model_ref = pb.ModelRef(blob=pb.BlobRef(sha256=prepared.model.sha256)) if prepared.model is not None \
        else pb.ModelRef(uri=_file_uri(model))
    data_ref = None
    if prepared.data is not None:
        data_ref = pb.DataRef(blob=pb.BlobRef(sha256=prepared.data.sha256))
    elif data is not None:
        data_ref = pb.DataRef(uri=_file_uri(data))
    request = build_request(model_ref, data_ref, **options)
    return analyze_local(request, progress=progress, blobs=blobs)


def _file_uri(path: Any) -> str:
    text = str(path)
    return text if text.startswith("file://") else Path(text).resolve().as_uri()
