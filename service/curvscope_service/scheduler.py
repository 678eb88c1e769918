"""Bounded per-device queues, a fixed number of worker threads per device, shared jobs.

Compute runs off the event loop: each device (``cpu``, ``cuda:0``, ...) has ``concurrency``
worker threads (one by default, so a GPU never runs two analyses at once) fed from one FIFO
of bounded depth. A job reports back to the asyncio side through one ``asyncio.Queue`` per
subscriber, fed with ``call_soon_threadsafe``. Identical requests (same key) share one job:
every caller subscribes to its events, and the work is cancelled only when all of them went
away. Cancellation and deadlines are checked by the job itself between products
(``Job.check``), as grpc's own examples do it: a flag set from the RPC's done-callback, read
by the worker.
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

from . import metrics
from .errors import Cancelled, CurvscopeError, DeadlineExceeded, ResourceExhausted, Unavailable
from .logging_setup import REQUEST_ID

log = logging.getLogger(__name__)

# What a job runs: work(device, progress, check) -> result.
Work = Callable[[str, Callable[[dict], None], Callable[[], None]], Any]


@dataclass
class JobEvent:
    kind: str  # "queued" | "started" | "progress" | "done" | "error"
    payload: Any = None


@dataclass
class Job:
    """One piece of device work and the callers waiting for its events."""

    work: Work
    loop: asyncio.AbstractEventLoop
    key: str | None = None
    request_id: str = ""
    # Wall time the work may run once started (0 = no cap); queueing is not counted.
    max_run_seconds: float = 0.0
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)
    device: str = ""
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    position: int | None = None
    # Called once, in a worker thread, when the job has ended or was dropped unstarted.
    on_finish: list[Callable[[], None]] = field(default_factory=list)
    _subscribers: dict[int, "Ticket"] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False  # the final event was posted: nobody may join any more
    _finished: bool = False

    def post(self, kind: str, payload: Any = None) -> None:
        if kind == "queued":
            self.position = payload
        with self._lock:
            self._closed = self._closed or kind in ("done", "error")
            tickets = list(self._subscribers.values())
        for ticket in tickets:
            self.loop.call_soon_threadsafe(ticket.events.put_nowait, JobEvent(kind, payload))

    def subscribe(self, deadline: float | None) -> "Ticket | None":
        """A new caller's view of this job, or None when it is already over or abandoned."""
        with self._lock:
            if self._closed or self.cancelled.is_set():
                return None
            ticket = Ticket(self, deadline)
            self._subscribers[ticket.id] = ticket
        if self.started is None and self.position is not None:
            ticket.events.put_nowait(JobEvent("queued", self.position))
        return ticket

    def unsubscribe(self, ticket: "Ticket") -> None:
        with self._lock:
            self._subscribers.pop(ticket.id, None)
            abandoned = not self._subscribers
        if abandoned:
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()

    def deadline(self) -> float | None:
        """The latest deadline of the callers still waiting (None when one has none)."""
        with self._lock:
            deadlines = [ticket.deadline for ticket in self._subscribers.values()]
        if not deadlines or any(d is None for d in deadlines):
            return None
        return max(deadlines)

    def check(self) -> None:
        """Raise if every caller went away, their deadlines passed, or the work ran past the
        server's cap; called between products."""
        if self.cancelled.is_set():
            raise Cancelled("the analysis was cancelled by the client")
        now = time.monotonic()
        deadline = self.deadline()
        if deadline is not None and now > deadline:
            raise DeadlineExceeded("the client's deadline passed before the analysis finished")
        if self.max_run_seconds and self.started is not None and now - self.started > self.max_run_seconds:
            raise ResourceExhausted(
                f"the analysis ran past this server's limit of {self.max_run_seconds:g} s; "
                "ask for fewer products (max_hvps), fewer samples or fewer analyses")

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        for callback in self.on_finish:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a cleanup must not kill the worker
                log.exception("cleanup of job %s failed", self.id)


@dataclass
class Ticket:
    """One caller of a job: its own event queue and deadline."""

    job: Job
    deadline: float | None
    id: int = field(default_factory=itertools.count().__next__)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        """This caller went away; the work stops when it was the last one."""
        self.job.unsubscribe(self)


