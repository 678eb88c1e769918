"""Load on loopback: 50 concurrent Analyze calls from several client processes against a server
whose queue holds 4. Each call completes or is refused with RESOURCE_EXHAUSTED, none hangs, and
the server's memory returns to its baseline."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from curvscope import Client
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc
from server_process import ServerProcess

PROCESSES, THREADS_EACH, QUEUE = 5, 10, 4
CALLS = PROCESSES * THREADS_EACH
# Every bound below only turns a hang into a failure: nothing in this test is timed.
HANG = 600.0
LONG_HVPS = 10**7
ANALYZE = "/curvscope.v1.Curvscope/Analyze"

# One client process: THREADS_EACH calls at once, each with its own seed (no two share a
# computation or a cached report), one JSON line per outcome.
CLIENT = """
import json, sys, threading
from curvscope import Client, CurvscopeError
target, model, data, first_seed, threads, timeout = sys.argv[1:7]
lock = threading.Lock()
def call(seed):
    try:
        with Client(target) as client:
            report = client.analyze("sha256:" + model, "sha256:" + data, eigen=2, seed=seed, timeout=float(timeout))
        outcome = "OK" if report.results.hessian_eigen.largest else "EMPTY"
    except CurvscopeError as error:
        outcome = error.code
    with lock:
        print(json.dumps({"seed": seed, "outcome": outcome}), flush=True)
workers = [threading.Thread(target=call, args=(int(first_seed) + i,)) for i in range(int(threads))]
for w in workers: w.start()
for w in workers: w.join()
"""


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {HANG:g} s"
        time.sleep(0.02)


def _anonymous_rss(pid: int) -> int:
    """The server's resident anonymous memory: the heap, without the pages of mapped libraries
    that a code path's first use brings in."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon line")


def _analyze_log(server: ServerProcess) -> list[str]:
    return [entry["code"] for entry in list(server.log) if entry.get("method") == ANALYZE]


def _hold(server: ServerProcess, blocker: pb.AnalyzeRequest) -> tuple[grpc.Channel, grpc.Future]:
    """A long analysis, once it runs (the device is then busy until it is cancelled)."""
    channel = grpc.insecure_channel(server.target)
    held = pb_grpc.CurvscopeStub(channel).Analyze(blocker)
    next(event for event in held if event.HasField("progress"))
    return channel, held


def _round(server: ServerProcess, model: str, data: str, blocker: pb.AnalyzeRequest) -> list[str]:
    """CALLS calls at once while a long analysis holds the device: the queue fills, the rest is
    refused; then the long one is cancelled and the queued ones are served. Their outcomes."""
    channel, held = _hold(server, blocker)
    clients = [subprocess.Popen(
        [sys.executable, "-c", CLIENT, server.target, model, data, str(p * THREADS_EACH), str(THREADS_EACH),
         str(HANG)], stdout=subprocess.PIPE, text=True) for p in range(PROCESSES)]
    outcomes: list[str] = []

    def read(process: subprocess.Popen) -> None:
        outcomes.extend(json.loads(line)["outcome"] for line in process.stdout)

    readers = [threading.Thread(target=read, args=(process,), daemon=True) for process in clients]
    for reader in readers:
        reader.start()
    # While the device is held, QUEUE calls wait and every other one is refused.
    _wait_for(lambda: len(outcomes) >= CALLS - QUEUE or any(process.poll() for process in clients),
              "answers to the calls the queue could not take")
    assert outcomes == ["RESOURCE_EXHAUSTED"] * (CALLS - QUEUE), outcomes
    held.cancel()
    channel.close()
    for process, reader in zip(clients, readers):
        assert process.wait(HANG) == 0  # none hangs
        reader.join(HANG)
    return outcomes


def test_fifty_concurrent_calls_against_a_queue_of_four(tmp_path, digits_files):
    model_path, data_path = digits_files
    flags = ["--store", str(tmp_path / "store"), "--max-queue-depth", str(QUEUE), "--threads", "1",
             "--max-hvps", str(LONG_HVPS)]
    with ServerProcess(flags) as server, Client(server.target) as client:
        model, data = client.upload(model_path), client.upload(data_path)

        def blocker(seed: int) -> pb.AnalyzeRequest:
            """Ends only when cancelled: a tolerance float32 products never reach, within a
            budget of products no test waits for."""
            return pb.AnalyzeRequest(
                model=pb.ModelRef(blob=pb.BlobRef(sha256=model)), data=pb.DataRef(blob=pb.BlobRef(sha256=data)),
                loss="cross_entropy", options=pb.AnalysisOptions(seed=seed),
                analyses=[pb.AnalysisSpec(hessian_eigen=pb.HessianEigenSpec(top_k=40, tolerance=1e-9,
                                                                             max_hvps=LONG_HVPS))])

        # Warm up with what the round runs (the long analysis, held and cancelled, then analyses
        # of the digits): torch's caches and the allocator's pools are in place before the
        # baseline.
        channel, held = _hold(server, blocker(10_000))
        held.cancel()
        channel.close()
        for seed in range(3):
            client.analyze(f"sha256:{model}", f"sha256:{data}", eigen=2, seed=20_000 + seed)
        _wait_for(lambda: len(_analyze_log(server)) == 4, "log lines of the warm-up")
        baseline = _anonymous_rss(server.pid)

        codes = _round(server, model, data, blocker(10_001))
        assert len(codes) == CALLS
        # The queue really was full, and what it took was served.
        assert codes.count("OK") == QUEUE and codes.count("RESOURCE_EXHAUSTED") == CALLS - QUEUE, codes
        # Every call was logged with its outcome, the cancelled long one too. (A client that
        # closes its channel as soon as the report arrives can leave the server's side of the
        # stream CANCELLED.)
        _wait_for(lambda: len(_analyze_log(server)) == 4 + CALLS + 1, "log lines of every call")
        logged = _analyze_log(server)[4:]
        assert logged.count("RESOURCE_EXHAUSTED") == CALLS - QUEUE
        assert logged.count("OK") + logged.count("CANCELLED") == QUEUE + 1, logged
        # The server is idle and answers.
        assert client.capabilities()["limits"]["max_queue_depth"] == QUEUE
        after = _anonymous_rss(server.pid)
        # Memory back at its baseline: what 50 calls left behind is bounded (allocator slack),
        # not proportional to the calls.
        assert after - baseline < 64 << 20, (baseline >> 20, after >> 20)
