"""Server configuration from flags, with environment variables as defaults (for Kubernetes)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from .engine import EngineLimits


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CURVSCOPE_{name}", default)


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    store: Path = Path("curvscope-store")
    device: str = "auto"
    model_roots: list[Path] = field(default_factory=list)
    max_upload_bytes: int = 4 << 30
    max_queue_depth: int = 16
    threads: int = 0
    shutdown_grace_seconds: float = 30.0
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)

    def tokens(self) -> list[str]:
        """Accepted bearer tokens: one per line of the token file, plus CURVSCOPE_TOKENS (comma-separated)."""
        tokens = [t.strip() for t in os.environ.get("CURVSCOPE_TOKENS", "").split(",") if t.strip()]
        if self.token_file:
            tokens += [line.strip() for line in self.token_file.read_text().splitlines() if line.strip()]
        return tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvscope serve", description="Run the curvscope gRPC server. Every flag has a CURVSCOPE_* environment default.")
    parser.add_argument("--host", default=_env("HOST", "[::]"), help="address to bind (CURVSCOPE_HOST)")
    parser.add_argument("--port", type=int, default=int(_env("PORT", "50051")), help="gRPC port; 0 picks a free one (CURVSCOPE_PORT)")
    parser.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "9090")),
                        help="Prometheus /metrics port; 0 disables (CURVSCOPE_METRICS_PORT)")
    parser.add_argument("--store", type=Path, default=Path(_env("STORE", "curvscope-store")),
                        help="directory of the blob store (CURVSCOPE_STORE)")
    parser.add_argument("--device", default=_env("DEVICE", "auto"),
                        help="auto (every CUDA device, else cpu), cpu, or cuda:N (CURVSCOPE_DEVICE)")
    parser.add_argument("--model-root", type=Path, action="append",
                        default=[Path(p) for p in _env("MODEL_ROOTS", "").split(os.pathsep) if p],
                        help="read-only directory that file:// model URIs may point into; repeatable (CURVSCOPE_MODEL_ROOTS)")
    parser.add_argument("--max-upload-bytes", type=int, default=int(_env("MAX_UPLOAD_BYTES", str(4 << 30))),
                        help="largest accepted upload (CURVSCOPE_MAX_UPLOAD_BYTES)")
    parser.add_argument("--max-queue-depth", type=int, default=int(_env("MAX_QUEUE_DEPTH", "16")),
                        help="waiting analyses per device before RESOURCE_EXHAUSTED (CURVSCOPE_MAX_QUEUE_DEPTH)")
    parser.add_argument("--threads", type=int, default=int(_env("THREADS", "0")),
                        help="torch CPU threads; 0 keeps torch's default (CURVSCOPE_THREADS)")
    parser.add_argument("--micro-batch-size", type=int, default=int(_env("MICRO_BATCH_SIZE", "256")),
                        help="default samples per micro-batch of the products (CURVSCOPE_MICRO_BATCH_SIZE)")
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
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, store=args.store, device=args.device,
        model_roots=args.model_root, max_upload_bytes=args.max_upload_bytes, max_queue_depth=args.max_queue_depth,
        threads=args.threads, shutdown_grace_seconds=args.shutdown_grace, token_file=args.token_file,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        limits=EngineLimits(micro_batch_size=args.micro_batch_size, max_hvps=args.max_hvps),
    )
