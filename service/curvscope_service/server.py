"""Server assembly and lifecycle: grpc.aio, health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
import torch
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc

from .config import ServerConfig, config_from_args
from .interceptors import ErrorMappingInterceptor, TokenAuthInterceptor
from .logging_setup import configure_logging
from .scheduler import Scheduler
from .servicer import UPLOAD_CHUNK_BYTES, CurvscopeServicer
from .store import BlobStore
from .upload_wire import ZeroCopyUploadInterceptor

log = logging.getLogger("curvscope")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Curvscope"].full_name  # "curvscope.v1.Curvscope"
MAX_MESSAGE_BYTES = 4 * UPLOAD_CHUNK_BYTES + (64 << 10)
# An Analyze stream can be silent for minutes (a solve). Clients ping every 30 s during a call
# (curvscope.client.KEEPALIVE_OPTIONS): accept pings every 10 s, with or without calls, where
# grpc's default (one per 5 minutes) answers a third early ping with GOAWAY too_many_pings; and
# ping every minute, so the work of a client that vanished without closing is stopped.
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]


def resolve_devices(device: str) -> list[str]:
    """``auto`` = one worker per CUDA device, else the CPU."""
    if device == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if device == "cpu":
        return ["cpu"]
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: no CUDA device is available here")
        return [str(torch.device(device))]
    raise SystemExit(f"--device {device}: use auto, cpu or cuda:N")


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    scheduler: Scheduler
    config: ServerConfig
    store: BlobStore
    gc_task: asyncio.Task | None = None

    async def shutdown(self, grace: float | None = None) -> None:
        """Not ready, then drain: running calls get ``grace`` seconds, then are cancelled."""
        if self.gc_task is not None:
            self.gc_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.shutdown_grace_seconds if grace is None else grace)
        await asyncio.to_thread(self.scheduler.stop, 5.0)


async def _collect_garbage(store: BlobStore, interval: float) -> None:
    """Keep the store within its age and size bounds, off the event loop."""
    while True:
        try:
            await asyncio.to_thread(store.gc)
        except OSError as error:
            log.warning("store gc failed: %s", error)
        await asyncio.sleep(interval)


async def start_server(config: ServerConfig) -> RunningServer:
    if config.threads:
        torch.set_num_threads(config.threads)
    # Error mapping outermost: it counts, times and logs the calls auth refuses too.
    interceptors: list[aio.ServerInterceptor] = [ErrorMappingInterceptor()]
    tokens = config.tokens()
    if tokens:
        interceptors.append(TokenAuthInterceptor(tokens))
    interceptors.append(ZeroCopyUploadInterceptor())  # innermost: Upload's chunks read without a copy
    server = aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *KEEPALIVE_OPTIONS],
    )
    store = BlobStore(config.store, config.model_roots, max_bytes=config.store_max_bytes,
                      max_age_seconds=config.store_max_age_seconds)
    scheduler = Scheduler(resolve_devices(config.device), config.max_queue_depth, concurrency=config.concurrency,
                          max_run_seconds=config.max_analysis_seconds)
    pb_grpc.add_CurvscopeServicer_to_server(CurvscopeServicer(config, store, scheduler), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=client_ca, require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"could not bind {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    gc_task = None
    if config.store_max_bytes or config.store_max_age_seconds:
        gc_task = asyncio.get_running_loop().create_task(_collect_garbage(store, config.gc_interval_seconds))
    return RunningServer(server, port, health_servicer, scheduler, config, store, gc_task)


def metrics_address(config: ServerConfig) -> str:
    """Where /metrics listens: ``--metrics-host``, else the gRPC host (so ``--host 127.0.0.1``
    does not leave the metrics open on every interface), without gRPC's IPv6 brackets."""
    host = config.metrics_host or config.host
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def start_metrics(config: ServerConfig) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on ``metrics_address(config)``:``config.metrics_port`` in a thread."""
    address = metrics_address(config)
    try:
        return start_http_server(config.metrics_port, addr=address)
    except OSError as error:
        # gRPC binds its [::] to 0.0.0.0 on a kernel without IPv6; so does this.
        if address != "::" or error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        return start_http_server(config.metrics_port, addr="0.0.0.0")


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_server(config)
    if config.metrics_port:
        start_metrics(config)
    log.info("curvscope listening on port %d (devices: %s)", running.port, ", ".join(running.scheduler.devices),
             extra={"port": running.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", config.shutdown_grace_seconds)
    await running.shutdown()


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_format)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
