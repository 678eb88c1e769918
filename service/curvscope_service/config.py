"""Server configuration from flags, with environment variables as defaults (for Kubernetes)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from curvscope._sizes import parse_bytes

from .engine import ServerLimits
from .logging_setup import LOG_FORMATS


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CURVSCOPE_{name}", default)


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    # Address of the /metrics endpoint; "" = the gRPC server's host (so --host 127.0.0.1 keeps
    # the metrics on loopback too).
    metrics_host: str = ""
    store: Path = Path("curvscope-store")
    device: str = "auto"
    model_roots: list[Path] = field(default_factory=list)
    max_upload_bytes: int = 4 << 30
    # Seconds an upload may wait for its next chunk before it is dropped (a stalled client
    # would otherwise hold a temporary file and a descriptor forever); 0 = wait forever.
    upload_idle_timeout_seconds: float = 60.0
    # Address space (MiB, plus 4x the file) of the child process that loads each new model or
    # batch before the server does, so a file that defeats a reader's caps kills that child, not
    # the server; 0 = load in the server's process only. `curvscope serve` defaults to 2048; a
    # server built in-process (the demo, a notebook, tests) serves its caller's own files.
    load_memory_mib: int = 0
    max_queue_depth: int = 16
    # Analyses running at once on one device (one per GPU: two would compete for its memory).
    concurrency: int = 1
    # Wall time one request may run on its device (queueing not counted); 0 = no cap.
    max_analysis_seconds: float = 3600.0
    # Garbage collection of the store: 0 = keep everything.
    store_max_bytes: int = 0
    store_max_age_seconds: float = 0.0
    gc_interval_seconds: float = 600.0
    log_format: str = "plain"
    threads: int = 0
    shutdown_grace_seconds: float = 30.0
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)

    def tokens(self) -> list[str]:
        """Accepted bearer tokens: one per line of the token file, plus CURVSCOPE_TOKENS (comma-separated)."""
        tokens = [t.strip() for t in os.environ.get("CURVSCOPE_TOKENS", "").split(",") if t.strip()]
        if self.token_file:
            tokens += [line.strip() for line in self.token_file.read_text().splitlines() if line.strip()]
        return tokens


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept as written."""


