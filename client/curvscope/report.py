"""The analysis report: the typed API message, and its JSON form (schema curvscope.report/v1)."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ._proto.curvscope.v1 import curvscope_pb2 as pb


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as plain JSON data with the proto field names.

    Unlike protobuf's JSON mapping, 64-bit integers stay numbers, every scalar of a present
    message is written (a converged=false or a 0.0 eigenvalue is information), sub-messages and
    ``optional`` scalars only when set, and enum values by their name.
    """
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {
                key: message_to_dict(item) if value_field.type == FieldDescriptor.TYPE_MESSAGE else item
                for key, item in sorted(value.items())
            }
        elif field.is_repeated:
            out[field.name] = [message_to_dict(item) if is_message else _scalar(field, item) for item in value]
        elif is_message or field.has_presence:
            if message.HasField(field.name):
                out[field.name] = message_to_dict(value) if is_message else _scalar(field, value)
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    return value


def json_ready(data: Any) -> Any:
    """``data`` with every non-finite float written as protobuf's JSON mapping writes it
    ("NaN", "Infinity", "-Infinity"), so that ``json.dumps(..., allow_nan=False)`` succeeds and
    ``Report.from_dict`` reads the value back as the same float (a null would read back as 0.0)."""
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(value) for value in data]
    if isinstance(data, float) and not math.isfinite(data):
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    return data


def dumps(data: Any, indent: int | None = 2) -> str:
    """Strict JSON (never a bare NaN or Infinity, which JSON does not have)."""
    return json.dumps(json_ready(data), indent=indent, allow_nan=False)


class Report:
    """A finished analysis: ``report.message`` is the typed API message, ``report.to_dict()``
    the JSON report. Results are read like ``report.results.hessian_eigen.largest``."""

    def __init__(self, message: pb.Report):
        self.message = message

    @property
    def results(self) -> pb.Results:
        return self.message.results

    @property
    def per_layer(self) -> dict[str, pb.Results]:
        return dict(self.message.per_layer)

    def to_dict(self) -> dict[str, Any]:
        return message_to_dict(self.message)

    def to_json(self, indent: int | None = 2) -> str:
        """The JSON report; a non-finite value (a diverged loss, a NaN eigenvalue) is written
        as the string "NaN", "Infinity" or "-Infinity", as protobuf's JSON mapping does."""
        return dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        from google.protobuf import json_format

        return cls(json_format.ParseDict(data, pb.Report()))

    def __repr__(self) -> str:
        return f"Report({self.to_json(indent=None)})"

    def _repr_html_(self) -> str:
        """Jupyter's view: the page of ``curvscope report --html``, as one compact block."""
        from .html_report import render_fragment

        return render_fragment(self.to_dict())

    def to_rows(self) -> list[dict[str, Any]]:
        """Every value of the report as a row: ``path`` (as gate policies write it:
        ``results.hessian_eigen.largest[0]``), ``section`` (results, per_layer, model, ...),
        ``layer`` (the parameter block, for per_layer), ``analysis`` and ``value``. Lists are
        written out whole, curves included."""
        rows: list[dict[str, Any]] = []
        for path, value in _leaves(self.to_dict(), ()):
            section = str(path[0])
            layer = str(path[1]) if section == "per_layer" and len(path) > 1 else None
            where = 2 if layer is not None else 1
            analysis = str(path[where]) if section in ("results", "per_layer") and len(path) > where else None
            rows.append({"path": _path_text(path), "section": section, "layer": layer, "analysis": analysis,
                         "value": value})
        return rows

    def to_pandas(self) -> Any:
        """``to_rows()`` as a pandas DataFrame (needs pandas: ``pip install 'curvscope[pandas]'``)."""
        try:
            import pandas
        except ModuleNotFoundError:
            raise ModuleNotFoundError("Report.to_pandas needs pandas: pip install 'curvscope[pandas]'") from None
        return pandas.DataFrame(self.to_rows(), columns=["path", "section", "layer", "analysis", "value"])


def _leaves(data: Any, path: tuple[str | int, ...]) -> Any:
    """(path, scalar) for every scalar of a report dict, in its order."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            yield from _leaves(item, path + (index,))
    else:
        yield path, data


def _path_text(path: tuple[str | int, ...]) -> str:
    from .policy import format_path

    return format_path(tuple(("index", part) if isinstance(part, int) else ("key", part) for part in path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the report, shipped with the client."""
    return json.loads(resources.files("curvscope").joinpath("schema/report.schema.json").read_text())
