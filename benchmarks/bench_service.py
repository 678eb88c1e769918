"""The service on loopback: upload throughput and server memory, per-call overhead of a
trivial analysis (p50/p99), and analyses per second under concurrent load.

    python benchmarks/bench_service.py [--upload-mib 1024] [--upload-repeats 1] [--upload-only]
                                      [--calls 60] [--clients 8] [--threads 1]

The server runs in a child process (``curvscope serve``, ``--threads 1``) on its own store in a
temporary directory; its resident memory is sampled every 10 ms during each upload. Overhead =
client wall time of Analyze minus the engine's own ``seconds`` in the report: queueing, loading
and the transport. Every call uses its own seed, so none is answered from the result cache
(cache hits are timed separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from curvscope import Client
from curvscope._files import sha256_of_file
from curvscope_service.demo import write_demo_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's ServerProcess
from server_process import ServerProcess  # noqa: E402


def _file(path: Path, mib: int) -> Path:
    block = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        for i in range(mib):
            handle.write(block[:-8] + i.to_bytes(8, "little"))  # every MiB distinct
    return path


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(server: ServerProcess, path: Path) -> dict:
    """One ``Client.upload`` of a file the server does not hold, as a user runs it: the client's
    sha256 of the file, a StatBlob, then the stream (the server hashes and writes as it reads).
    The hash is timed apart beforehand, so stream = end to end minus the client's hash."""
    os.sync()  # the file just written must not be flushed to disk during the upload
    started = time.perf_counter()
    digest = sha256_of_file(path)
    hash_s = time.perf_counter() - started
    baseline = server.rss_bytes()
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(server.rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with Client(server.target) as client:
        server_cpu = _cpu_seconds(server.pid)
        started = time.perf_counter()
        assert client.upload(path) == digest
        total_s = time.perf_counter() - started
        server_cpu = _cpu_seconds(server.pid) - server_cpu
    stop.set()
    sampler.join()
    size = path.stat().st_size
    return {"mib": size >> 20, "hash_s": hash_s, "total_s": total_s,
            "stream_mb_s": size / 1e6 / (total_s - hash_s), "total_mb_s": size / 1e6 / total_s,
            "rss_growth_mib": (max(peak) - baseline) / 2**20, "server_cpu_s": server_cpu}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def overhead(server: ServerProcess, model: str, data: str, calls: int) -> dict:
    with Client(server.target) as client:
        client.analyze(model, data, eigen=1, seed=10**6)  # warm-up
        overheads, engine, hits = [], [], []
        for seed in range(calls):
            started = time.perf_counter()
            report = client.analyze(model, data, eigen=1, seed=seed)
            overheads.append(time.perf_counter() - started - report.message.seconds)
            engine.append(report.message.seconds)
        for seed in range(calls):
            started = time.perf_counter()
            client.analyze(model, data, eigen=1, seed=seed)
            hits.append(time.perf_counter() - started)
    return {"p50_ms": 1e3 * _percentile(overheads, 0.5), "p99_ms": 1e3 * _percentile(overheads, 0.99),
            "engine_p50_ms": 1e3 * statistics.median(engine),
            "hit_p50_ms": 1e3 * _percentile(hits, 0.5), "hit_p99_ms": 1e3 * _percentile(hits, 0.99)}


def load(server: ServerProcess, model: str, data: str, clients: int, per_client: int) -> dict:
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(first_seed: int) -> None:
        with Client(server.target) as client:
            for seed in range(first_seed, first_seed + per_client):
                client.analyze(model, data, eigen=1, seed=seed)
                with lock:
                    outcomes.append("OK")

    workers = [threading.Thread(target=run, args=(10**5 + i * per_client,)) for i in range(clients)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    return {"calls": len(outcomes), "seconds": elapsed, "per_second": len(outcomes) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--upload-repeats", type=int, default=1, help="uploads of each size (new files each time)")
    parser.add_argument("--upload-only", action="store_true", help="stop after the uploads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path, data_path = write_demo_files(root, steps=100)
        flags = ["--store", str(root / "store"), "--threads", str(args.threads), "--max-upload-bytes", str(8 << 30),
                 "--max-queue-depth", str(4 * args.clients)]
        with ServerProcess(flags) as server:
            print("upload (Client.upload: client sha256, then the stream; server RSS growth during the upload)")
            for mib in sorted({128, args.upload_mib}):
                for repeat in range(args.upload_repeats):
                    path = _file(root / f"blob-{mib}-{repeat}.bin", mib)
                    row = upload(server, path)
                    path.unlink()
                    print(f"  {row['mib']:5d} MiB: end to end {row['total_s']:.2f} s = {row['total_mb_s']:.0f} MB/s "
                          f"(client sha256 {row['hash_s']:.2f} s, stream {row['stream_mb_s']:.0f} MB/s), "
                          f"server CPU {row['server_cpu_s']:.2f} s, RSS +{row['rss_growth_mib']:.1f} MiB")
            if args.upload_only:
                return
            with Client(server.target) as client:
                model, data = f"sha256:{client.upload(model_path)}", f"sha256:{client.upload(data_path)}"
            row = overhead(server, model, data, args.calls)
            print(f"overhead of a trivial analysis (top eigenvalue, digits MLP, {args.calls} calls): "
                  f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms (engine p50 {row['engine_p50_ms']:.1f} ms); "
                  f"cache hit p50 {row['hit_p50_ms']:.1f} ms, p99 {row['hit_p99_ms']:.1f} ms")
            sequential = load(server, model, data, 1, args.calls // 2)
            concurrent = load(server, model, data, args.clients, max(1, args.calls // args.clients))
            print(f"throughput: 1 client {sequential['per_second']:.1f} analyses/s; {args.clients} clients "
                  f"{concurrent['per_second']:.1f} analyses/s ({concurrent['calls']} calls, one worker)")


if __name__ == "__main__":
    main()
