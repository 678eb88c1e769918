"""``curvscope.Client``: upload a checkpoint and a batch, analyse them, get a typed report."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor

from . import in_memory
from ._files import CHUNK_BYTES, folder_files, sha256_of_file
from ._proto.curvscope.v1 import curvscope_pb2 as pb
from ._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from .report import Report, message_to_dict

DEFAULT_SERVER = "localhost:50051"
SERVICE = pb.DESCRIPTOR.services_by_name["Curvscope"].full_name  # "curvscope.v1.Curvscope"
# grpc itself sends these calls again when they fail with UNAVAILABLE (a draining replica, a
# connection lost as the call started), with exponential backoff. They are idempotent: StatBlob,
# DescribeModel and GetCapabilities read, and the server caches Analyze's report by the request's
# content; grpc retries Analyze only until its first event arrives. Upload is left out: its
# chunks are larger than grpc's retry buffer, so a retry could not replay them.
RETRIED_METHODS = ("StatBlob", "DescribeModel", "GetCapabilities", "Analyze")
SERVICE_CONFIG = {"methodConfig": [{
    "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "5s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]}
# Ping the server every 30 s while a call is open, so a long, silent Analyze stream (a solve of
# minutes) finds a dead connection within 50 s; the server accepts pings every 10 s.
KEEPALIVE_OPTIONS = {"grpc.keepalive_time_ms": 30_000, "grpc.keepalive_timeout_ms": 20_000,
                     "grpc.keepalive_permit_without_calls": 0, "grpc.http2.max_pings_without_data": 0}
# Trailing metadata with which the server marks an error after which the same request may be
# sent again as it is (ABORTED: a solver process killed from outside the server).
RETRY_SAFE_METADATA = "curvscope-retry-safe"
CONNECT_TIMEOUT_SECONDS = 10.0
UNARY_TIMEOUT_SECONDS = 60.0
ABORTED_BACKOFF_SECONDS = 1.0
# Until a client has a connection, a health check (public: no token needed) waits for one before
# its call; after a connect timeout, one more, fail-fast, asks the channel why there is none.
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_PROBE_SECONDS = 2.0
_NOT_CONNECTED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

log = logging.getLogger(__name__)
ProgressCallback = Callable[[pb.AnalyzeEvent], None]
# The curvature matrices and trace estimators a request can name (the report's spelling).
CURVATURES = {"hessian": pb.CURVATURE_HESSIAN, "ggn": pb.CURVATURE_GGN, "fisher": pb.CURVATURE_FISHER,
              "empirical_fisher": pb.CURVATURE_EMPIRICAL_FISHER}
TRACE_METHODS = {"hutchinson": pb.TRACE_METHOD_HUTCHINSON, "hutchpp": pb.TRACE_METHOD_HUTCH_PLUS_PLUS,
                 "xtrace": pb.TRACE_METHOD_XTRACE}
# The losses the server differentiates (curvscope_service.losses), mean over the samples.
LOSSES = ("cross_entropy", "mse")
# What the model predicts (AnalysisOptions.task): the loss' form; "" infers it from the shapes.
TASKS = ("causal-lm", "sequence-classification", "token-classification")


class CurvscopeError(Exception):
    """A call failed: ``code`` is the gRPC status name (INVALID_ARGUMENT, UNAVAILABLE, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "CurvscopeError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code.name, details or code.name)


def build_request(
    model: pb.ModelRef, data: pb.DataRef | None = None, *, loss: str = "cross_entropy",
    eigen: int = 1, smallest: int = 0, tolerance: float = 0.0, max_hvps: int = 0,
    trace: bool = False, density: bool = False, sharpness: bool = False, non_uniformity: bool = False,
    lipschitz: bool = False, learning_rate: float = 0.0, batch_size: int = 0,
    per_layer: bool = False, seed: int = 0, precision: str = "float32", micro_batch_size: int = 0,
    max_samples: int = 0, curvature: str | None = None, task: str = "", memory_budget_bytes: int = 0,
    trace_method: str | None = None, trace_max_hvps: int = 0, trace_tolerance: float = 0.0, frobenius: bool = False,
    density_steps: int = 0, density_probes: int = 0, density_grid: int = 0, density_sigma: float = 0.0,
    density_negative_tolerance: float | None = None,
    epsilon_sharpness: bool = False, adaptive_sharpness: bool = False, weight_spectra: bool = False,
    spec_fields: Mapping[str, Mapping[str, Any]] | None = None,
) -> pb.AnalyzeRequest:
    """The request the CLI and ``Client.analyze`` send; one analysis entry per flag.

    ``curvature`` is one of CURVATURES (None: the server's default, the Hessian); ``task`` one of
    TASKS ("" = inferred from the shapes; "causal-lm" shifts the labels); ``trace_method``
    one of TRACE_METHODS (None: the server's choice). Zeros leave a setting to the server, and so
    does ``density_negative_tolerance`` None (0 there counts every negative eigenvalue).
    ``memory_budget_bytes`` caps the memory the analyses may plan for (the server's ceiling
    still applies).
    ``spec_fields`` sets any field of any analysis's spec by name, and adds that analysis:
    ``{"non_uniformity": {"method": "gauss_newton"}, "lipschitz": {"methods": ["lipsdp_neuron", "lower"]}}``.
    """
    analyses = []
    if eigen or smallest:
        analyses.append(pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(
            top_k=eigen, bottom_k=smallest, tolerance=tolerance, max_hvps=max_hvps)))
    if trace:
        if trace_method is not None and trace_method not in TRACE_METHODS:
            raise ValueError(f"trace_method must be one of {', '.join(TRACE_METHODS)}, not {trace_method!r}")
        analyses.append(pb.AnalysisSpec(hessian_trace=pb.HessianTraceSpec(
            method=TRACE_METHODS[trace_method] if trace_method else pb.TRACE_METHOD_UNSPECIFIED,
            max_hvps=trace_max_hvps, relative_tolerance=trace_tolerance, frobenius=frobenius)))
    if density:
        analyses.append(pb.AnalysisSpec(hessian_density=pb.HessianDensitySpec(
            lanczos_steps=density_steps, num_probes=density_probes, grid_points=density_grid, sigma=density_sigma,
            negative_tolerance=density_negative_tolerance)))
    if sharpness:
        analyses.append(pb.AnalysisSpec(sharpness=pb.SharpnessSpec(learning_rate=learning_rate)))
    if non_uniformity:
        analyses.append(pb.AnalysisSpec(non_uniformity=pb.NonUniformitySpec(
            learning_rate=learning_rate, batch_size=batch_size)))
    if lipschitz:
        analyses.append(pb.AnalysisSpec(lipschitz=pb.LipschitzSpec()))
    if epsilon_sharpness:
        analyses.append(pb.AnalysisSpec(epsilon_sharpness=pb.EpsilonSharpnessSpec()))
    if adaptive_sharpness:
        analyses.append(pb.AnalysisSpec(adaptive_sharpness=pb.AdaptiveSharpnessSpec()))
    if weight_spectra:
        analyses.append(pb.AnalysisSpec(weight_spectra=pb.WeightSpectraSpec()))
    for name, fields in (spec_fields or {}).items():
        _set_spec_fields(analyses, name, fields)
    precisions = {"float32": pb.PRECISION_FLOAT32, "float64": pb.PRECISION_FLOAT64}
    if precision not in precisions:
        raise ValueError(f"precision must be float32 or float64, not {precision!r}")
    if curvature is not None and curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {', '.join(CURVATURES)}, not {curvature!r}")
    if task and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    request = pb.AnalyzeRequest(
        model=model, loss=loss, analyses=analyses,
        options=pb.AnalysisOptions(seed=seed, per_layer=per_layer, precision=precisions[precision],
                                   micro_batch_size=micro_batch_size, max_samples=max_samples, task=task,
                                   memory_budget_bytes=memory_budget_bytes,
                                   curvature=CURVATURES[curvature] if curvature else pb.CURVATURE_UNSPECIFIED),
    )
    if data is not None:
        request.data.CopyFrom(data)
    return request