class DeviceWorker:
    """``concurrency`` threads, one device, one FIFO of waiting jobs."""

    def __init__(self, device: str, max_queue_depth: int, concurrency: int = 1):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.device = device
        self.max_queue_depth = max_queue_depth
        self.concurrency = concurrency
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[int] = set()
        self._condition = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, name=f"curvscope-worker-{device}-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def load(self) -> int:
        with self._condition:
            return len(self._waiting) + len(self._running)

    def _publish(self) -> None:
        metrics.QUEUE_DEPTH.labels(self.device).set(len(self._waiting))
        metrics.RUNNING.labels(self.device).set(len(self._running))

    def submit(self, job: Job) -> None:
        with self._condition:
            self._drop_abandoned()
            if self._stopping:
                raise Unavailable("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_queue_depth:
                raise ResourceExhausted(
                    f"the queue of {self.device} is full ({self.max_queue_depth} waiting); retry later"
                )
            job.device = self.device
            self._waiting.append(job)
            job.post("queued", len(self._waiting) - 1)
            self._publish()
            self._condition.notify()

    def _drop_abandoned(self) -> None:
        # A job whose callers all went away before it started must not hold a place in the queue.
        abandoned = [job for job in self._waiting if job.cancelled.is_set()]
        if abandoned:
            self._waiting = collections.deque(job for job in self._waiting if not job.cancelled.is_set())
            for job in abandoned:
                job.finish()
            self._announce_positions()

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
                self._running.add(job.id)
                job.started = time.monotonic()
                self._announce_positions()
                self._publish()
            metrics.QUEUE_WAIT_SECONDS.labels(self.device).observe(job.started - job.submitted)
            token = REQUEST_ID.set(job.request_id)
            try:
                job.check()
                job.post("started")
                result = job.work(self.device, lambda p: job.post("progress", p), job.check)
                job.post("done", result)
            except CurvscopeError as error:
                log.info("analysis %s ended: %s: %s", job.id, error.code, error)
                job.post("error", error)
            except Exception as error:  # noqa: BLE001 - reported to the client as INTERNAL
                log.exception("analysis %s failed", job.id)
                job.post("error", error)
            finally:
                REQUEST_ID.reset(token)
                job.finish()
                with self._condition:
                    self._running.discard(job.id)
                    self._publish()

    def stop(self, timeout: float | None) -> None:
        """Refuse new jobs, let the waiting and running ones finish or be cancelled, join."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))


class Scheduler:
    """Routes each job to the least-loaded device worker; identical keys share one job."""

    def __init__(self, devices: list[str], max_queue_depth: int, *, concurrency: int = 1,
                 max_run_seconds: float = 0.0):
        if not devices:
            raise ValueError("at least one device is needed")
        self.workers = [DeviceWorker(device, max_queue_depth, concurrency) for device in devices]
        self.max_run_seconds = max_run_seconds
        # Jobs in flight by key; touched only from the event loop's thread.
        self._shared: dict[str, Job] = {}

    @property
    def devices(self) -> list[str]:
        return [worker.device for worker in self.workers]

    def submit(self, work: Work, *, timeout: float | None = None, key: str | None = None,
               request_id: str = "", on_finish: Callable[[], None] | None = None) -> Ticket:
        """Queue ``work`` (or join the job in flight with the same ``key``); returns the
        caller's ticket. ``on_finish`` runs when the work ends, or at once if a job was joined
        or the queue refused it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if key is not None and (running := self._shared.get(key)) is not None:
            ticket = running.subscribe(deadline)
            if ticket is not None:
                if on_finish is not None:
                    on_finish()
                return ticket
        job = Job(work=work, loop=asyncio.get_running_loop(), key=key, request_id=request_id,
                  max_run_seconds=self.max_run_seconds)
        if on_finish is not None:
            job.on_finish.append(on_finish)
        if key is not None:
            job.on_finish.append(lambda: job.loop.call_soon_threadsafe(self._forget, job))
        ticket = job.subscribe(deadline)
        assert ticket is not None  # a fresh job is neither finished nor cancelled
        worker = min(self.workers, key=lambda w: w.load)
        try:
            worker.submit(job)
        except CurvscopeError:
            if on_finish is not None:
                on_finish()
            raise
        if key is not None:
            self._shared[key] = job
        return ticket

    def _forget(self, job: Job) -> None:
        if job.key is not None and self._shared.get(job.key) is job:
            del self._shared[job.key]

    def stop(self, timeout: float | None = None) -> None:
        for worker in self.workers:
            worker.stop(timeout)
