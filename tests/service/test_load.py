"""Load on loopback: 50 concurrent Analyze calls from several client processes against a server
whose queue holds 4. Each call completes or is refused with RESOURCE_EXHAUSTED, none hangs, and
the server's memory returns to its baseline."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from curvscope import Client
from curvscope_service.server import ServerProcess

PROCESSES, THREADS_EACH = 5, 10
CALL_TIMEOUT = 60.0

# One client process: THREADS_EACH calls at once, each with its own seed (no two share a
# computation or a cached report), one JSON line per outcome.
CLIENT = """
import json, sys, threading, time
from curvscope import Client, CurvscopeError
target, model, data, first_seed, threads, timeout = sys.argv[1:7]
lock = threading.Lock()
def call(seed):
    started = time.monotonic()
    try:
        with Client(target) as client:
            report = client.analyze("sha256:" + model, "sha256:" + data, eigen=2, seed=seed, timeout=float(timeout))
        outcome = "OK" if report.results.hessian_eigen.largest else "EMPTY"
    except CurvscopeError as error:
        outcome = error.code
    with lock:
        print(json.dumps({"seed": seed, "outcome": outcome, "seconds": time.monotonic() - started}), flush=True)
workers = [threading.Thread(target=call, args=(int(first_seed) + i,)) for i in range(int(threads))]
for w in workers: w.start()
for w in workers: w.join()
"""


def test_fifty_concurrent_calls_against_a_queue_of_four(tmp_path, digits_files):
    model_path, data_path = digits_files
    with ServerProcess(["--store", str(tmp_path / "store"), "--max-queue-depth", "4", "--threads", "1"]) as server:
        with Client(server.target) as client:
            model, data = client.upload(model_path), client.upload(data_path)
            # Warm up (first products allocate torch's caches), then take the baseline.
            for seed in range(3):
                client.analyze(f"sha256:{model}", f"sha256:{data}", eigen=2, seed=10_000 + seed)
            baseline = server.rss_bytes()
            started = time.monotonic()
            clients = [subprocess.Popen(
                [sys.executable, "-c", CLIENT, server.target, model, data, str(p * THREADS_EACH), str(THREADS_EACH),
                 str(CALL_TIMEOUT)], stdout=subprocess.PIPE, text=True) for p in range(PROCESSES)]
            outcomes = []
            for process in clients:
                out, _ = process.communicate(timeout=CALL_TIMEOUT + 60)  # none hangs
                assert process.returncode == 0
                outcomes += [json.loads(line) for line in out.splitlines()]
            elapsed = time.monotonic() - started
            assert len(outcomes) == PROCESSES * THREADS_EACH
            codes = [o["outcome"] for o in outcomes]
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
            # The queue really was full, and what it took was served.
            assert codes.count("OK") >= 5 and codes.count("RESOURCE_EXHAUSTED") >= 1, codes
            assert max(o["seconds"] for o in outcomes) < CALL_TIMEOUT and elapsed < CALL_TIMEOUT + 30
            # The server is idle and answers at once.
            assert client.capabilities()["limits"]["max_queue_depth"] == 4
            after = server.rss_bytes()
            # Memory back at its baseline: what 50 calls left behind is bounded (allocator
            # slack), not proportional to the calls.
            assert after - baseline < 64 << 20, (baseline >> 20, after >> 20)
            # Every call was logged with its outcome. (A client that closes its channel as soon as
            # the report arrives can leave the server's side of the stream CANCELLED.)
            logged = [e["code"] for e in server.log if e.get("method") == "/curvscope.v1.Curvscope/Analyze"][-50:]
            assert logged.count("RESOURCE_EXHAUSTED") == codes.count("RESOURCE_EXHAUSTED")
            assert logged.count("OK") + logged.count("CANCELLED") == codes.count("OK")