ANALYSIS_NAMES = tuple(field.name for field in pb.AnalysisSpec.DESCRIPTOR.oneofs_by_name["analysis"].fields)


def _set_spec_fields(analyses: list[pb.AnalysisSpec], name: str, fields: Mapping[str, Any]) -> None:
    """Set ``fields`` on the spec of analysis ``name``, adding the analysis when it is not there yet."""
    if name not in ANALYSIS_NAMES:
        raise ValueError(f"unknown analysis {name!r}; one of {', '.join(ANALYSIS_NAMES)}")
    entry = next((a for a in analyses if a.WhichOneof("analysis") == name), None)
    if entry is None:
        entry = pb.AnalysisSpec()
        getattr(entry, name).SetInParent()
        analyses.append(entry)
    spec = getattr(entry, name)
    known = spec.DESCRIPTOR.fields_by_name
    for field_name, value in fields.items():
        field = known.get(field_name)
        if field is None:
            choices = ", ".join(known) or "none: it takes no settings"
            raise ValueError(f"{name} has no setting {field_name!r} (settings: {choices})")
        if field.is_repeated:
            values = value.split(",") if isinstance(value, str) else list(value)
            target = getattr(spec, field_name)
            del target[:]
            target.extend(_field_value(name, field, item) for item in values)
        else:
            setattr(spec, field_name, _field_value(name, field, value))


