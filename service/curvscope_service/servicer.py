"""The gRPC servicer: a thin transport over the engine's entry point and the blob store.

It resolves references, queues the engine's work on a device and streams its events; every
domain exception it lets through is mapped to a status code by the error interceptor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import platform
import threading
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
from grpc import aio

from curvscope._files import manifest_digest
from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
from curvscope._proto.curvscope.v1 import curvscope_pb2_grpc as pb_grpc

from . import __version__, engine, metrics
from .config import ServerConfig
from .errors import DeadlineExceeded, InvalidInput
from .loading import known_architectures
from .loading.vetting import Vetter
from .logging_setup import REQUEST_ID
from .requests import (canonical_request, description_message, job_from_request, model_options, report_document,
                       report_message, validate_job)
from .scheduler import Scheduler
from .store import BlobStore, folder_digest, result_key, sha256_of_file

API_VERSION = "curvscope.v1"
UPLOAD_CHUNK_BYTES = 1 << 20

log = logging.getLogger(__name__)


def _model_digests(model: pb.ModelRef) -> list[str]:
    """The store blobs (and the folder of them) a model reference names."""
    source = model.WhichOneof("source")
    if source == "blob":
        return [model.blob.sha256]
    if source == "folder":
        files = {name: blob.sha256 for name, blob in model.folder.files.items()}
        return [*files.values(), manifest_digest(files)]
    return []


def _blob_digests(request: pb.AnalyzeRequest) -> list[str]:
    """The store blobs and folders a request names (held against garbage collection while it runs)."""
    data = [request.data.blob.sha256] if request.HasField("data") and request.data.WhichOneof("source") == "blob" else []
    return _model_digests(request.model) + data


def _once(function: Callable[[], None]) -> Callable[[], None]:
    lock, done = threading.Lock(), []

    def call() -> None:
        with lock:
            if done:
                return
            done.append(True)
        function()
    return call


class CurvscopeServicer(pb_grpc.CurvscopeServicer):
    def __init__(self, config: ServerConfig, store: BlobStore, scheduler: Scheduler):
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.vetter = Vetter(base_memory_mib=config.load_memory_mib) if config.load_memory_mib else None

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadChunk], context: aio.ServicerContext) -> pb.BlobRef:
        writer = None
        idle = self.config.upload_idle_timeout_seconds or None
        loop = asyncio.get_running_loop()
        try:
            # One timer, pushed back after every chunk: it fires only while the server waits
            # for a client that sends nothing. DEADLINE_EXCEEDED, not ABORTED: a time limit ran
            # out (nothing conflicted), and the client may simply send again.
            timer = asyncio.timeout(idle)
            try:
                async with timer:
                    async for chunk in request_iterator:
                        kind = chunk.WhichOneof("payload")
                        if writer is None:
                            if kind != "header":
                                raise InvalidInput("the first upload chunk must carry the header (sha256 and size)")
                            writer = self.store.writer(chunk.header.sha256, chunk.header.size_bytes,
                                                       self.config.max_upload_bytes)
                        elif kind == "header":
                            raise InvalidInput("only the first upload chunk may carry a header")
                        else:
                            writer.write(chunk.data)
                        if idle is not None:
                            timer.reschedule(loop.time() + idle)
            except TimeoutError:
                if not timer.expired():
                    raise  # not ours: e.g. a disk that timed out
                raise DeadlineExceeded(
                    f"the upload sent nothing for {idle:g} s (this server's --upload-idle-timeout) and was "
                    "dropped; send the file again") from None
            if writer is None:
                raise InvalidInput("empty upload: send a header chunk, then the file's bytes")
            info = writer.commit()
            return pb.BlobRef(sha256=info.sha256)
        finally:
            if writer is not None:
                writer.abort()

    async def StatBlob(self, request: pb.BlobRef, context: aio.ServicerContext) -> pb.BlobInfo:
        info = self.store.stat(request.sha256)
        return pb.BlobInfo(sha256=info.sha256, size_bytes=info.size_bytes)

    def _resolve(self, ref: pb.ModelRef | pb.DataRef, what: str) -> tuple[Path, str]:
        source = ref.WhichOneof("source")
        if source == "blob":
            return self.store.resolve_blob(ref.blob.sha256), ref.blob.sha256
        if source == "uri":
            path = self.store.resolve_uri(ref.uri)
            if not path.is_dir():
                return path, sha256_of_file(path)
            if what != "model":
                raise InvalidInput(f"the {what} URI names a folder; give a file")
            return path, folder_digest(path, self.store.model_roots)
        if source == "folder":
            return self.store.resolve_folder({name: blob.sha256 for name, blob in ref.folder.files.items()})
        raise InvalidInput(f"the request names no {what}; give a blob digest, a file:// URI"
                           f"{' or a folder manifest' if what == 'model' else ''}")

    async def _vet(self, model: tuple[Path, str], options: dict, data: tuple[Path, str] | None) -> None:
        """Load new inputs (path, digest) first in a capped child process (see loading.vetting)."""
        if self.vetter is None:
            return
        await asyncio.to_thread(functools.partial(
            self.vetter.check_model, *model, **options, max_parameters=engine.parameter_cap(self.config.limits)))
        if data is not None:
            await asyncio.to_thread(self.vetter.check_data, *data)

    async def DescribeModel(self, request: pb.ModelRef, context: aio.ServicerContext) -> pb.ModelDescription:
        held = _model_digests(request)
        self.store.acquire(held)
        try:
            return await self._describe(request)
        finally:
            self.store.release(held)

    async def _describe(self, request: pb.ModelRef) -> pb.ModelDescription:
        path, digest = await asyncio.to_thread(self._resolve, request, "model")
        options = model_options(request)
        await self._vet((path, digest), options, None)
        description = await asyncio.to_thread(functools.partial(
            engine.describe, path, **options, max_parameters=engine.parameter_cap(self.config.limits)))
        return description_message(digest, description)

    async def Analyze(self, request: pb.AnalyzeRequest, context: aio.ServicerContext) -> AsyncIterator[pb.AnalyzeEvent]:
        digests = _blob_digests(request)
        self.store.acquire(digests)  # before resolving, so the GC cannot remove them in between
        release = _once(lambda: self.store.release(digests))
        try:
            model = await asyncio.to_thread(self._resolve, request.model, "model")
            data = await asyncio.to_thread(self._resolve, request.data, "data") if request.HasField("data") else None
            job = validate_job(job_from_request(request, model, data), self.config.limits)
            key = result_key(canonical_request(job, self.config.limits))
            cached = await asyncio.to_thread(self.store.get_result, key)
            if cached is not None:
                metrics.CACHE_REQUESTS.labels("hit").inc()
                release()
                yield pb.AnalyzeEvent(report=report_message(cached))
                return
            await self._vet(model, job.job.model_options(), data)

            def work(device: str, progress, check) -> pb.Report:
                try:
                    report = engine.run_analysis(job, device=device, limits=self.config.limits,
                                                 progress=progress, check=check)
                finally:
                    metrics.record_device_peak(device)
                document = report_document(report)
                try:
                    self.store.put_result(key, document)
                except OSError as error:  # a full disk costs the cache entry, not the answer
                    log.warning("could not cache the report: %s", error)
                return report_message(document)

            ticket = self.scheduler.submit(work, timeout=context.time_remaining(), key=key,
                                           request_id=REQUEST_ID.get(), on_finish=release)
        except BaseException:
            release()
            raise
        metrics.CACHE_REQUESTS.labels("miss" if ticket.job.work is work else "shared").inc()
        context.add_done_callback(lambda _call: ticket.cancel())
        try:
            while True:
                event = await ticket.events.get()
                if event.kind == "queued":
                    yield pb.AnalyzeEvent(queued=pb.Queued(position=event.payload))
                elif event.kind == "progress":
                    yield pb.AnalyzeEvent(progress=pb.Progress(**event.payload))
                elif event.kind == "done":
                    yield pb.AnalyzeEvent(report=event.payload)
                    return
                elif event.kind == "error":
                    raise event.payload
        finally:
            # A client that went away (or a deadline) ends this generator; the device work stops
            # when no other caller shares it.
            ticket.cancel()

    async def GetCapabilities(self, request: pb.GetCapabilitiesRequest, context: aio.ServicerContext) -> pb.Capabilities:
        return pb.Capabilities(
            server_version=__version__, api_version=API_VERSION, torch_version=torch.__version__,
            devices=[device_info(name) for name in self.scheduler.devices],
            analyses=list(engine.IMPLEMENTED_ANALYSES), losses=engine.known_losses(),
            curvatures=list(engine.IMPLEMENTED_CURVATURES), model_formats=list(engine.MODEL_FORMATS),
            architectures=known_architectures(),
            limits=pb.Limits(
                max_upload_bytes=self.config.max_upload_bytes, max_queue_depth=self.config.max_queue_depth,
                upload_chunk_bytes=UPLOAD_CHUNK_BYTES, max_hvps=self.config.limits.max_products,
                max_parameters=self.config.limits.max_parameters, max_samples=self.config.limits.max_samples,
                max_analysis_seconds=self.config.max_analysis_seconds, concurrency_per_device=self.config.concurrency,
                memory_budget_bytes=self.config.limits.memory_budget_bytes,
            ),
            auth_required=bool(self.config.tokens()),
        )


def device_info(name: str) -> pb.DeviceInfo:
    if name.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(name))
        return pb.DeviceInfo(name=name, description=props.name, memory_bytes=props.total_memory)
    return pb.DeviceInfo(name=name, description=f"{platform.processor() or platform.machine()}, "
                                                f"{torch.get_num_threads()} threads")
