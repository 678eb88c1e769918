"""Bounded per-device queues with one worker thread per device.

Compute runs off the event loop: each device (``cpu``, ``cuda:0``, ...) has one worker thread
that runs one job at a time, so a GPU never runs two analyses at once. A job reports back to
the asyncio side through an ``asyncio.Queue`` fed with ``call_soon_threadsafe``. Cancellation
and deadlines are checked by the job itself between products (``Job.check``), as grpc's own
examples do it: a flag set from the RPC's done-callback, read by the worker.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Cancelled, CurvscopeError, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# What a job runs: work(device, progress, check) -> result.
Work = Callable[[str, Callable[[dict], None], Callable[[], None]], Any]


@dataclass
class JobEvent:
    kind: str  # "queued" | "started" | "progress" | "done" | "error"
    payload: Any = None


@dataclass
class Job:
    work: Work
    loop: asyncio.AbstractEventLoop
    deadline: float | None  # time.monotonic() value
    id: int = field(default_factory=itertools.count().__next__)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    device: str = ""

    def post(self, kind: str, payload: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, JobEvent(kind, payload))

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        """Raise if the client went away or its deadline passed; called between products."""
        if self.cancelled.is_set():
            raise Cancelled("the analysis was cancelled by the client")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the client's deadline passed before the analysis finished")


class DeviceWorker:
    """One thread, one device, a FIFO of waiting jobs."""

    def __init__(self, device: str, max_queue_depth: int):
        self.device = device
        self.max_queue_depth = max_queue_depth
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"curvscope-worker-{device}", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        with self._condition:
            return len(self._waiting) + (self._running is not None)

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._stopping:
                raise Unavailable("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_queue_depth:
                raise ResourceExhausted(
                    f"the queue of {self.device} is full ({self.max_queue_depth} waiting); retry later"
                )
            job.device = self.device
            self._waiting.append(job)
            job.post("queued", len(self._waiting) - 1 + (self._running is not None))
            self._condition.notify()

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._waiting):
            job.post("queued", position)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                self._announce_positions()
            try:
                job.check()
                job.post("started")
                result = job.work(self.device, lambda p: job.post("progress", p), job.check)
                job.post("done", result)
            except CurvscopeError as error:
                job.post("error", error)
            except Exception as error:  # noqa: BLE001 - reported to the client as INTERNAL
                log.exception("analysis %s failed", job.id)
                job.post("error", error)
            finally:
                with self._condition:
                    self._running = None

    def stop(self, timeout: float | None) -> None:
        """Refuse new jobs, let the waiting and running ones finish or be cancelled, join."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)


class Scheduler:
    """Routes each job to the least-loaded device worker."""

    def __init__(self, devices: list[str], max_queue_depth: int):
        if not devices:
            raise ValueError("at least one device is needed")
        self.workers = [DeviceWorker(device, max_queue_depth) for device in devices]

    @property
    def devices(self) -> list[str]:
        return [worker.device for worker in self.workers]

    def submit(self, work: Work, *, timeout: float | None = None) -> Job:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        job = Job(work=work, loop=loop, deadline=deadline)
        worker = min(self.workers, key=lambda w: w.load)
        worker.submit(job)
        return job

    def stop(self, timeout: float | None = None) -> None:
        for worker in self.workers:
            worker.stop(timeout)
