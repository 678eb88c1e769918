"""Hugging Face checkpoint folders: ``config.json`` with ``model.safetensors``, or with
``model.safetensors.index.json`` and the shards it names, built by ``transformers`` (the optional
extra ``curvscope-service[hf]``) and never with code from the checkpoint.

The architectures are registered by this package in the entry-point group
``curvscope.architectures`` (its pyproject.toml), one entry per ``transformers`` class, all with
``build`` as their factory: the loader builds them through that group like any plugin's, and a
server's capabilities list them.

Everything in the folder is untrusted. ``config.json`` is parsed by ``json_text`` within a size
and depth cap; a config that asks for remote code (``auto_map``, ``trust_remote_code``) or a
quantizer is refused; its ``model_type`` and class must be allow-listed; every dimension that sets
a parameter count (hidden size, layers, heads, vocabulary, intermediate size, positions, labels)
is capped before ``transformers`` sees it. ``checkpoint.load_model`` then builds the model on the
meta device, counts it against the parameter cap and matches the files' tensors (names, shapes,
kinds of dtype) before anything is allocated; the weights come through our safetensors reader,
one tensor at a time. Attention is ``eager``: torch's fused attention has no forward-mode
derivative on the CPU, which the Gauss-Newton and Fisher products need.

The module the loader returns takes the model's inputs positionally, in ``ARCHITECTURES``' order
(``input_ids``, ``attention_mask``, ...), and returns the logits tensor alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from curvscope._files import FOLDER_FILE
from curvscope_service.errors import InvalidInput, NotFound, Unimplemented
from curvscope_service.loading.json_text import parse_json
from curvscope_service.loading.messages import brief, one_line
from curvscope_service.loading.model_inputs import ModelInput
from curvscope_service.loading.safetensors_file import SafetensorsReader, TensorEntry

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
# A config is a few KB (a classifier's id2label of 10,000 classes is ~300 KB).
MAX_CONFIG_BYTES = 1 << 20
# An index names every tensor once: ~100 bytes each, so 4 MiB holds ~40,000 (a 405B Llama: 1,138).
MAX_INDEX_BYTES = 4 << 20
# Shards open together while a model loads (a 405B Llama has 191); bounded by open files.
MAX_SHARDS = 256
# What transformers reads from the config to size the parameters, with caps well above any
# released model of these families (a 405B Llama: hidden 16,384, 126 layers, 128 heads,
# intermediate 53,248, vocabulary 128,256, 131,072 positions). The parameter count itself is
# checked against the server's cap on the meta model.
DIMENSION_CAPS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,
    "intermediate_size": 1 << 18,
    "max_position_embeddings": 1 << 20,
    "type_vocab_size": 1 << 10,
    "num_labels": 1 << 16,
}
# GPT-2 spells some of them its own way in config.json; transformers maps them.
_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_positions": "max_position_embeddings", "n_ctx": "max_position_embeddings",
            "n_inner": "intermediate_size"}
# Keys that would make transformers run code or libraries beyond the model's own class.
_REFUSED_KEYS = {
    "auto_map": "it asks for the checkpoint's own Python code (auto_map)",
    "trust_remote_code": "it asks for the checkpoint's own Python code (trust_remote_code)",
    "custom_pipelines": "it names custom pipelines (code from the checkpoint)",
    "quantization_config": "it is quantized (quantization_config); send float weights",
}
# What the config may say about how to run it, which curvscope decides instead: eager attention,
# no key/value cache, the precision of the request.
_IGNORED_KEYS = ("attn_implementation", "_attn_implementation", "use_cache", "torch_dtype", "dtype")
_TOKEN_IDS = ModelInput("input_ids", torch.int64, (None,))
_ATTENTION_MASK = ModelInput("attention_mask", torch.int64, (None,))
_TOKEN_TYPES = ModelInput("token_type_ids", torch.int64, (None,))


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's "model_type"
    config_class: str  # the transformers class of its config
    inputs: tuple[ModelInput, ...]  # the forward's arguments, in the order the engine passes them
    # Attends both ways: transformers would test its padding mask for "no padding at all" (a
    # data-dependent branch that per-sample vmap cannot take), so the mask goes in as the additive
    # 4-D mask transformers would have built from it (the same values: 0 or the dtype's minimum).
    bidirectional: bool


_BERT = Architecture("bert", "BertConfig", (_TOKEN_IDS, _ATTENTION_MASK, _TOKEN_TYPES), bidirectional=True)
_GPT2 = Architecture("gpt2", "GPT2Config", (_TOKEN_IDS, _ATTENTION_MASK), bidirectional=False)
_LLAMA = Architecture("llama", "LlamaConfig", (_TOKEN_IDS, _ATTENTION_MASK), bidirectional=False)
ARCHITECTURES: dict[str, Architecture] = {
    "BertForSequenceClassification": _BERT,
    "BertForTokenClassification": _BERT,
    "BertForMaskedLM": _BERT,
    "GPT2LMHeadModel": _GPT2,
    "GPT2ForSequenceClassification": _GPT2,
    "GPT2ForTokenClassification": _GPT2,
    "LlamaForCausalLM": _LLAMA,
    "LlamaForSequenceClassification": _LLAMA,
}
MODEL_TYPES = tuple(sorted({a.model_type for a in ARCHITECTURES.values()}))


# -- the folder --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Folder:
    """A checkpoint folder whose config and index were read and checked (no weights read yet)."""

    config: dict[str, Any]
    weight_files: tuple[Path, ...]  # model.safetensors, or the shards in order
    weight_map: dict[str, str] | None  # tensor name -> shard file name, from the index


def read_folder(path: Path) -> Folder:
    """The folder's config and weight files; InvalidInput naming what is missing or wrong."""
    present = {p.name for p in path.iterdir() if FOLDER_FILE.fullmatch(p.name) and p.is_file()}
    if CONFIG_FILE not in present:
        raise InvalidInput(
            f"the folder {brief(path.name)} has no {CONFIG_FILE}; a Hugging Face checkpoint folder holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")
    config = parse_json(_read_text(path / CONFIG_FILE, MAX_CONFIG_BYTES), what=CONFIG_FILE,
                        max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InvalidInput(f"{CONFIG_FILE} must be a JSON object")
    shards = sorted(name for name in present if _SHARD.fullmatch(name))
    if INDEX_FILE in present:
        if WEIGHTS_FILE in present:
            raise InvalidInput(f"the folder holds both {WEIGHTS_FILE} and {INDEX_FILE}; keep one form of the weights")
        weight_map = _read_index(path / INDEX_FILE)
        named = sorted(set(weight_map.values()))
        missing = [name for name in named if name not in present]
        if missing:
            raise NotFound(f"{INDEX_FILE} names shard {brief(missing[0])}, which the folder does not hold")
        extra = [name for name in shards if name not in named]
        if extra:
            raise InvalidInput(f"shard {extra[0]} is not named in {INDEX_FILE}; remove it or fix the index")
        return Folder(config, tuple(path / name for name in named), weight_map)
    if WEIGHTS_FILE in present:
        if shards:
            raise InvalidInput(f"the folder holds {WEIGHTS_FILE} and shards ({shards[0]}, ...); keep one form of the weights")
        return Folder(config, (path / WEIGHTS_FILE,), None)
    raise InvalidInput(
        f"the folder has no weights: it needs {WEIGHTS_FILE}, or {INDEX_FILE} and its shards "
        "(save_pretrained writes safetensors by default; pytorch_model.bin pickles are never read)")


def _read_text(path: Path, max_bytes: int) -> bytes:
    with path.open("rb") as handle:
        text = handle.read(max_bytes + 1)
    if len(text) > max_bytes:
        raise InvalidInput(f"{path.name} is over {max_bytes} bytes; the limit is {max_bytes}")
    return text


def _read_index(path: Path) -> dict[str, str]:
    index = parse_json(_read_text(path, MAX_INDEX_BYTES), what=INDEX_FILE, max_bytes=MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInput(f"{INDEX_FILE} must be a JSON object with a non-empty 'weight_map'")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _SHARD.fullmatch(shard):
            raise InvalidInput(
                f"{INDEX_FILE} maps {brief(name)} to {brief(shard)}; shards are named model-NNNNN-of-NNNNN.safetensors")
    shards = set(weight_map.values())
    if len(shards) > MAX_SHARDS:
        raise InvalidInput(f"{INDEX_FILE} names {len(shards)} shards; the limit is {MAX_SHARDS}")
    return weight_map


@contextlib.contextmanager
def open_weights(folder: Folder) -> Iterator[dict[str, tuple[SafetensorsReader, TensorEntry]]]:
    """Every tensor of the folder by name, with the open reader that holds it; shards checked
    against the index (each tensor in exactly the shard it names, nothing else in any shard)."""
    with contextlib.ExitStack() as stack:
        tensors: dict[str, tuple[SafetensorsReader, TensorEntry]] = {}
        for path in folder.weight_files:
            reader = stack.enter_context(SafetensorsReader(path, what=path.name))
            for name, entry in reader.header.tensors.items():
                if name in tensors:
                    raise InvalidInput(f"tensor {brief(name)} is in both {tensors[name][0].what} and {path.name}")
                if folder.weight_map is not None and folder.weight_map.get(name) != path.name:
                    raise InvalidInput(
                        f"{path.name} holds tensor {brief(name)}, which {INDEX_FILE} puts "
                        f"{'in ' + folder.weight_map[name] if name in folder.weight_map else 'nowhere'}")
                tensors[name] = (reader, entry)
        if folder.weight_map is not None:
            absent = [name for name in folder.weight_map if name not in tensors]
            if absent:
                raise InvalidInput(f"{INDEX_FILE} puts {brief(absent[0])} in {folder.weight_map[absent[0]]}, which does not hold it")
        yield tensors


# -- the architecture and its config -----------------------------------------------------------
def architecture_of(config: dict[str, Any], override: str | None) -> str:
    """The transformers class to build: ``override`` (the request's architecture) or the
    config's first ``architectures`` entry, which must be allow-listed for its model_type."""
    for key, why in _REFUSED_KEYS.items():
        if key in config:
            raise InvalidInput(f"{CONFIG_FILE} is refused: {why}; curvscope never runs remote code and builds only "
                               f"transformers' own classes of {', '.join(MODEL_TYPES)} models")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise Unimplemented(f"{CONFIG_FILE} has model_type {brief(model_type)}; supported: {', '.join(MODEL_TYPES)}")
    named = config.get("architectures")
    if override is None:
        if not (isinstance(named, list) and named and isinstance(named[0], str)):
            raise InvalidInput(f"{CONFIG_FILE} names no architecture ('architectures': [\"...\"]); add it, or give "
                               f"the class with the request, one of: {', '.join(_classes_of(model_type))}")
        override = named[0]
    if override not in ARCHITECTURES:
        raise Unimplemented(f"architecture {brief(override)} is not supported for model_type '{model_type}'; "
                            f"supported: {', '.join(_classes_of(model_type))}")
    if ARCHITECTURES[override].model_type != model_type:
        raise InvalidInput(f"architecture {override} is a {ARCHITECTURES[override].model_type} model, but "
                           f"{CONFIG_FILE} has model_type '{model_type}'")
    return override


def _classes_of(model_type: str) -> list[str]:
    return [name for name, a in ARCHITECTURES.items() if a.model_type == model_type]


def _check_dimensions(values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        name = _ALIASES.get(key, key)
        if name not in DIMENSION_CAPS or (value is None and name in _OPTIONAL_DIMENSIONS):
            continue
        cap = DIMENSION_CAPS[name]
        if type(value) is not int or not 0 < value <= cap:
            raise InvalidInput(f"{where}: {key} is {brief(value)}; it must be a whole number from 1 to {cap}")


# transformers fills these in from others when the config leaves them null
_OPTIONAL_DIMENSIONS = {"intermediate_size", "num_key_value_heads", "head_dim"}


def build(config: dict[str, Any]) -> nn.Module:
    """The factory of every architecture in ``ARCHITECTURES`` (entry-point group
    ``curvscope.architectures``): the model named by ``config['architectures'][0]``, built under
    the caller's device context, taking its inputs positionally and returning its logits."""
    name = architecture_of(config, None)
    architecture = ARCHITECTURES[name]
    _check_dimensions(config, CONFIG_FILE)
    if "id2label" in config and isinstance(config["id2label"], dict):
        _check_dimensions({"num_labels": len(config["id2label"]) or 1}, CONFIG_FILE)
    transformers = import_transformers()
    settings = {key: value for key, value in config.items() if key not in _IGNORED_KEYS}
    try:
        hf_config = getattr(transformers, architecture.config_class).from_dict(settings, attn_implementation="eager")
    except Exception as error:  # transformers' own checks of the config: one line for the user
        raise InvalidInput(f"{CONFIG_FILE} is not a valid {architecture.model_type} config: {one_line(error)}") from None
    hf_config.use_cache = False
    # what transformers resolved (defaults, derived sizes) is what sizes the parameters
    resolved = {key: getattr(hf_config, key, None) for key in DIMENSION_CAPS}
    _check_dimensions({key: value for key, value in resolved.items() if value is not None}, f"{CONFIG_FILE} (resolved)")
    try:
        model = getattr(transformers, name)(hf_config)
    except Exception as error:
        raise InvalidInput(f"transformers could not build {name} from {CONFIG_FILE}: {one_line(error)}") from None
    names = tuple(model_input.name for model_input in architecture.inputs)
    model.forward = types.MethodType(_logits_forward(type(model).forward, names, architecture.bidirectional), model)
    return model


def _logits_forward(forward: Any, names: tuple[str, ...], bidirectional: bool) -> Any:
    def positional(self: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """The model's inputs positionally (trailing ones may be left out), its logits alone."""
        if len(inputs) > len(names):
            raise TypeError(f"the model takes at most {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
        named = dict(zip(names, inputs))
        mask = named.get("attention_mask")
        if bidirectional and mask is not None and mask.dim() == 2:
            dtype = self.get_input_embeddings().weight.dtype
            named["attention_mask"] = (1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return forward(self, **named, return_dict=True).logits
    return positional


def model_inputs(architecture: str) -> tuple[ModelInput, ...]:
    return ARCHITECTURES[architecture].inputs


def transformers_installed() -> bool:
    """Whether this server can load checkpoint folders (the hf extra); without it they are neither
    advertised nor loaded."""
    return importlib.util.find_spec("transformers") is not None


def import_transformers() -> types.ModuleType:
    """``transformers``, or UNIMPLEMENTED saying how to install it."""
    hide_broken_torchvision()
    try:
        import transformers
    except ImportError as error:
        raise Unimplemented("this server cannot load Hugging Face checkpoints: install curvscope-service[hf] "
                            f"(transformers) ({one_line(error)})") from None
    return transformers


def hide_broken_torchvision() -> None:
    """transformers imports torchvision whenever one is installed, although text models use none
    of it; a torchvision built for another torch (a CUDA wheel beside a CPU torch) then fails that
    import and with it every model. Such a torchvision is hidden (``sys.modules`` entry None: no
    import finds it), so the text models still load."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure of its import: it is unusable
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        log.warning("torchvision is installed but does not import (%s); transformers will run without it",
                    one_line(error))


# -- the weights -------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightPlan:
    """Which file tensor fills which model tensor; ``tied``: further file tensors of a tied group
    (e.g. ``lm_head.weight`` beside ``transformer.wte.weight``) that must hold the same values."""

    key: str
    file_key: str
    tied: tuple[str, ...]


def plan_weights(module: nn.Module, tensors: dict[str, tuple[SafetensorsReader, TensorEntry]]) -> list[WeightPlan]:
    """Match the (meta) model's state dict against the folder's tensors before any allocation:
    every model tensor filled once (tied parameters share one file tensor), shapes equal, floats
    for floats; nothing in the files left over but tensors transformers itself never loads."""
    state = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault(id(tensor), []).append(key)
    prefix = getattr(module, "base_model_prefix", "")
    # a checkpoint of the base model (keys without "bert.") loaded into a model with a head
    strip = bool(prefix) and not any(k.startswith(prefix + ".") for k in tensors) \
        and any(k.startswith(prefix + ".") for k in state)

    def file_key(key: str) -> str:
        return key.removeprefix(prefix + ".") if strip else key

    plans, missing, mismatched, used = [], [], [], set()
    for keys in groups.values():
        present = [file_key(k) for k in keys if file_key(k) in tensors]
        if not present:
            missing.append(file_key(keys[0]))
            continue
        used.update(present)
        target = state[keys[0]]
        for name in present:
            entry = tensors[name][1]
            floating = entry.dtype.startswith(("F", "BF"))
            if entry.shape != tuple(target.shape) or floating != target.is_floating_point():
                mismatched.append(f"{name} {entry.dtype}{list(entry.shape)} vs {str(target.dtype).removeprefix('torch.')}"
                                  f"{list(target.shape)}")
        plans.append(WeightPlan(keys[0], present[0], tuple(present[1:])))
    computed = {file_key(name) for name, _ in module.named_buffers() if name not in state}
    ignored = [re.compile(pattern) for pattern in getattr(type(module), "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [name for name in tensors if name not in used and name not in computed
                  and not any(pattern.search(name) for pattern in ignored)]
    if missing or unexpected or mismatched:
        parts = [f"{label} {_names(items)}" for label, items in (
            ("missing", missing), ("unexpected", unexpected), ("mismatched (file vs model)", mismatched)) if items]
        raise InvalidInput(f"the weights do not fit {type(module).__name__} built from {CONFIG_FILE}: {'; '.join(parts)}")
    return plans


def copy_weights(module: nn.Module, plans: list[WeightPlan],
                 tensors: dict[str, tuple[SafetensorsReader, TensorEntry]]) -> None:
    """Fill the (real) model from the files, one tensor at a time, cast to the model's dtype."""
    state = module.state_dict()
    with torch.no_grad():
        for plan in plans:
            target = state[plan.key]
            tensors[plan.file_key][0].read_into(plan.file_key, target)
            for other in plan.tied:
                if not torch.equal(tensors[other][0].read(other).to(target.dtype), target):
                    raise InvalidInput(f"{CONFIG_FILE} ties {plan.file_key} and {other}, but the files hold different "
                                       "values; set \"tie_word_embeddings\": false or save the model again")


def _names(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(item if len(item) <= 80 else item[:77] + "..." for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# -- per-layer blocks --------------------------------------------------------------------------
_NUMBERED_LAYER = re.compile(r"^(.*?\.\d+\.[^.]+)\.")


def parameter_blocks(module: nn.Module) -> dict[str, list[str]]:
    """Parameters grouped at the level of a transformer block's parts, under the model's own
    names: ``bert.encoder.layer.3.attention``, ``transformer.h.0.mlp``, ``bert.embeddings``,
    ``classifier``; tied parameters count once, under their first name."""
    prefix = getattr(module, "base_model_prefix", "")
    blocks: dict[str, list[str]] = {}
    for name, _ in module.named_parameters():
        numbered = _NUMBERED_LAYER.match(name)
        if numbered:
            block = numbered.group(1)
        else:
            parts = name.split(".")
            block = ".".join(parts[:2] if parts[0] == prefix and len(parts) > 2 else parts[:1])
        blocks.setdefault(block, []).append(name)
    return blocks
