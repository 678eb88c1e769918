"""``ServerProcess``: the server in a child process, for the fault, load and hostile-input tests
and benchmarks/bench_service.py (which puts this directory on its import path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServerProcess:
    """``curvscope serve`` in a child process on a free loopback port, logging JSON lines
    (fault tests, load tests and benchmarks: it can be killed, and its memory measured).

        with ServerProcess(["--store", str(tmp)]) as server:
            client = Client(server.target)
    """

    def __init__(self, flags: list[str], env: dict[str, str] | None = None, startup_seconds: float = 60.0) -> None:
        command = [sys.executable, "-m", "curvscope_service.server", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--log-format", "json", *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        self.log: list[dict] = []
        self.port = 0
        ready = threading.Event()

        def read() -> None:
            # Drain stderr for the child's whole life, so a full pipe never blocks it.
            for line in self.process.stderr:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = {"message": line.rstrip()}
                self.log.append(entry)
                if "port" in entry and not self.port:
                    self.port = int(entry["port"])
                    ready.set()
            ready.set()

        threading.Thread(target=read, name="curvscope-server-log", daemon=True).start()
        deadline = time.monotonic() + startup_seconds
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start in time")
        if not self.port:
            raise RuntimeError(f"the server exited with {self.process.wait()}: {self.log[-5:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident memory of the server now (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a node dies."""
        self.process.kill()
        self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown); returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
