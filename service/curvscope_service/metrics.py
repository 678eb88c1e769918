"""Prometheus metrics of the service, all in one place.

Durations are ``*_seconds`` histograms with a status label (the gRPC status name), as in
MLServer and KServe. Everything lives in prometheus-client's default registry, served on
``--metrics-port`` by the server.
"""

from __future__ import annotations

import resource
import sys

import torch
from prometheus_client import Counter, Gauge, Histogram

_SLOW_BUCKETS = (0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

RPC_SECONDS = Histogram(
    "curvscope_rpc_seconds", "Wall time of gRPC calls, by method and status code.", ["method", "code"],
    buckets=_SLOW_BUCKETS,
)
REQUESTS = Counter(
    "curvscope_requests", "gRPC calls by method and status code, refused ones included.", ["method", "code"],
)
ANALYSIS_SECONDS = Histogram(
    "curvscope_analysis_seconds", "Wall time of one analysis of a request on its device, by analysis and status.",
    ["analysis", "status"], buckets=_SLOW_BUCKETS,
)
QUEUE_DEPTH = Gauge("curvscope_queue_depth", "Analyses waiting for a device.", ["device"])
RUNNING = Gauge("curvscope_running", "Analyses running on a device.", ["device"])
QUEUE_WAIT_SECONDS = Histogram(
    "curvscope_queue_wait_seconds", "Time a request waited in its device's queue before it started.", ["device"],
    buckets=_SLOW_BUCKETS,
)
HVPS = Counter(
    "curvscope_hvps", "Curvature-vector products computed (Hessian, GGN or Fisher), by device and curvature.",
    ["device", "curvature"],
)
CACHE_REQUESTS = Counter(
    "curvscope_cache_requests",
    "Analyze calls by how they were served: hit (a stored report), shared (joined an identical one in "
    "flight) or miss (computed).", ["outcome"],
)
STORE_BYTES = Gauge("curvscope_store_bytes", "Bytes held in the store, by kind.", ["kind"])
STORE_EVICTIONS = Counter("curvscope_store_evictions", "Files removed by the store's garbage collection.", ["kind"])
SOLVER_PROCESSES = Gauge(
    "curvscope_solver_processes",
    "Live SDP solver subprocesses, by state: busy (starting or solving) or idle (warm, waiting for a solve).",
    ["state"],
)
SOLVES = Counter(
    "curvscope_solves",
    "SDP solves sent to solver subprocesses, by outcome: ok (the solver answered), memory (over the memory cap), "
    "time_cap, cancelled (the caller went away or its deadline passed), killed (the process was killed from "
    "outside) or failed.", ["outcome"],
)
DEVICE_MEMORY_PEAK = Gauge(
    "curvscope_device_memory_peak_bytes",
    "Peak memory of the last analysis on a CUDA device; on the CPU, the process's peak resident set.", ["device"],
)


def record_device_peak(device: str) -> None:
    """Publish the memory peak of the analysis that just ran on ``device``, then reset it."""
    if device.startswith("cuda"):
        DEVICE_MEMORY_PEAK.labels(device).set(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        return
    # ru_maxrss is in KiB on Linux, bytes on macOS; the CPU has no per-analysis peak to reset.
    scale = 1 if sys.platform == "darwin" else 1024
    DEVICE_MEMORY_PEAK.labels(device).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
