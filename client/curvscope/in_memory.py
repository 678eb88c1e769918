"""Models and batches that live in the caller's process, turned into the bytes a server reads.

An ``nn.Module`` becomes a ``torch.export`` archive (eval mode, a dynamic batch dimension) and a
batch of tensors becomes a safetensors file, both built in memory (``io.BytesIO``; never a
temporary file). Only weights, the traced graph of aten operators and the batch cross the wire,
never Python code. The client never imports torch (nor numpy) itself: it works with the torch
module the caller imported to build the objects it hands over (``caller_torch``), so the thin
client keeps running with grpcio and protobuf alone.

Batch layouts (the server's data format, docs/formats.md):

- one model input: tensors ``inputs`` and ``targets``;
- several model inputs: one tensor per input, named as the exported program's signature names
  them (``input_ids``, ``attention_mask``, ...), and ``targets``; inputs given as a tuple
  without a module to name them are ``inputs.0``, ``inputs.1``, ... in order.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import io
import json
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# What a data dict may call its targets: curvscope's own name, then Hugging Face's.
TARGET_KEYS = ("targets", "labels")
# Samples of the example batch the module is traced with: two, so that torch.export does not
# specialise the batch dimension to 1, and no more (the archive also stores the example).
EXAMPLE_SAMPLES = 2
# safetensors dtype names of the torch dtypes a batch may hold (the format's own spelling).
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}


def caller_torch() -> Any:
    """The torch module the caller imported. A torch object can exist only once its owner
    imported torch, so every function here that receives one finds torch already loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        raise TypeError("this needs torch objects (an nn.Module, tensors); torch is not imported")
    return torch