def _field_value(analysis: str, field: FieldDescriptor, value: Any) -> Any:
    """``value`` (a Python value, or the text of a command-line flag) as the field's type."""
    where = f"{analysis}.{field.name}"
    try:
        if field.type == FieldDescriptor.TYPE_ENUM:
            names = {v.name: v.number for v in field.enum_type.values if v.number != 0}
            prefix = field.enum_type.values[0].name.removesuffix("UNSPECIFIED")
            short = {n.removeprefix(prefix).lower(): number for n, number in names.items()}
            text = str(value)
            if text in names or text.lower() in short:
                return names.get(text, short.get(text.lower()))
            raise ValueError(f"one of {', '.join(short)}")
        if field.type == FieldDescriptor.TYPE_BOOL:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError("true or false")
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return float(value)
        if field.type == FieldDescriptor.TYPE_STRING:
            return str(value)
        number = int(value)
        if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and number < 0:
            raise ValueError("a whole number >= 0")
        return number
    except ValueError as error:
        detail = str(error) if str(error).startswith(("one of", "true", "a whole")) else "a number"
        raise ValueError(f"{where} must be {detail}, not {value!r}") from None


def _read(path: str | Path | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CurvscopeError("INVALID_ARGUMENT", f"cannot read {path}: {error.strerror}") from None


class Client:
    """A connection to a curvscope server.

    ``target`` defaults to ``CURVSCOPE_SERVER`` (else localhost:50051) and ``token`` to
    ``CURVSCOPE_TOKEN``. TLS: ``tls_ca`` (the server's CA; ``tls=True`` for the system roots),
    plus ``tls_cert``/``tls_key`` for mutual TLS. Local files are uploaded once: a file the server already holds (same
    sha256) is not sent again.

    On a real network: the first call, and the first after one that found the server
    unavailable, waits up to ``connect_timeout`` seconds (never past its own deadline) for a
    connection (``wait_for_ready``), then fails with UNAVAILABLE naming the address, where it came
    from (``target_origin``; the CLI passes ``--server``) and how to set it. StatBlob,
    DescribeModel and GetCapabilities have a deadline of ``unary_timeout`` seconds (None: none);
    Upload and Analyze have none unless ``analyze(timeout=...)`` sets one. grpc sends a call again
    on UNAVAILABLE (a draining replica, a connection lost as the call started), up to 5 attempts
    with exponential backoff from 0.2 s (``SERVICE_CONFIG``: StatBlob, DescribeModel,
    GetCapabilities, and Analyze until its first event; not Upload, whose chunks grpc cannot
    replay). An Analyze that ends ABORTED with the server's ``curvscope-retry-safe: 1`` mark (its
    solver process was killed from outside the server) is sent again up to ``aborted_retries``
    times, after 1 s, 2 s, ..., within its deadline; every other error is raised at once.
    Keepalive pings every 30 s during a call keep a long, quiet Analyze stream alive through
    proxies and find a dead connection within a minute.

    Scaling out: ``load_balancing="round_robin"`` spreads the calls over every address the
    target resolves to (``dns:///curvscope-headless.ml.svc:50051``, or
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``); the replicas must share their blob store.
    ``options`` are passed to the gRPC channel, over these defaults (``grpc.service_config``,
    the keepalive settings).
    """

    def __init__(self, target: str | None = None, *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls: bool = False, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 load_balancing: str | None = None, options: Sequence[tuple[str, Any]] = (),
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 unary_timeout: float | None = UNARY_TIMEOUT_SECONDS, aborted_retries: int = 1,
                 target_origin: str | None = None):
        from_env = os.environ.get("CURVSCOPE_SERVER")
        self.target = target or from_env or DEFAULT_SERVER
        self.target_origin = target_origin or (
            "the target argument" if target else "CURVSCOPE_SERVER" if from_env else "the default")
        self.connect_timeout = connect_timeout
        self.unary_timeout = unary_timeout
        self.aborted_retries = aborted_retries
        token = token if token is not None else os.environ.get("CURVSCOPE_TOKEN")
        self._metadata = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        channel_options: dict[str, Any] = {"grpc.service_config": json.dumps(SERVICE_CONFIG), **KEEPALIVE_OPTIONS}
        if load_balancing:
            channel_options["grpc.lb_policy_name"] = load_balancing
        channel_options.update(options)
        if bool(tls_cert) != bool(tls_key):
            raise CurvscopeError("INVALID_ARGUMENT", "tls_cert and tls_key go together (--tls-cert, --tls-key)")
        if tls or tls_ca or tls_cert:
            # tls_ca: the server's CA (else the system roots); tls_cert/tls_key: this client's
            # certificate, for servers that require mutual TLS.
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert))
            self._channel = grpc.secure_channel(self.target, credentials, list(channel_options.items()))
        else:
            self._channel = grpc.insecure_channel(self.target, list(channel_options.items()))
        self._stub = pb_grpc.CurvscopeStub(self._channel)
        self._health_check = self._channel.unary_unary(_HEALTH_CHECK)
        self._connected = False  # True once a call reached the server; False again once one found it gone

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wait_until_ready(self, deadline: float | None) -> None:
        """Wait for a connection, up to ``connect_timeout`` and never past ``deadline``; else
        raise UNAVAILABLE with the address, where it came from, and the transport's reason.
        The wait is a health check with ``wait_for_ready`` rather than grpc's channel-state
        watcher, whose thread races with ``close``; made only while not connected, it leaves
        round-robin's order of the calls alone."""
        if self._connected:
            return
        started, reason = time.monotonic(), ""
        left = _remaining(deadline)
        wait = self.connect_timeout if left is None else min(self.connect_timeout, left)
        for timeout, wait_for_ready in ((wait, True), (_PROBE_SECONDS, False)):
            try:
                self._health_check(b"", timeout=timeout, wait_for_ready=wait_for_ready)
            except grpc.RpcError as error:
                if error.code() in _NOT_CONNECTED:
                    reason = (error.details() or error.code().name).removeprefix(
                        "failed to connect to all addresses; last error: ")
                    continue
            # It answered (an error such as UNIMPLEMENTED too: a server without the health service).
            self._connected = True
            return
        # Fail-fast, the second check's reason is the channel's (refused, a TLS handshake, ...).
        raise CurvscopeError("UNAVAILABLE", self._unreachable(time.monotonic() - started, reason))

    def _unreachable(self, waited: float, reason: str) -> str:
        # The reason first: the CLI cuts its one-line errors at 300 characters.
        return (f"could not reach the server at {self.target} (from {self.target_origin}) in {waited:.1f} s "
                f"({reason}); start one with `curvscope serve`, set --server or CURVSCOPE_SERVER, or use --local")

    def _error(self, error: grpc.RpcError) -> CurvscopeError:
        if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE:
            self._connected = False  # the next call waits for a connection again
            return CurvscopeError("UNAVAILABLE", f"the server at {self.target} (from {self.target_origin}) is "
                                                 f"unavailable: {error.details() or 'UNAVAILABLE'}")
        return CurvscopeError.from_rpc(error)

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline = _deadline(timeout)
        self._wait_until_ready(deadline)
        try:
            return method(request, metadata=self._metadata, timeout=_remaining(deadline))
        except grpc.RpcError as error:
            raise self._error(error) from None

    # -- blobs --------------------------------------------------------------------------------
    def stat(self, sha256: str) -> pb.BlobInfo | None:
        """The stored blob's info, or None when the server does not have it."""
        try:
            return self._call(self._stub.StatBlob, pb.BlobRef(sha256=sha256), self.unary_timeout)
        except CurvscopeError as error:
            if error.code == "NOT_FOUND":
                return None
            raise

    def upload(self, path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
        """Upload a file unless the server already has it; returns its sha256."""
        path = Path(path)
        if not path.is_file():
            raise CurvscopeError("INVALID_ARGUMENT", f"{path} is not a file")
        digest = sha256_of_file(path)
        if self.stat(digest) is not None:
            return digest
        size = path.stat().st_size

        def chunks() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=pb.UploadHeader(sha256=digest, size_bytes=size, filename=path.name))
            with open(path, "rb") as handle:
                while block := handle.read(chunk_bytes):
                    yield pb.UploadChunk(data=block)

        return self._call(self._stub.Upload, chunks(), None).sha256

    def upload_bytes(self, content: bytes, filename: str = "", chunk_bytes: int = CHUNK_BYTES) -> str:
        """Upload bytes held in memory unless the server already has them; returns their sha256."""
        digest = hashlib.sha256(content).hexdigest()
        if self.stat(digest) is not None:
            return digest
        view = memoryview(content)

        def chunks() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=pb.UploadHeader(sha256=digest, size_bytes=len(content), filename=filename))
            for start in range(0, len(view), chunk_bytes):
                yield pb.UploadChunk(data=bytes(view[start:start + chunk_bytes]))

        return self._call(self._stub.Upload, chunks(), None).sha256

    def upload_folder(self, folder: str | Path, chunk_bytes: int = CHUNK_BYTES) -> pb.FolderManifest:
        """Upload the files of a Hugging Face checkpoint folder that the server reads (config.json,
        model.safetensors or the index and its shards; ``curvscope._files.FOLDER_FILE``), each
        unless the server already has it; returns their manifest."""
        files = folder_files(folder)
        if "config.json" not in files:
            raise CurvscopeError("INVALID_ARGUMENT", f"{folder} is a folder without config.json; a Hugging Face "
                                                     "checkpoint folder holds config.json and model.safetensors")
        return pb.FolderManifest(files={name: pb.BlobRef(sha256=self.upload(path, chunk_bytes))
                                        for name, path in files.items()})

    def model_ref(self, model: str | Path, **options: Any) -> pb.ModelRef:
        """A local file or Hugging Face checkpoint folder (uploaded), a ``file://`` URI on the
        server, or ``sha256:<digest>``."""
        ref = pb.ModelRef(**options)
        if not str(model).startswith(("file://", "sha256:")) and Path(model).is_dir():
            ref.folder.CopyFrom(self.upload_folder(model))
            return ref
        source = self._source(model)
        ref.blob.CopyFrom(source) if isinstance(source, pb.BlobRef) else setattr(ref, "uri", source)
        return ref

    def data_ref(self, data: str | Path) -> pb.DataRef:
        ref = pb.DataRef()
        source = self._source(data)
        ref.blob.CopyFrom(source) if isinstance(source, pb.BlobRef) else setattr(ref, "uri", source)
        return ref

    def _source(self, reference: str | Path) -> pb.BlobRef | str:
        text = str(reference)
        if text.startswith("file://"):
            return text
        if text.startswith("sha256:"):
            return pb.BlobRef(sha256=text.removeprefix("sha256:"))
        return pb.BlobRef(sha256=self.upload(reference))

    # -- analyses -----------------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        return message_to_dict(self._call(self._stub.GetCapabilities, pb.GetCapabilitiesRequest(), self.unary_timeout))

    def describe(self, model: str | Path, **model_options: Any) -> dict[str, Any]:
        return message_to_dict(self._call(self._stub.DescribeModel, self.model_ref(model, **model_options),
                                          self.unary_timeout))

    def analyze(self, model: Any, data: Any = None, *, progress: ProgressCallback | None = None,
                timeout: float | None = None, **options: Any) -> Report:
        """Analyse a model on a batch. ``options`` are those of ``build_request``
        (eigen=5, smallest=2, per_layer=True, loss="mse", weight_spectra=True,
        spec_fields={"non_uniformity": {"method": "gauss_newton"}}, ...).

        ``model``: a path (or ``file://`` URI, ``sha256:`` digest), or a ``torch.nn.Module``,
        exported in memory in eval mode with a dynamic batch dimension. ``data``: a path, or
        tensors: ``(inputs, targets)`` (inputs a tensor, a tuple of tensors or a dict of named
        tensors) or a dict of named inputs with ``targets``. Objects are serialised in memory
        and uploaded only when the server lacks their digest (``curvscope.in_memory``)."""
        model_ref, data_ref = self._refs(model, data)
        request = build_request(model_ref, data_ref, **options)
        return self.analyze_request(request, progress=progress, timeout=timeout)

    def _refs(self, model: Any, data: Any) -> tuple[pb.ModelRef, pb.DataRef | None]:
        """The model's and data's references: torch objects serialised and uploaded from memory."""
        if not (in_memory.holds_torch(model) or in_memory.holds_torch(data)):
            return self.model_ref(model), self.data_ref(data) if data is not None else None
        prepared = in_memory.prepare(model, data)
        model_ref = (pb.ModelRef(blob=pb.BlobRef(sha256=self.upload_bytes(prepared.model.content, prepared.model.filename)))
                     if prepared.model is not None else self.model_ref(model))
        data_ref = (pb.DataRef(blob=pb.BlobRef(sha256=self.upload_bytes(prepared.data.content, prepared.data.filename)))
                    if prepared.data is not None else self.data_ref(data) if data is not None else None)
        return model_ref, data_ref

    def analyze_request(self, request: pb.AnalyzeRequest, *, progress: ProgressCallback | None = None,
                        timeout: float | None = None) -> Report:
        """Send a prepared request; ``progress`` sees every Queued and Progress event. An ABORTED
        the server marks retry-safe is sent again (``aborted_retries``), within ``timeout``."""
        deadline = _deadline(timeout)
        retries = 0
        while True:
            try:
                return self._analyze_once(request, progress, deadline)
            except grpc.RpcError as error:
                delay = ABORTED_BACKOFF_SECONDS * 2 ** retries
                left = _remaining(deadline)
                if not (_retry_safe(error) and retries < self.aborted_retries and (left is None or delay < left)):
                    raise self._error(error) from None
                retries += 1
                log.warning("%s: %s; sending the request again in %g s (retry %d of %d)", error.code().name,
                            error.details(), delay, retries, self.aborted_retries)
            time.sleep(delay)

    def _analyze_once(self, request: pb.AnalyzeRequest, progress: ProgressCallback | None,
                      deadline: float | None) -> Report:
        self._wait_until_ready(deadline)
        call = self._stub.Analyze(request, metadata=self._metadata, timeout=_remaining(deadline))
        report = None
        try:
            # Read the stream to its end, past the report: stopping at the report would cancel
            # the call, and the server would count a finished analysis as CANCELLED.
            for event in call:
                if event.HasField("report"):
                    report = Report(event.report)
                elif progress is not None:
                    progress(event)
        except grpc.RpcError:
            raise  # the call is over: analyze_request decides
        except BaseException:
            call.cancel()  # e.g. Ctrl-C: stop the work on the server too
            raise
        if report is None:
            raise CurvscopeError("INTERNAL", "the server closed the stream without a report")
        return report


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _retry_safe(error: grpc.RpcError) -> bool:
    """Whether the server marked this error as one after which the same request may be sent again."""
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    return any(key == RETRY_SAFE_METADATA and value == "1" for key, value in trailing or ())
