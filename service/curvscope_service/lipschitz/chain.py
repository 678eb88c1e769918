"""Recognise the networks LipSDP can bound: a plain chain of affine layers and slope-restricted
activations (Fazlyab et al., NeurIPS 2019). Anything else gets a reason naming the first
layer or operation that breaks the chain.

The tables of affine layers and activations (modules and aten ops) and the walk over an exported
graph's data are shared with the chain extraction (``network``) and the graph bound (``graph_bound``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

# layers with a weight: a chain needs at least one
WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# affine in eval mode (batch norm, dropout); a run of them is one affine map, read off by running it
AFFINE_MODULES = (*WEIGHTED_MODULES, nn.Flatten, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                  nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity)
# slope-restricted activations, by the name of their slope sector (``network.activation_slope``)
ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu",
}
_MODULE_REASONS = {
    nn.MaxPool2d: "max pooling is not slope-restricted",
    nn.MaxPool1d: "max pooling is not slope-restricted",
    nn.Softmax: "softmax is not an elementwise activation",
}

# aten schema names (without the "aten::" prefix)
AFFINE_OPS = {
    "linear", "conv1d", "conv2d", "convolution", "addmm", "mm", "matmul", "flatten", "view", "reshape",
    "_unsafe_view", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm",
    "_native_batch_norm_legit_no_training", "dropout", "clone", "contiguous", "alias", "_to_copy",
}
_WEIGHTED_OPS = {"linear", "conv1d", "conv2d", "convolution", "addmm", "mm", "matmul"}
ACTIVATION_OPS = frozenset(ACTIVATION_MODULES.values())
OP_REASONS = {
    "max_pool2d": "max pooling is not slope-restricted",
    "max_pool2d_with_indices": "max pooling is not slope-restricted",
    "add": "a residual add joins two paths",
    "sub": "a subtraction joins two paths",
    "mul": "a product of activations is not affine",
    "cat": "a concatenation joins two paths",
    "softmax": "softmax is not an elementwise activation",
    "_softmax": "softmax is not an elementwise activation",
}


@dataclass
class Chain:
    layers: list[dict[str, str]]
    found: bool
    reason: str


def module_chain(module: nn.Module) -> Chain:
    """Layers and chain verdict of a module built from a config (sequential or plugin)."""
    # imported here: loading.checkpoint imports this module for DescribeModel
    from ..loading.sequential import SPEC_TYPE_OF

    leaves = [(name, m) for name, m in module.named_modules() if not list(m.children())]
    layers = [{"name": name, "type": SPEC_TYPE_OF.get(type(m), type(m).__name__)} for name, m in leaves]
    if not is_nested_sequential(module):
        reason = f"{type(module).__name__} is not an nn.Sequential, so its data flow is unknown; export it as .pt2 to have the graph checked"
        return Chain(layers, False, reason)
    affine = 0
    for layer, (name, leaf) in zip(layers, leaves):
        if isinstance(leaf, AFFINE_MODULES):
            affine += isinstance(leaf, WEIGHTED_MODULES)
        elif not isinstance(leaf, tuple(ACTIVATION_MODULES)):
            why = _MODULE_REASONS.get(type(leaf), "it is neither an affine layer nor a supported slope-restricted activation")
            return Chain(layers, False, f"layer '{name}' ({layer['type']}): {why}")
    if not affine:
        return Chain(layers, False, "the network has no linear or convolutional layer")
    return Chain(layers, True, f"a plain chain of {affine} linear or convolutional layers with affine layers and slope-restricted activations between them")


def is_nested_sequential(module: nn.Module) -> bool:
    """Whether the module is an nn.Sequential of layers and nested nn.Sequentials: its data flow is its order."""
    if not isinstance(module, nn.Sequential):
        return False
    return all(is_nested_sequential(c) or not list(c.children()) for c in module.children())


def graph_chain(module: fx.GraphModule) -> Chain:
    """Layers and chain verdict of an exported graph: follow the data from the input to the output."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    data: set[fx.Node] = set(placeholders[-1:])  # the user input comes after lifted state
    layers: list[dict[str, str]] = []
    offence = branch = ""  # a join or foreign op names the problem better than the branch before it
    affine = 0
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if a in data]
        if not inputs or not is_tensor_valued(node):
            continue  # a computation on weights only (a transpose), or a shape query (sym_size)
        data.add(node)
        if node.target is operator.getitem:
            continue  # picks the output of a multi-output op such as native batch norm
        op = op_name(node)
        layers.append({"name": node.name, "type": op})
        if len(inputs) > 1:
            offence = offence or f"'{node.name}' ({op}): " + OP_REASONS.get(op, "it combines two paths")
        elif op not in AFFINE_OPS and op not in ACTIVATION_OPS:
            why = OP_REASONS.get(op, "it is neither an affine layer nor a supported slope-restricted activation")
            offence = offence or f"'{node.name}' ({op}): {why}"
        else:
            affine += op in _WEIGHTED_OPS
        users = live_users(inputs[0])
        if len(users) > 1:
            branch = branch or f"'{inputs[0].name}' feeds {len(users)} operations: the network branches"
    reason = offence or branch or ("" if affine else "the network has no linear or convolutional layer")
    if reason:
        return Chain(layers, False, reason)
    return Chain(layers, True, f"a plain chain of {affine} linear or convolutional layers with affine layers and slope-restricted activations between them")


def op_name(node: fx.Node) -> str:
    """The aten schema name of a call (without "aten::"), else the callable's name."""
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name.split("::", 1)[-1]
    return getattr(node.target, "__name__", str(node.target))


def live_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that use ``node``'s value as data: shape queries and unused outputs of multi-output
    ops (batch norm statistics) are not branches."""
    return [
        u
        for u in node.users
        if u.op == "output"
        or (is_tensor_valued(u) and not (u.target is operator.getitem and not u.users))
    ]


def is_tensor_valued(node: fx.Node) -> bool:
    """Whether the node's value is a tensor (or a tuple of them), not a shape or a scalar."""
    return isinstance(node.meta.get("val"), (torch.Tensor, tuple, list))
