"""Curvature during training: the shared part of the Hugging Face and Lightning callbacks.

Every ``every`` steps (or epochs) the monitor takes the model's current weights and a fixed
evaluation batch to a server (or runs the engine in this process) with the chosen analyses,
beside the training loop: the training thread only copies the weights (the module's graph is
exported once, at the first analysis, and re-exported only when its parameters change), and a
background thread serialises them, uploads what the server lacks and waits for the report. At
most one analysis is in flight; a step due while one runs is skipped and counted. Finished
reports become flat ``{name: number}`` values that the callback logs through its trainer.

    from curvscope.callbacks.transformers import CurvscopeCallback      # curvscope[transformers]
    from curvscope.callbacks.lightning import CurvscopeCallback         # curvscope[lightning]
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import in_memory
from .._proto.curvscope.v1 import curvscope_pb2 as pb
from ..client import Client, build_request
from ..gate import FAIL, GateResult, evaluate
from ..policy import Policy, load_policy
from ..report import Report

DEFAULT_PREFIX = "curvscope/"
log = logging.getLogger(__name__)


@dataclass
class Finished:
    """One analysis that ended: the step it was taken at, its report (None if it failed) and
    the values logged for it."""

    step: int
    report: Report | None
    values: dict[str, float]
    error: str | None = None
    gate: GateResult | None = None


@dataclass
class _Graph:
    """The module's exported graph and the live tensors its state dict was traced from."""

    exported: in_memory.ExportedModule
    live: dict[str, Any]  # state-dict name -> the module's own parameter or buffer
    identity: tuple[int, ...] = field(default_factory=tuple)


def check_schedule(every_steps: int | None, every_epochs: int | None) -> None:
    """A callback runs every N optimizer steps or every N epochs: exactly one, N >= 1."""
    if (every_steps is None) == (every_epochs is None):
        raise ValueError("set one of every_steps and every_epochs")
    if (every_steps or every_epochs or 0) < 1:
        raise ValueError("every_steps / every_epochs must be at least 1")


