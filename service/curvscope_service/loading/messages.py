"""Turn library exceptions into the one-line text our error messages embed."""

from __future__ import annotations

_MAX_CHARS = 200


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, shortened; library text can span pages."""
    text = str(exc).strip() or type(exc).__name__
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return first if len(first) <= _MAX_CHARS else first[: _MAX_CHARS - 3] + "..."