_SERVE_EXAMPLES = """examples:
  curvscope serve --host 127.0.0.1 --store ./store                 a server on this machine only
  curvscope serve --device cuda:0 --token-file tokens.txt           a shared GPU endpoint with bearer tokens
  curvscope serve --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem   mutual TLS
  curvscope serve --model-root /models --max-parameters 200000000   read-only model files, a size cap
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvscope serve", description="Run the curvscope gRPC server. Every flag has a CURVSCOPE_* environment default.",
        formatter_class=_HelpFormatter, epilog=_SERVE_EXAMPLES)
    parser.add_argument("--host", default=_env("HOST", "[::]"), help="address to bind (CURVSCOPE_HOST)")
    parser.add_argument("--port", type=int, default=int(_env("PORT", "50051")), help="gRPC port; 0 picks a free one (CURVSCOPE_PORT)")
    parser.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "9090")),
                        help="Prometheus /metrics port; 0 disables (CURVSCOPE_METRICS_PORT)")
    parser.add_argument("--metrics-host", default=_env("METRICS_HOST", ""),
                        help="address the /metrics endpoint binds; default: the --host address (CURVSCOPE_METRICS_HOST)")
    parser.add_argument("--store", type=Path, default=Path(_env("STORE", "curvscope-store")),
                        help="directory of the blob store (CURVSCOPE_STORE)")
    parser.add_argument("--device", default=_env("DEVICE", "auto"),
                        help="auto (every CUDA device, else cpu), cpu, or cuda:N (CURVSCOPE_DEVICE)")
    parser.add_argument("--model-root", type=Path, action="append",
                        default=[Path(p) for p in _env("MODEL_ROOTS", "").split(os.pathsep) if p],
                        help="read-only directory that file:// model URIs may point into; repeatable (CURVSCOPE_MODEL_ROOTS)")
    parser.add_argument("--max-upload-bytes", type=int, default=int(_env("MAX_UPLOAD_BYTES", str(4 << 30))),
                        help="largest accepted upload (CURVSCOPE_MAX_UPLOAD_BYTES)")
    parser.add_argument("--upload-idle-timeout", type=float, default=float(_env("UPLOAD_IDLE_TIMEOUT", "60")),
                        help="seconds an upload may send nothing before it is dropped with DEADLINE_EXCEEDED; "
                             "0 = wait forever (CURVSCOPE_UPLOAD_IDLE_TIMEOUT)")
    parser.add_argument("--load-memory-mib", type=int, default=int(_env("LOAD_MEMORY_MIB", "2048")),
                        help="address-space cap in MiB (plus 4x the file) of the child process that loads each new "
                             "input first; 0 = load in the server's process only (CURVSCOPE_LOAD_MEMORY_MIB)")
    parser.add_argument("--max-queue-depth", type=int, default=int(_env("MAX_QUEUE_DEPTH", "16")),
                        help="waiting analyses per device before RESOURCE_EXHAUSTED (CURVSCOPE_MAX_QUEUE_DEPTH)")
    parser.add_argument("--concurrency", type=int, default=int(_env("CONCURRENCY", "1")),
                        help="analyses running at once per device (CURVSCOPE_CONCURRENCY)")
    parser.add_argument("--max-parameters", type=int, default=int(_env("MAX_PARAMETERS", "0")),
                        help="largest model, in parameters; 0 = no cap (CURVSCOPE_MAX_PARAMETERS)")
    parser.add_argument("--max-samples", type=int, default=int(_env("MAX_SAMPLES", "0")),
                        help="largest batch analysed, in samples; 0 = no cap (CURVSCOPE_MAX_SAMPLES)")
    parser.add_argument("--max-analysis-seconds", type=float, default=float(_env("MAX_ANALYSIS_SECONDS", "3600")),
                        help="wall time a request may run on its device; 0 = no cap (CURVSCOPE_MAX_ANALYSIS_SECONDS)")
    parser.add_argument("--store-max-bytes", type=int, default=int(_env("STORE_MAX_BYTES", "0")),
                        help="garbage-collect the least recently used blobs and reports above this size; "
                             "0 = no cap (CURVSCOPE_STORE_MAX_BYTES)")
    parser.add_argument("--store-max-age", type=float, default=float(_env("STORE_MAX_AGE", "0")),
                        help="garbage-collect blobs and reports unused for this many seconds; 0 = keep "
                             "(CURVSCOPE_STORE_MAX_AGE)")
    parser.add_argument("--gc-interval", type=float, default=float(_env("GC_INTERVAL", "600")),
                        help="seconds between garbage collections of the store (CURVSCOPE_GC_INTERVAL)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=_env("LOG_FORMAT", "plain"),
                        help="plain text or JSON lines, each with its request id (CURVSCOPE_LOG_FORMAT)")
    parser.add_argument("--threads", type=int, default=int(_env("THREADS", "0")),
                        help="torch CPU threads; 0 keeps torch's default (CURVSCOPE_THREADS)")
    parser.add_argument("--micro-batch-size", type=int, default=int(_env("MICRO_BATCH_SIZE", "256")),
                        help="default samples per micro-batch of the products (CURVSCOPE_MICRO_BATCH_SIZE)")
    parser.add_argument("--memory-budget", type=_byte_count, default=_env("MEMORY_BUDGET", "0"), metavar="BYTES",
                        help="memory one analysis may plan for, e.g. 40GB or 60GiB; 0 = the device's free memory "
                             "(a GPU) or the machine's available memory (CURVSCOPE_MEMORY_BUDGET)")
    parser.add_argument("--max-hvps", type=int, default=int(_env("MAX_HVPS", "2000")),
                        help="largest product budget one analysis may ask for (CURVSCOPE_MAX_HVPS)")
    parser.add_argument("--shutdown-grace", type=float, default=float(_env("SHUTDOWN_GRACE", "30")),
                        help="seconds running calls get to finish on SIGTERM (CURVSCOPE_SHUTDOWN_GRACE)")
    parser.add_argument("--token-file", type=Path, default=_optional_path("TOKEN_FILE"),
                        help="file of accepted bearer tokens, one per line (CURVSCOPE_TOKEN_FILE)")
    parser.add_argument("--tls-cert", type=Path, default=_optional_path("TLS_CERT"), help="PEM certificate (CURVSCOPE_TLS_CERT)")
    parser.add_argument("--tls-key", type=Path, default=_optional_path("TLS_KEY"), help="PEM private key (CURVSCOPE_TLS_KEY)")
    parser.add_argument("--tls-client-ca", type=Path, default=_optional_path("TLS_CLIENT_CA"),
                        help="CA bundle; when set, clients must present a certificate (CURVSCOPE_TLS_CLIENT_CA)")
    return parser


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _optional_path(name: str) -> Path | None:
    value = _env(name, "")
    return Path(value) if value else None


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    for name in ("max_upload_bytes", "max_queue_depth", "concurrency", "max_parameters", "max_samples",
                 "max_analysis_seconds", "store_max_bytes", "store_max_age", "gc_interval", "upload_idle_timeout",
                 "load_memory_mib"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if not math.isfinite(args.upload_idle_timeout):
        parser.error("--upload-idle-timeout must be a number of seconds (0 = wait forever)")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.gc_interval <= 0:
        parser.error("--gc-interval must be positive")
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        store=args.store, device=args.device, model_roots=args.model_root, max_upload_bytes=args.max_upload_bytes,
        upload_idle_timeout_seconds=args.upload_idle_timeout, load_memory_mib=args.load_memory_mib,
        max_queue_depth=args.max_queue_depth,
        concurrency=args.concurrency, max_analysis_seconds=args.max_analysis_seconds,
        store_max_bytes=args.store_max_bytes, store_max_age_seconds=args.store_max_age,
        gc_interval_seconds=args.gc_interval, log_format=args.log_format,
        threads=args.threads, shutdown_grace_seconds=args.shutdown_grace, token_file=args.token_file,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        limits=ServerLimits(micro_batch_size=args.micro_batch_size, max_products=args.max_hvps,
                            memory_budget_bytes=args.memory_budget,
                            max_parameters=args.max_parameters, max_samples=args.max_samples),
    )
