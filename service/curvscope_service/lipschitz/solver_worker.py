"""The solver subprocess: ``python -m curvscope_service.lipschitz.solver_worker MEMORY_MIB``.

Reads LipSDP problems from stdin and writes results to stdout, one length-prefixed JSON message
each (arrays as base64 float64), until stdin closes. Only this process imports cvxpy.
"""

from __future__ import annotations

import base64
import json
import resource
import struct
import sys
from typing import Any, BinaryIO

import numpy as np

HEADER = struct.Struct("<Q")


def encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value, dtype=np.float64)
        return {"__array__": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape)}
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            return np.frombuffer(base64.b64decode(value["__array__"]), dtype=np.float64).reshape(value["shape"]).copy()
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def write_message(stream: BinaryIO, value: Any) -> None:
    body = json.dumps(encode(value)).encode()
    stream.write(HEADER.pack(len(body)) + body)
    stream.flush()


def read_message(stream: BinaryIO) -> Any:
    """The next message, or None at the end of the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return decode(json.loads(body))


def main() -> None:
    from curvscope_service.lipschitz import lipsdp, lipsdp_graph

    import cvxpy  # noqa: F401  (warm: the first solve should not pay for the import)

    limit = int(sys.argv[1]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # solver chatter must not corrupt the message stream
    write_message(stdout, {"status": "ready"})
    while (problem := read_message(stdin)) is not None:
        try:
            result = (lipsdp_graph if problem.get("form") == "graph" else lipsdp).solve(problem)
        except MemoryError:
            result = {"status": "memory"}
        except Exception as error:  # a failed solve is a status to report, not a dead worker
            result = {"status": f"solver_error: {type(error).__name__}: {error}"}
        write_message(stdout, result)


if __name__ == "__main__":
    main()
