"""Parse JSON from untrusted bytes with its size and nesting bounded.

Every JSON text a user sends (a safetensors header, its ``config`` metadata, a data header,
``architecture_config_json``, the program of a torch.export archive) goes through here, so a
document nested 200,000 deep or a header of 100 MB is refused with a one-line message instead of
a RecursionError, and code that walks the result recursively never meets a deep tree.
"""

from __future__ import annotations

import json
from typing import Any

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.messages import one_line

# Real documents are shallow: a torch.export program nests ~15 deep, configs and headers < 6.
MAX_DEPTH = 64


def parse_json(text: str | bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``, or InvalidInput naming ``what`` when it is too large, too deep or invalid."""
    if len(text) > max_bytes:
        raise InvalidInput(f"{what} is {len(text)} bytes of JSON; the limit is {max_bytes}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidInput(f"{what} nests JSON deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"{what} is not valid JSON ({one_line(e)})") from None
    _check_depth(value, what=what, max_depth=max_depth)
    return value


def _check_depth(value: Any, *, what: str, max_depth: int) -> None:
    # iterative, one iterator per open container: memory grows with the depth, not the document
    stack = [iter((value,))]
    while stack:
        node = next(stack[-1], _END)
        if node is _END:
            stack.pop()
        elif isinstance(node, (dict, list)):
            if len(stack) > max_depth:
                raise InvalidInput(f"{what} nests JSON deeper than {max_depth} levels")
            stack.append(iter(node.values() if isinstance(node, dict) else node))


_END = object()
