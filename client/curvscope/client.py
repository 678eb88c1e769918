"""``curvscope.Client``: upload a checkpoint and a batch, analyse them, get a typed report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor

from ._files import CHUNK_BYTES, sha256_of_file
from ._proto.curvscope.v1 import curvscope_pb2 as pb
from ._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from .report import Report, message_to_dict

DEFAULT_SERVER = "localhost:50051"
ProgressCallback = Callable[[pb.AnalyzeEvent], None]
# The curvature matrices and trace estimators a request can name (the report's spelling).
CURVATURES = {"hessian": pb.CURVATURE_HESSIAN, "ggn": pb.CURVATURE_GGN, "fisher": pb.CURVATURE_FISHER,
              "empirical_fisher": pb.CURVATURE_EMPIRICAL_FISHER}
TRACE_METHODS = {"hutchinson": pb.TRACE_METHOD_HUTCHINSON, "hutchpp": pb.TRACE_METHOD_HUTCH_PLUS_PLUS,
                 "xtrace": pb.TRACE_METHOD_XTRACE}


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
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"could not reach the server ({details})"
        return cls(code.name, details or code.name)


def build_request(
    model: pb.ModelRef, data: pb.DataRef | None = None, *, loss: str = "cross_entropy",
    eigen: int = 1, smallest: int = 0, tolerance: float = 0.0, max_hvps: int = 0,
    trace: bool = False, density: bool = False, sharpness: bool = False, non_uniformity: bool = False,
    lipschitz: bool = False, learning_rate: float = 0.0, batch_size: int = 0,
    per_layer: bool = False, seed: int = 0, precision: str = "float32", micro_batch_size: int = 0,
    max_samples: int = 0, curvature: str | None = None,
    trace_method: str | None = None, trace_max_hvps: int = 0, trace_tolerance: float = 0.0, frobenius: bool = False,
    density_steps: int = 0, density_probes: int = 0, density_grid: int = 0, density_sigma: float = 0.0,
    epsilon_sharpness: bool = False, adaptive_sharpness: bool = False, weight_spectra: bool = False,
    spec_fields: Mapping[str, Mapping[str, Any]] | None = None,
) -> pb.AnalyzeRequest:
    """The request the CLI and ``Client.analyze`` send; one analysis entry per flag.

    ``curvature`` is one of CURVATURES (None: the server's default, the Hessian); ``trace_method``
    one of TRACE_METHODS (None: the server's choice). Zeros leave a setting to the server.
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
            lanczos_steps=density_steps, num_probes=density_probes, grid_points=density_grid, sigma=density_sigma)))
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
    request = pb.AnalyzeRequest(
        model=model, loss=loss, analyses=analyses,
        options=pb.AnalysisOptions(seed=seed, per_layer=per_layer, precision=precisions[precision],
                                   micro_batch_size=micro_batch_size, max_samples=max_samples,
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

    Scaling out: ``load_balancing="round_robin"`` spreads the calls over every address the
    target resolves to (``dns:///curvscope-headless.ml.svc:50051``, or
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``); the replicas must share their blob store.
    ``options`` are passed to the gRPC channel as they are.
    """

    def __init__(self, target: str | None = None, *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls: bool = False, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 load_balancing: str | None = None, options: Sequence[tuple[str, Any]] = ()):
        self.target = target or os.environ.get("CURVSCOPE_SERVER") or DEFAULT_SERVER
        token = token if token is not None else os.environ.get("CURVSCOPE_TOKEN")
        self._metadata = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        channel_options = list(options)
        if load_balancing:
            channel_options.append(("grpc.lb_policy_name", load_balancing))
        if bool(tls_cert) != bool(tls_key):
            raise CurvscopeError("INVALID_ARGUMENT", "tls_cert and tls_key go together (--tls-cert, --tls-key)")
        if tls or tls_ca or tls_cert:
            # tls_ca: the server's CA (else the system roots); tls_cert/tls_key: this client's
            # certificate, for servers that require mutual TLS.
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert))
            self._channel = grpc.secure_channel(self.target, credentials, channel_options)
        else:
            self._channel = grpc.insecure_channel(self.target, channel_options)
        self._stub = pb_grpc.CurvscopeStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise CurvscopeError.from_rpc(error) from None

    # -- blobs --------------------------------------------------------------------------------
    def stat(self, sha256: str) -> pb.BlobInfo | None:
        """The stored blob's info, or None when the server does not have it."""
        try:
            return self._call(self._stub.StatBlob, pb.BlobRef(sha256=sha256))
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

        return self._call(self._stub.Upload, chunks()).sha256

    def model_ref(self, model: str | Path, **options: Any) -> pb.ModelRef:
        """A local path (uploaded), a ``file://`` URI on the server, or ``sha256:<digest>``."""
        ref = pb.ModelRef(**options)
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
        return message_to_dict(self._call(self._stub.GetCapabilities, pb.GetCapabilitiesRequest()))

    def describe(self, model: str | Path, **model_options: Any) -> dict[str, Any]:
        return message_to_dict(self._call(self._stub.DescribeModel, self.model_ref(model, **model_options)))

    def analyze(self, model: str | Path, data: str | Path | None = None, *, progress: ProgressCallback | None = None,
                timeout: float | None = None, **options: Any) -> Report:
        """Analyse a model on a batch. ``options`` are those of ``build_request``
        (eigen=5, smallest=2, per_layer=True, loss="mse", weight_spectra=True,
        spec_fields={"non_uniformity": {"method": "gauss_newton"}}, ...)."""
        request = build_request(self.model_ref(model), self.data_ref(data) if data is not None else None, **options)
        return self.analyze_request(request, progress=progress, timeout=timeout)

    def analyze_request(self, request: pb.AnalyzeRequest, *, progress: ProgressCallback | None = None,
                        timeout: float | None = None) -> Report:
        """Send a prepared request; ``progress`` sees every Queued and Progress event."""
        call = self._stub.Analyze(request, metadata=self._metadata, timeout=timeout)
        report = None
        try:
            # Read the stream to its end, past the report: stopping at the report would cancel
            # the call, and the server would count a finished analysis as CANCELLED.
            for event in call:
                if event.HasField("report"):
                    report = Report(event.report)
                elif progress is not None:
                    progress(event)
        except grpc.RpcError as error:
            raise CurvscopeError.from_rpc(error) from None
        except BaseException:
            call.cancel()  # e.g. Ctrl-C: stop the work on the server too
            raise
        if report is None:
            raise CurvscopeError("INTERNAL", "the server closed the stream without a report")
        return report
