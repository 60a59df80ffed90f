"""An exception's text in one line: users read one line, not a library's paragraph."""
from __future__ import annotations


def error_lines(err: BaseException) -> list[str]:
    """The non-blank lines of ``str(err)``, stripped."""
    return [line.strip() for line in str(err).splitlines() if line.strip()]


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-blank line of ``str(err)`` (its type's name when it has no text), cut to ``limit``."""
    lines = error_lines(err)
    return (lines[0] if lines else type(err).__name__)[:limit]
