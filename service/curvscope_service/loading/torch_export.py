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
    input_shape: tuple[int, ...] | None
    fixed_batch_size: int | None


def load_exported(path: Path, *, max_parameters: int) -> ExportedModel:
    """Read, deserialise and unlift a ``.pt2``; the module's graph has only aten operators."""
    contents = read_archive(path, max_parameters=max_parameters)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, contents.program)
        # no sample inputs: they are a pickle, and curvscope never needs them
        program = ExportedProgramDeserializer().deserialize(serialized, contents.state_dict, contents.constants, None)
    except (InvalidInput, MemoryError):  # MemoryError: the vetting child reports it as a size problem
        raise
    except Exception as e:  # the deserialiser raises SerializeError, KeyError, AssertionError, TypeError...
        raise InvalidInput(f"model could not be loaded as a torch.export archive: {one_line(e)}; {REEXPORT}") from None
    input_shape, fixed_batch_size = _input_shape(program)
    try:
        # check_guards=False: the reader dropped the guard code; nothing generated from it runs
        module = program.module(check_guards=False)
    except MemoryError:
        raise
    except Exception as e:
        raise InvalidInput(f"torch.export archive could not be turned into a module: {one_line(e)}; {REEXPORT}") from None
    _check_graph(module)
    return ExportedModel(module=module, input_shape=input_shape, fixed_batch_size=fixed_batch_size)


def _input_shape(program: torch.export.ExportedProgram) -> tuple[tuple[int, ...] | None, int | None]:
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if len(placeholders) != 1:
        raise InvalidInput(
            f"torch.export model takes {len(placeholders)} inputs; curvscope feeds exactly one tensor (the data's 'inputs')"
        )
    value = placeholders[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        raise InvalidInput("torch.export model's input is not a batched tensor; export it with an input of shape (batch, ...)")
    batch, *sample = value.shape
    fixed_batch_size = int(batch) if isinstance(batch, int) else None
    input_shape = tuple(int(d) for d in sample) if all(isinstance(d, int) for d in sample) else None
    return input_shape, fixed_batch_size


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

