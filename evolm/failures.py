"""A failed evaluation as data: the root cause's type and message, and a bounded traceback."""
from __future__ import annotations

import traceback

TRACEBACK_CHARS = 4000
"""A failure record keeps at most about this much traceback (of each chained exception, the end)."""


def _chain(exc: BaseException) -> list[BaseException]:
    """The exceptions chained by ``raise ... from`` or raised while handling another, innermost first."""
    chain = [exc]
    while True:
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None or any(inner is e for e in chain) or len(chain) >= 8:
            return chain[::-1]
        chain.append(inner)
        exc = inner


def _describe(exc: BaseException, limit: int = 1000) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _bounded(text: str, limit: int = TRACEBACK_CHARS) -> str:
    """Its start and, larger, its end (the innermost frames and the message)."""
    if len(text) <= limit:
        return text
    head, tail = limit // 5, limit - limit // 5
    return f"{text[:head]}\n... [{len(text) - head - tail} characters cut] ...\n{text[-tail:]}"


def failure_record(exc: BaseException, traceback_text: str | None = None) -> dict:
    """``error`` and ``traceback`` of a failure record: the root cause's type and message first
    (what went wrong, not only the wrapper that passed it on), and a bounded traceback."""
    chain = _chain(exc)
    root = chain[0]
    error = _describe(root) if root is exc else f"{_describe(root)} (raised as {_describe(exc, 300)})"
    if traceback_text is None:
        parts = []
        for inner, outer in zip(chain, chain[1:] + [None]):
            parts.append(_bounded("".join(traceback.format_exception(inner, chain=False, limit=-8)),
                                  TRACEBACK_CHARS // len(chain)))
            if outer is not None:
                parts.append("\nThe above exception was the direct cause of the following exception:\n\n"
                             if outer.__cause__ is inner else
                             "\nDuring handling of the above exception, another exception occurred:\n\n")
        traceback_text = "".join(parts)
    return {"error": error, "traceback": _bounded(traceback_text)}
