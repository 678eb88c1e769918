"""Turn a torch.export archive (``.pt2``), read by ``pt2_archive``, into a module of aten operators."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.messages import one_line
from curvscope_service.loading.model_inputs import ModelInput
from curvscope_service.loading.pt2_archive import read_archive
from curvscope_service.loading.pt2_program import REEXPORT

# Python-level callables export emits for symbolic sizes; everything else must be an aten/prims op.
_PYTHON_OPS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.not_,
    operator.getitem, math.trunc, math.floor, math.ceil, math.sqrt,
    torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_ite,
    torch.sym_sqrt, torch.sym_sum,
}
# op -> name of its argument that switches training behaviour on
_TRAINING_FLAGS = {
    "aten::batch_norm": "training",
    "aten::dropout": "train",
    "aten::feature_dropout": "train",
    "aten::alpha_dropout": "train",
    "aten::native_dropout": "train",
    "aten::_native_batch_norm_legit": "training",
}


@dataclass
class ExportedModel:
    module: nn.Module
    inputs: tuple[ModelInput, ...]  # the exported signature's user inputs, in order
    fixed_batch_size: int | None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """One sample's shape for a model of one input with static sample dimensions, else None."""
        if len(self.inputs) != 1 or self.inputs[0].sample_shape is None or None in self.inputs[0].sample_shape:
            return None
        return tuple(int(d) for d in self.inputs[0].sample_shape)  # type: ignore[arg-type]


def load_exported(path: Path, *, max_parameters: int) -> ExportedModel:
    """Read, deserialise and unlift a ``.pt2``; the module's graph has only aten operators."""
    contents = read_archive(path, max_parameters=max_parameters)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, contents.program)
        # no sample inputs: they are a pickle, and curvscope never needs them
        program = ExportedProgramDeserializer().deserialize(serialized, contents.state_dict, contents.constants, None)
    except (InvalidInput, MemoryError, SystemError):
        # MemoryError, and SystemError (C code that failed an allocation without setting an
        # exception): the vetting child reports both as a size problem under its memory cap
        raise
    except Exception as e:  # the deserialiser raises SerializeError, KeyError, AssertionError, TypeError...
        raise InvalidInput(f"model could not be loaded as a torch.export archive: {one_line(e)}; {REEXPORT}") from None
    inputs, fixed_batch_size = _inputs(program)
    try:
        # check_guards=False: the reader dropped the guard code; nothing generated from it runs
        module = program.module(check_guards=False)
    except MemoryError:
        raise
    except Exception as e:
        raise InvalidInput(f"torch.export archive could not be turned into a module: {one_line(e)}; {REEXPORT}") from None
    _check_graph(module)
    return ExportedModel(module=module, inputs=inputs, fixed_batch_size=fixed_batch_size)


def _inputs(program: torch.export.ExportedProgram) -> tuple[tuple[ModelInput, ...], int | None]:
    """The user inputs (name, dtype, one sample's shape) and the batch size if it was exported static."""
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if not user_inputs:
        raise InvalidInput("torch.export model takes no inputs; export it with its input tensors (batch, ...)")
    inputs, batches = [], set()
    for name in user_inputs:
        node = placeholders.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise InvalidInput(
                f"torch.export model's input '{name:.40}' is not a batched tensor; export it with inputs of shape (batch, ...)"
            )
        batch, *sample = value.shape
        batches.add(int(batch) if isinstance(batch, int) else None)
        dtype = None if value.dtype.is_floating_point else value.dtype
        inputs.append(ModelInput(name, dtype, tuple(int(d) if isinstance(d, int) else None for d in sample)))
    if len(batches) != 1:
        raise InvalidInput("torch.export model's inputs disagree on the batch dimension; export them with one shared batch size")
    return tuple(inputs), batches.pop()


def retarget_precision(module: nn.Module, dtype: torch.dtype) -> None:
    """Make the graph compute in ``dtype``: every float32 dtype that export recorded (casts such as
    ``.to(torch.float32)`` of an attention mask, ``torch.full(..., dtype=float32)``, the dtype
    checks export inserts) becomes ``dtype``, so a float64 analysis is float64 throughout instead
    of failing a dtype check or rounding through float32 at every recorded cast. Integer dtypes
    (token ids, masks) are left alone."""
    if dtype == torch.float32:
        return

    def retarget(value: Any) -> Any:
        if value is torch.float32:
            return dtype
        if isinstance(value, (list, tuple)):
            return type(value)(retarget(v) for v in value)
        return value

    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.args = retarget(node.args)
                node.kwargs = {k: retarget(v) for k, v in node.kwargs.items()}
        gm.recompile()


def _check_graph(module: nn.Module) -> None:
    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            if node.op != "call_function" or not _allowed_target(node.target):
                raise InvalidInput(
                    f"torch.export graph node '{node.name}' calls {node.target!s:.80}, which curvscope does not run; {REEXPORT}"
                )
            flag = _TRAINING_FLAGS.get(node.target._schema.name) if isinstance(node.target, torch._ops.OpOverload) else None
            if flag and argument(node, flag):
                raise InvalidInput(
                    f"torch.export model was exported in training mode ({node.target} at '{node.name}'); "
                    "call model.eval() before torch.export.export"
                )


def _allowed_target(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in ("aten", "prims")
    return target in _PYTHON_OPS


def argument(node: fx.Node, name: str) -> Any:
    """The value of ``node``'s schema argument ``name`` (positional or keyword), or its default."""
    for index, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            if index < len(node.args):
                return node.args[index]
            return node.kwargs.get(name, arg.default_value if arg.has_default_value() else None)
    return None