def holds_torch(value: Any) -> bool:
    """Whether ``value`` is, or holds, a torch object (a module or tensors); False, without
    loading torch, while torch is not imported."""
    if "torch" not in sys.modules:
        return False
    torch = caller_torch()
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return True
    if isinstance(value, Mapping):
        return any(holds_torch(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return any(holds_torch(item) for item in value)
    return False


@dataclass
class Batch:
    """A batch taken apart: the model's input tensors (with their names when the caller gave
    them) and the targets, all on the CPU."""

    inputs: list[Any]  # torch.Tensor, one per model input
    names: list[str] | None  # the caller's names (a dict's keys); None: positional
    targets: Any | None  # torch.Tensor or None

    @property
    def num_samples(self) -> int:
        return int(self.inputs[0].shape[0])

    def tensors(self, input_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The tensors of the batch file: ``inputs`` for one input, else one per input named
        ``input_names`` (the exported program's), the caller's names, or ``inputs.<i>``."""
        if len(self.inputs) == 1:
            named = {"inputs": self.inputs[0]}
        else:
            names = list(input_names or self.names or [f"inputs.{i}" for i in range(len(self.inputs))])
            named = dict(zip(names, self.inputs))
        if self.targets is not None:
            named["targets"] = self.targets
        return named


def split_batch(data: Any) -> Batch:
    """``data`` as a Batch: a tensor (inputs only), ``(inputs, targets)`` where inputs is a tensor,
    a tuple of tensors or a dict of named tensors, or a dict of named inputs with ``targets``
    (or Hugging Face's ``labels``) among them."""
    torch = caller_torch()

    def tensor(value: Any, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, not {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"{what} is a scalar; it needs a first dimension of samples")
        return value.detach().to("cpu").contiguous()

    targets = None
    if isinstance(data, torch.Tensor):
        inputs: Any = data
    elif isinstance(data, Mapping):
        inputs = dict(data)
        key = next((k for k in TARGET_KEYS if k in inputs), None)
        targets = inputs.pop(key) if key is not None else None
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
    else:
        raise TypeError("data must be a tensor, a pair (inputs, targets), or a dict of named input tensors "
                        f"(with 'targets'), not {type(data).__name__}"
                        + (f" of {len(data)} items" if isinstance(data, (tuple, list)) else ""))
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ValueError("data holds no input tensor")
        names = [str(name) for name in inputs]
        clash = [name for name in names if name == "targets" or name.startswith("inputs.")]
        if clash:
            raise ValueError(f"input name {clash[0]!r} is reserved in a batch file; rename that input")
        values = [tensor(value, f"input {name!r}") for name, value in inputs.items()]
    elif isinstance(inputs, (tuple, list)):
        if not inputs:
            raise ValueError("data holds no input tensor")
        names, values = None, [tensor(value, f"input {i}") for i, value in enumerate(inputs)]
    else:
        names, values = None, [tensor(inputs, "inputs")]
    batch = Batch(inputs=values, names=names, targets=None if targets is None else tensor(targets, "targets"))
    sizes = {int(value.shape[0]) for value in values + ([batch.targets] if batch.targets is not None else [])}
    if len(sizes) != 1:
        raise ValueError(f"the batch's tensors hold different numbers of samples ({sorted(sizes)}); "
                         "every input and the targets need the same first dimension")
    return batch


def safetensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    """A safetensors file of CPU tensors, in memory: an 8-byte little-endian header length, the
    JSON header (padded with spaces to 8 bytes, as the safetensors library writes it), then each
    tensor's little-endian bytes in header order."""
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, value in tensors.items():
        dtype = _SAFETENSORS_DTYPES.get(str(value.dtype).removeprefix("torch."))
        if dtype is None:
            raise TypeError(f"tensor {name!r} has dtype {value.dtype}; a batch holds real numbers, integers or bools")
        raw = _little_endian_bytes(value)
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def _little_endian_bytes(value: Any) -> bytes:
    # Read from the tensor's own memory: ``.numpy()`` would need numpy, which torch does not.
    torch = caller_torch()
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    if sys.byteorder != "little" and flat.element_size() > 1:
        flat = flat.view(torch.uint8).view(-1, flat.element_size()).flip(-1).contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b""


class _Signature:
    """Parameter names of a module's forward, to tell whether named inputs can be passed by position."""

    def __init__(self, module: Any):
        try:
            parameters = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):
            parameters = []
        self.positional = [p.name for p in parameters
                           if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]

    def order(self, names: Sequence[str]) -> list[str] | None:
        """``names`` in the forward's order when they are exactly its first parameters, else None."""
        leading = self.positional[:len(names)]
        return leading if sorted(leading) == sorted(names) else None


def _adapter(module: Any, names: Sequence[str], by_name: bool, logits: bool) -> Any:
    """A module whose forward takes ``names`` by position, calls ``module`` (by name when
    ``by_name``: a model whose named inputs are not its leading parameters) and returns one
    tensor (``.logits`` of a Hugging Face output when ``logits``). Its placeholders are named
    after the inputs; its parameters are ``model.*``."""
    torch = caller_torch()
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]

    def forward(self: Any, *tensors: Any) -> Any:
        output = self.model(**dict(zip(self.names, tensors))) if by_name else self.model(*tensors)
        return _one_tensor(output) if logits else output

    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]

    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module
            self.names = list(names)

    Adapter.forward = forward  # type: ignore[method-assign]
    return Adapter()


def _one_tensor(output: Any) -> Any:
    """The logits of a model that returns more than a tensor (a Hugging Face ModelOutput, a tuple)."""
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise TypeError(f"the module returns {type(output).__name__}; curvscope needs one tensor of outputs (logits)")


@dataclass
class ExportedModule:
    """A module exported for a batch: the program, and its input names in calling order."""

    program: Any  # torch.export.ExportedProgram
    input_names: list[str]


def export_module(module: Any, batch: Batch) -> ExportedModule:
    """Export ``module`` in eval mode for ``batch``'s inputs, every input's first dimension one
    shared dynamic batch dimension. The module's (and each submodule's) training flag is
    restored afterwards. Named inputs are passed by position in the forward's order when they are
    its leading parameters, else through a wrapper that passes them by name."""
    torch = caller_torch()
    devices = sorted({str(tensor.device) for tensor in (*module.parameters(), *module.buffers())} - {"cpu"})
    if devices:
        # A graph traced on a GPU can hold that device in its operators; only CPU exports are checked.
        raise ValueError(f"the module is on {devices[0]}; curvscope exports modules from the CPU: "
                         "pass a CPU copy (copy.deepcopy(model).cpu())")
    examples = [_example(value) for value in batch.inputs]
    names, by_name = batch.names, False
    if names is not None:
        order = _Signature(module).order(names)
        if order is not None:
            by_position = dict(zip(names, examples))
            names, examples = order, [by_position[name] for name in order]
        else:
            by_name = True
    batch_dim = torch.export.Dim("batch")
    dynamic = tuple({0: batch_dim} for _ in examples)
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    try:
        target = _adapter(module, names, by_name, logits=False) if by_name else module
        program = torch.export.export(target, tuple(examples), dynamic_shapes=dynamic)
        if not program.call_spec.out_spec.is_leaf():  # a ModelOutput or a tuple: keep the logits
            target = _adapter(module, names or _positional_names(module, len(examples)), by_name, logits=True)
            program = torch.export.export(target, tuple(examples), dynamic_shapes=dynamic)
    finally:
        for submodule, training in modes.items():
            submodule.training = training
    # The archive would carry the example batch as a pickle, which no server reads (it has the
    # batch file): leave it out, so that what crosses the wire is the graph, the weights and data.
    program.example_inputs = None
    input_names = list(program.graph_signature.user_inputs)
    if names is not None and input_names != list(names):
        raise ValueError(f"the exported module names its inputs {input_names}, not {list(names)}; "
                         "name the data's inputs after the forward's parameters")
    return ExportedModule(program=program, input_names=input_names)


def _positional_names(module: Any, count: int) -> list[str]:
    names = _Signature(module).positional[:count]
    return names if len(names) == count else [f"input_{index}" for index in range(count)]


def _example(value: Any) -> Any:
    """The first EXAMPLE_SAMPLES samples (a one-sample batch repeated), to trace with."""
    torch = caller_torch()
    if value.shape[0] >= EXAMPLE_SAMPLES:
        return value[:EXAMPLE_SAMPLES]
    return torch.cat([value] * EXAMPLE_SAMPLES)[:EXAMPLE_SAMPLES]


def archive_bytes(program: Any) -> bytes:
    """``torch.export.save`` into memory: the .pt2 archive's bytes (the same program and weights
    give the same bytes, so an unchanged model is never uploaded twice)."""
    torch = caller_torch()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@dataclass
class Blob:
    """Bytes to send, with their digest and the name the upload gives them."""

    content: bytes
    filename: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class Prepared:
    """A request's model and data as blobs; either may be None when the caller passed a path."""

    model: Blob | None
    data: Blob | None


def prepare(model: Any, data: Any) -> Prepared:
    """Serialise whatever of ``model`` and ``data`` is a torch object (a path stays a path)."""
    torch = caller_torch()
    batch = split_batch(data) if holds_torch(data) else None
    model_blob = None
    input_names = None
    if isinstance(model, torch.nn.Module):
        if batch is None:
            raise ValueError("an nn.Module is exported by tracing it on the batch: pass data as tensors "
                             "(a pair (inputs, targets) or a dict of named inputs), not a file")
        exported = export_module(model, batch)
        input_names = exported.input_names
        model_blob = Blob(archive_bytes(exported.program), "model.pt2")
    elif holds_torch(model):
        raise TypeError(f"model must be a torch.nn.Module or a path, not {type(model).__name__}")
    data_blob = Blob(safetensors_bytes(batch.tensors(input_names)), "data.safetensors") if batch is not None else None
    return Prepared(model=model_blob, data=data_blob)
