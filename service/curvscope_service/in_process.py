"""A server in a background thread of this process, on loopback: the demo, notebooks and tests
run one to analyse through the client without a separate ``curvscope serve``."""

from __future__ import annotations

import asyncio
import threading

from .config import ServerConfig
from .server import RunningServer, start_server


class InProcessServer:
    """A server on a free loopback port in a background thread (tests, the demo, notebooks).

        with InProcessServer(ServerConfig(store=tmp)) as server:
            client = Client(server.target)
    """

    def __init__(self, config: ServerConfig) -> None:
        config.host, config.port, config.metrics_port = "127.0.0.1", 0, 0
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="curvscope-server", daemon=True)
        self.running: RunningServer | None = None

    @property
    def target(self) -> str:
        assert self.running is not None, "the server is not started"
        return f"127.0.0.1:{self.running.port}"

    def __enter__(self) -> "InProcessServer":
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start_server(self.config), self._loop).result()
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.shutdown(grace), self._loop).result()
            self.running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
