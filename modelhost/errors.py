"""An exception's text in one line: users read one line, not a library's paragraph."""
from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first non-blank line`` of an exception, cut to ``limit``; for a remote error, of
    the exception Ray carried over (``.cause``) rather than its traceback."""
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:limit]
