"""Text our error messages share: library exceptions as one line, and the refusal of pickles."""

from __future__ import annotations

_MAX_CHARS = 200


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, shortened; library text can span pages."""
    text = str(exc).strip() or type(exc).__name__
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return first if len(first) <= _MAX_CHARS else first[: _MAX_CHARS - 3] + "..."


def brief(value: object) -> str:
    """``repr(value)`` clipped: a hostile file can put megabytes into one field of a header or config."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# a torch.save file (a raw pickle, or a zip around one) in place of a model
NEVER_UNPICKLE = (
    "this is a torch.save pickle; curvscope never unpickles; "
    "export with torch.export.save or save a safetensors state dict (see docs/formats.md)"
)
