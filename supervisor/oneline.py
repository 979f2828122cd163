"""Keep every log event of the master on one line (docs/security.md), whoever logs it.

Under journald or Loki each line of output is a record of its own: a
traceback or a message with line breaks would become a dozen records without
a level. The master's own messages are written as one line; this filter is
the guarantee for the rest (gunicorn's "Unhandled exception in main loop",
`logger.exception` anywhere): line breaks in the message are replaced, and an
exception becomes fields (`error`, `traceback`) on the same line.
"""

from __future__ import annotations

import logging
import os
import traceback
from types import TracebackType
from typing import Any

SEPARATOR = " | "
_TRACEBACK_FRAMES = 8  # the innermost ones: where it failed, and what called it


def one_line(text: str) -> str:
    return SEPARATOR.join(part for part in text.replace("\r", "\n").split("\n") if part.strip())


def describe(exc: BaseException) -> str:
    """`Type: message` on one line (the message may itself hold line breaks)."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def frames(tb: TracebackType | None) -> str:
    """Where an exception came from, outermost first: `file:line in function > ...`."""
    summary = traceback.extract_tb(tb)[-_TRACEBACK_FRAMES:]
    return " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in summary)


class OneLineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message or "\r" in message:
            record.msg, record.args = one_line(message), None
        exc_info = record.exc_info
        if exc_info or record.exc_text or record.stack_info:
            fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
            if exc_info and exc_info[1] is not None:
                fields["error"] = describe(exc_info[1])
                fields["traceback"] = frames(exc_info[2])
            record.fields = fields
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


def install(handler: logging.Handler) -> logging.Handler:
    if not any(isinstance(f, OneLineFilter) for f in handler.filters):
        handler.addFilter(OneLineFilter())
    return handler
