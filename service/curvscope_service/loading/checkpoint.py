"""Load a model checkpoint in any supported format and describe it.

Formats: a torch.export archive (``.pt2``), a safetensors state dict whose metadata names the
built-in ``sequential`` architecture, a safetensors state dict of a plugin architecture, or a
Hugging Face checkpoint folder (``config.json`` and safetensors weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from curvscope_service.errors import InvalidInput, NotFound, ResourceExhausted
from curvscope_service.loading import hugging_face, plugins, sequential
from curvscope_service.loading.json_text import parse_json
from curvscope_service.lipschitz.chain import graph_chain, module_chain
from curvscope_service.loading.messages import NEVER_UNPICKLE, one_line
from curvscope_service.loading.model_inputs import ModelInput, single_input
from curvscope_service.loading.safetensors_file import SafetensorsHeader, SafetensorsReader
from curvscope_service.loading.torch_export import load_exported, retarget_precision

FORMATS = ("auto", "torch_export", "safetensors", "plugin", "hugging_face")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))  # PROTO opcode
# Parameters a model may declare when the caller sets no cap: a 2B-parameter model already needs
# 8 GB for its float32 weights and as much per Hessian-vector product; curvature analyses beyond
# that belong on a server configured for them (load_model's max_parameters).
DEFAULT_MAX_PARAMETERS = 2_000_000_000
_FINITE_CHUNK = 1 << 20  # values per isfinite pass (temporaries of a few MB)
# An architecture config is a short JSON object (a sequential spec of 1,000 layers is ~100 KB).
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class LoadedModel:
    module: nn.Module  # eval mode, on the requested device and dtype
    format: str  # "torch_export" | "safetensors" | "plugin" | "hugging_face"
    architecture: str  # "sequential", the plugin's name, "torch_export", or the transformers class
    input_shape: tuple[int, ...] | None  # one sample, without the batch dimension
    fixed_batch_size: int | None  # a .pt2 exported with a static batch dimension; None = dynamic
    num_parameters: int
    parameter_blocks: dict[str, list[str]]  # layer name -> its parameter names, in named_parameters() order
    config: dict | None
    # The module's positional inputs, in order (module(*tensors) returns one tensor of outputs).
    inputs: tuple[ModelInput, ...] = ()

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = single_input(self.input_shape)


def load_model(
    path: Path,
    *,
    format: str = "auto",
    architecture: str | None = None,
    config: dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_parameters: int | None = None,
) -> LoadedModel:
    """Load a checkpoint; ``architecture``/``config`` override a safetensors file's metadata.

    ``max_parameters`` (None: DEFAULT_MAX_PARAMETERS) is checked against what a model declares
    before anything of it is allocated; over it is RESOURCE_EXHAUSTED.
    """
    path = Path(path)
    if format not in FORMATS:
        raise InvalidInput(f"unknown model format '{format}'; choose one of: {', '.join(FORMATS)}")
    if dtype not in (torch.float32, torch.float64):
        raise InvalidInput(f"dtype {dtype} is not supported; use torch.float32 or torch.float64")
    if not path.is_file() and not path.is_dir():
        raise NotFound(f"model file {path.name} does not exist")
    detected = "hugging_face" if path.is_dir() else detect_format(path)
    if format == "auto":
        format = detected
    elif format != detected and {format, detected} & {"torch_export", "hugging_face"}:
        raise InvalidInput(f"model was given as {format} but {'the folder' if path.is_dir() else 'the file'} "
                           f"looks like {detected}")

    cap = DEFAULT_MAX_PARAMETERS if max_parameters is None else max_parameters
    blocks = None
    if format == "hugging_face":
        if config is not None:
            raise InvalidInput("a Hugging Face folder brings its own config.json; send no architecture config with it")
        module, arch, cfg = _load_hugging_face(path, architecture, dtype, cap)
        input_shape, fixed_batch_size = None, None
        inputs, blocks = hugging_face.model_inputs(arch), hugging_face.parameter_blocks(module)
    elif format == "torch_export":
        exported = load_exported(path, max_parameters=cap)
        module, arch, cfg = exported.module, "torch_export", None
        input_shape, fixed_batch_size, inputs = exported.input_shape, exported.fixed_batch_size, exported.inputs
    else:
        module, arch, cfg, input_shape = _load_state_dict_model(path, format, architecture, config, dtype, cap)
        fixed_batch_size, inputs = None, single_input(input_shape)
        format = "safetensors" if arch == sequential.ARCHITECTURE else "plugin"

    _check_finite(module)
    if format == "torch_export":
        retarget_precision(module, dtype)
    try:
        module = module.to(device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as e:
        raise InvalidInput(f"model could not be moved to {device}: {one_line(e)}") from None
    if not isinstance(module, fx.GraphModule):
        module.eval()  # exported modules refuse eval(); load_exported refuses training-mode graphs instead
    for p in module.parameters():
        p.requires_grad_(True)  # the curvature engine differentiates with respect to every parameter
    return LoadedModel(
        module=module,
        format=format,
        architecture=arch,
        input_shape=input_shape,
        fixed_batch_size=fixed_batch_size,
        num_parameters=sum(p.numel() for p in module.parameters()),
        parameter_blocks=blocks or parameter_blocks(module),
        config=cfg,
        inputs=inputs,
    )


def known_architectures() -> list[str]:
    """The built-in architecture first, then the installed plugins by name (the transformers
    classes of checkpoint folders only where transformers is installed)."""
    hidden = () if hugging_face.transformers_installed() else hugging_face.ARCHITECTURES
    return [sequential.ARCHITECTURE, *sorted(name for name in plugins.available() if name not in hidden)]


def available_formats() -> tuple[str, ...]:
    """The model formats this server loads (GetCapabilities): hugging_face needs transformers."""
    return tuple(name for name in FORMATS
                 if name != "auto" and (name != "hugging_face" or hugging_face.transformers_installed()))


def detect_format(path: Path) -> str:
    """``torch_export`` or ``safetensors`` from the first bytes; refuse pickles outright."""
    with path.open("rb") as f:
        head = f.read(9)
    if _looks_like_safetensors(head, path.stat().st_size):
        return "safetensors"  # checked first: a header length can start with a pickle's 0x80 byte
    if head[:2] in _PICKLE_MAGIC:
        raise InvalidInput(NEVER_UNPICKLE)
    if head[:4] in _ZIP_MAGIC:
        return "torch_export"  # pt2_archive reads it, and tells a torch.save zip by its data.pkl
    return "safetensors"  # not recognised: the safetensors header check says what is wrong


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    return len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def _load_state_dict_model(
    path: Path, format: str, architecture: str | None, config: dict | None, dtype: torch.dtype, max_parameters: int
) -> tuple[nn.Module, str, dict, tuple[int, ...] | None]:
    """The model, its architecture and config, and the input shape its config declares."""
    # Everything the file and the config declare is checked on the meta device (no memory) before
    # the model is materialised; the weights then come through our reader only, one at a time.
    with SafetensorsReader(path, what="model") as reader:
        header = reader.header
        architecture = architecture or header.metadata.get("architecture")
        if not architecture:
            raise InvalidInput(
                "safetensors model names no architecture: write it with save_sequential, "
                "or give the architecture and its config (see docs/formats.md)"
            )
        if config is None:
            config = _metadata_config(header.metadata)
        if format == "plugin" and architecture == sequential.ARCHITECTURE:
            raise InvalidInput("architecture 'sequential' is built in, not a plugin; load it with format 'safetensors' or 'auto'")
        if architecture in hugging_face.ARCHITECTURES:
            raise InvalidInput(f"architecture '{architecture}' loads from a Hugging Face checkpoint folder "
                               "(config.json and model.safetensors); send the folder")
        known = known_architectures()
        if architecture not in known:
            shown = architecture if len(architecture) <= 60 else architecture[:57] + "..."
            raise InvalidInput(f"unknown architecture '{shown}'; choose one of: {', '.join(known)}")
        with torch.device("meta"):
            if architecture == sequential.ARCHITECTURE:
                module = sequential.build(config)
            else:
                module = plugins.build(architecture, config)
        module = module.to(dtype).eval()  # cast first: float64 weights must not overflow float32
        _check_size(module, max_parameters)
        _check_fit(module, header)
        if architecture == sequential.ARCHITECTURE:
            shape = sequential.input_shape(config)
            if shape is not None:
                sequential.check_activations(module, shape)
            # every tensor of a sequential model is in the file: storage without initialisation
            module = module.to_empty(device="cpu")
        else:
            # plugin code may set state at build time that the file does not hold (non-persistent
            # buffers, tied weights), so a plugin is built again for real, now that its sizes passed
            module = plugins.build(architecture, config).to(dtype)
        _copy_weights(module, reader)
    if architecture != sequential.ARCHITECTURE:
        shape = _plugin_input_shape(config)
    return module, architecture, config, shape


def _load_hugging_face(
    path: Path, architecture: str | None, dtype: torch.dtype, max_parameters: int
) -> tuple[nn.Module, str, dict]:
    """The model of a Hugging Face folder, its transformers class and its config.json."""
    # As for a plugin: built on the meta device and checked (size, the files' tensors) before
    # anything is allocated, then built for real (transformers sets buffers no file holds) and
    # filled from the files through our reader.
    folder = hugging_face.read_folder(path)
    architecture = hugging_face.architecture_of(folder.config, architecture)
    if architecture not in plugins.available():
        raise InvalidInput(f"architecture '{architecture}' is not registered in this server's "
                           f"{plugins.GROUP} entry points; reinstall curvscope-service")
    config = {**folder.config, "architectures": [architecture]}
    with hugging_face.open_weights(folder) as tensors:
        with torch.device("meta"):
            module = plugins.build(architecture, config)
        module = module.to(dtype)
        _check_size(module, max_parameters)
        plans = hugging_face.plan_weights(module, tensors)
        module = plugins.build(architecture, config).to(dtype)
        hugging_face.copy_weights(module, plans, tensors)
    return module, architecture, folder.config


def _metadata_config(metadata: dict[str, str]) -> dict:
    text = metadata.get("config")
    if text is None:
        return {}
    config = parse_json(text, what="safetensors metadata 'config'", max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InvalidInput("safetensors metadata 'config' must be a JSON object")
    return config


def _plugin_input_shape(config: dict) -> tuple[int, ...] | None:
    shape = config.get("input_shape")
    if isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape):
        return sequential.check_input_shape(tuple(shape), what="plugin config: input_shape")
    return None


def _check_size(module: nn.Module, max_parameters: int) -> None:
    """Refuse a (meta) model over the parameter cap, counting buffers no file tensor backs."""
    parameters = sum(p.numel() for p in module.parameters())
    persistent = module.state_dict().keys()
    unbacked = sum(b.numel() for name, b in module.named_buffers() if name not in persistent)
    if parameters + unbacked > max_parameters:
        extra = f" and {unbacked} buffer values the file does not hold" if unbacked else ""
        raise ResourceExhausted(
            f"the model declares {parameters} parameters{extra}, over the limit of {max_parameters}; "
            "use a smaller model or a server with a higher --max-parameters"
        )


def _check_fit(module: nn.Module, header: SafetensorsHeader) -> None:
    """The file's tensors against the (meta) model's state dict: names and shapes, before any allocation."""
    expected = module.state_dict()
    entries = header.tensors
    # num_batches_tracked only matters in training; files written without it still load
    missing = [k for k in expected if k not in entries and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in entries if k not in expected]
    mismatched = [
        f"{k} {list(entries[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in entries and entries[k].shape != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {_brief(items)}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", mismatched))
            if items
        ]
        raise InvalidInput(f"weights do not fit the architecture: {'; '.join(parts)}")


def _copy_weights(module: nn.Module, reader: SafetensorsReader) -> None:
    # One tensor at a time into the model's own storage (cast to its dtype): peak memory is the
    # model, plus the largest tensor when the file's dtype differs from the model's.
    with torch.no_grad():
        for name, target in module.state_dict().items():
            if name in reader.header.tensors:
                reader.read_into(name, target)
            else:
                target.zero_()  # a num_batches_tracked the file leaves out (_check_fit allowed only those)


def _brief(items: list[str], limit: int = 4) -> str:
    # names come from the file: each is clipped so the message stays one short line
    shown = ", ".join(item if len(item) <= 80 else item[:77] + "..." for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_finite(module: nn.Module) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        # in chunks: isfinite over a whole tensor takes 1.6x its size in temporaries
        for chunk in tensor.detach().reshape(-1).split(_FINITE_CHUNK):
            if not torch.isfinite(chunk).all():
                kind = "NaN" if torch.isnan(tensor).any() else "Inf"
                raise InvalidInput(f"weight '{name}' contains {kind} values; fix or retrain the checkpoint")


def parameter_blocks(module: nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped by the layer that owns them.

    The layer is the module path that owns the parameter, cut below the first child of the first
    numbered module (a block of a stack such as ``encoder.layer.3``): a transformer's parameters
    group as ``encoder.layer.3.attention``, ``encoder.layer.3.intermediate``, ... rather than one
    block per linear map; ``features.0.weight`` stays ``features.0``.
    """
    blocks: dict[str, list[str]] = {}
    for name, _ in module.named_parameters():
        blocks.setdefault(block_name(name), []).append(name)
    return blocks


def block_name(parameter: str) -> str:
    """The per-layer block of a parameter name (see ``parameter_blocks``)."""
    parts = parameter.split(".")
    owner = parts[:-1] or parts
    for index, part in enumerate(owner[:-1]):
        if part.isdigit():
            return ".".join(owner[:index + 2])
    return ".".join(owner)


def describe_model(model: LoadedModel) -> dict[str, Any]:
    """The DescribeModel answer: sizes, parameter blocks, layers and whether LipSDP applies."""
    params = dict(model.module.named_parameters())
    chain = graph_chain(model.module) if isinstance(model.module, fx.GraphModule) else module_chain(model.module)
    return {
        "format": model.format,
        "architecture": model.architecture,
        "num_parameters": model.num_parameters,
        "input_shape": list(model.input_shape) if model.input_shape is not None else None,
        "fixed_batch_size": model.fixed_batch_size,
        "blocks": [
            {
                "name": block,
                "num_parameters": sum(params[n].numel() for n in names),
                "parameters": [{"name": n, "shape": list(params[n].shape)} for n in names],
            }
            for block, names in model.parameter_blocks.items()
        ],
        "layers": chain.layers,
        "lipschitz_chain": {"found": chain.found, "reason": chain.reason},
    }