class CurvatureMonitor:
    """Runs the analyses beside a training loop; the framework callbacks drive it.

    ``data``: the fixed evaluation batch, as ``Client.analyze`` takes tensors. ``server`` /
    ``client`` / ``local=True``: where the analyses run. ``sharpness``, ``non_uniformity``,
    ``trace``, ``eigen``: the analyses (others through ``options``, as ``build_request`` takes
    them); sharpness is compared with 2/η for the optimizer's current learning rate, the SGD
    verdict uses the training loader's batch size (``learning_rate`` / ``batch_size`` override
    them). ``stop_policy``: a gate policy (a TOML path or a ``Policy``) whose failure stops
    training; the analyses its ``[analyses.*]`` tables name run too, with their settings (the
    policy's own learning rate or batch size win over the optimizer's). ``on_report``: called in
    the background thread with each ``Finished``.
    """

    def __init__(self, data: Any, *, server: str | None = None, client: Client | None = None, local: bool = False,
                 sharpness: bool = True, non_uniformity: bool = False, trace: bool = False, eigen: int = 0,
                 learning_rate: float | None = None, batch_size: int | None = None,
                 stop_policy: Policy | str | Path | None = None, prefix: str = DEFAULT_PREFIX,
                 timeout: float | None = None, on_report: Callable[[Finished], None] | None = None,
                 **options: Any) -> None:
        if local and (server is not None or client is not None):
            raise ValueError("local=True runs in this process; leave out server and client")
        if not (sharpness or non_uniformity or trace or eigen or options):
            raise ValueError("choose at least one analysis (sharpness, non_uniformity, trace, eigen, ...)")
        if local:
            from ..quick import SERVICE_MISSING

            try:  # fail now, not in the first background analysis
                import curvscope_service.local  # noqa: F401
            except ModuleNotFoundError as error:
                raise ModuleNotFoundError(SERVICE_MISSING) from error
        self.batch = in_memory.split_batch(data)
        self.local = local
        self._client = client
        self._own_client = client is None and not local
        self._server = server
        self.analyses = dict(sharpness=sharpness, non_uniformity=non_uniformity, trace=trace, eigen=eigen, **options)
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.policy = load_policy(stop_policy) if isinstance(stop_policy, (str, Path)) else stop_policy
        self.prefix = prefix
        self.timeout = timeout
        self.on_report = on_report
        self.skipped = 0  # analyses due while one was in flight
        self.started = 0
        self.history: list[Finished] = []
        self.should_stop = False  # set when a report fails stop_policy
        self._graph: _Graph | None = None
        self._worker: threading.Thread | None = None
        self._done: list[Finished] = []
        self._lock = threading.Lock()
        self._data_blob: in_memory.Blob | None = None

    # -- the training thread ------------------------------------------------------------------
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def submit(self, step: int, module: Any, learning_rate: float | None, batch_size: int | None) -> bool:
        """Start an analysis of ``module``'s current weights, unless one is still running (then
        count it as skipped). Returns whether one started."""
        if self.busy():
            self.skipped += 1
            return False
        graph = self._graph_for(module)
        snapshot = {name: value.detach().clone() for name, value in graph.live.items()}
        options = dict(self.analyses)
        rate = self.learning_rate if self.learning_rate is not None else learning_rate
        size = self.batch_size if self.batch_size is not None else batch_size
        if options.get("sharpness") or options.get("non_uniformity"):
            if rate:
                options["learning_rate"] = float(rate)
            if size and options.get("non_uniformity"):
                options["batch_size"] = int(size)
        if self.policy is not None and self.policy.analyses:
            options["spec_fields"] = {**options.get("spec_fields", {}), **self.policy.analyses}
        self.started += 1
        self._worker = threading.Thread(target=self._run, args=(step, graph, snapshot, options),
                                        name="curvscope-monitor", daemon=True)
        self._worker.start()
        return True

    def collect(self) -> list[Finished]:
        """The analyses that finished since the last call, oldest first."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the analysis in flight (at the end of training)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def close(self) -> None:
        self.wait()
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def _graph_for(self, module: Any) -> _Graph:
        """The exported graph, exported now if there is none yet or the module's parameters and
        buffers are no longer the tensors it was traced with (names, shapes, or new tensors)."""
        identity = tuple(id(tensor) for tensor in (*module.parameters(), *module.buffers()))
        if self._graph is None or self._graph.identity != identity:
            exported = in_memory.export_module(module, self.batch)
            live = dict(exported.program.state_dict)
            self._graph = _Graph(exported=exported, live=live, identity=identity)
            if self._data_blob is None:
                self._data_blob = in_memory.Blob(
                    in_memory.safetensors_bytes(self.batch.tensors(exported.input_names)), "data.safetensors")
        return self._graph

    # -- the background thread ----------------------------------------------------------------
    def _run(self, step: int, graph: _Graph, snapshot: dict[str, Any], options: dict[str, Any]) -> None:
        try:
            program = graph.exported.program
            # This thread alone uses the program until it ends.
            program.state_dict.update({name: _as_in(graph.live[name], copy) for name, copy in snapshot.items()})
            model = in_memory.Blob(in_memory.archive_bytes(program), "model.pt2")
            report = self._analyze(model, options)
            finished = Finished(step=step, report=report, values=report_values(report, self.prefix))
            if self.policy is not None:
                finished.gate = evaluate(self.policy, report.to_dict())
                if finished.gate.status == FAIL:
                    self.should_stop = True
        except Exception as error:  # noqa: BLE001 - reported to the training loop, which keeps going
            finished = Finished(step=step, report=None, values={}, error=f"{type(error).__name__}: {error}")
            log.warning("curvscope: the analysis of step %d failed: %s", step, finished.error)
        with self._lock:
            self._done.append(finished)
            self.history.append(finished)
        if self.on_report is not None:
            self.on_report(finished)

    def _analyze(self, model: in_memory.Blob, options: dict[str, Any]) -> Report:
        assert self._data_blob is not None
        if self.local:
            from curvscope_service.local import analyze_local

            request = build_request(pb.ModelRef(blob=pb.BlobRef(sha256=model.sha256)),
                                    pb.DataRef(blob=pb.BlobRef(sha256=self._data_blob.sha256)), **options)
            return analyze_local(request, blobs={model.sha256: model.content,
                                                 self._data_blob.sha256: self._data_blob.content})
        if self._client is None:
            self._client = Client(self._server)
        client = self._client
        request = build_request(
            pb.ModelRef(blob=pb.BlobRef(sha256=client.upload_bytes(model.content, model.filename))),
            pb.DataRef(blob=pb.BlobRef(sha256=client.upload_bytes(self._data_blob.content, self._data_blob.filename))),
            **options)
        return client.analyze_request(request, timeout=self.timeout)


def _as_in(live: Any, copy: Any) -> Any:
    """``copy`` of a parameter or buffer wrapped as ``live`` is (a parameter stays a parameter,
    so the archive records it as one); wrapped here, off the training thread."""
    torch = in_memory.caller_torch()
    return torch.nn.Parameter(copy, requires_grad=live.requires_grad) if isinstance(live, torch.nn.Parameter) else copy


def report_values(report: Report, prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """The numbers a training log keeps from a report, flat: the loss on the evaluation batch,
    sharpness and 2/η with the GD verdict (1 stable, 0 not), non-uniformity with the SGD verdict,
    the trace and its standard error, the largest eigenvalues."""
    results = report.results
    values: dict[str, float] = {}
    if report.message.HasField("loss"):
        values["loss"] = report.message.loss.value
    if results.HasField("sharpness"):
        sharpness = results.sharpness
        values["sharpness"] = sharpness.value
        if sharpness.learning_rate > 0:
            values["sharpness_limit"] = 2.0 / sharpness.learning_rate
        if sharpness.HasField("gd_stable"):
            values["gd_stable"] = float(sharpness.gd_stable)
    if results.HasField("non_uniformity"):
        result = results.non_uniformity
        values["non_uniformity"] = result.value
        if result.HasField("sgd_stable"):
            values["sgd_stable"] = float(result.sgd_stable)
        if result.HasField("stability_eigenvalue"):
            values["sgd_stability_eigenvalue"] = result.stability_eigenvalue
    if results.HasField("hessian_trace"):
        values["trace"] = results.hessian_trace.estimate
        values["trace_stderr"] = results.hessian_trace.stderr
    if results.HasField("hessian_eigen"):
        for index, value in enumerate(results.hessian_eigen.largest):
            values[f"eigen_{index}"] = value
    return {prefix + name: value for name, value in values.items()}
