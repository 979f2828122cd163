"""Logging: the TRACE level, text and JSON formats, and the per-request line.

Only three environment variables shape logging (README "Logs"): FLUXGATE_LOG (level),
FLUXGATE_LOG_STYLE (colour) and FLUXGATE_LOG_FORMAT (text or json). Every
Fluxgate logger lives under "fluxgate"; gunicorn's and uvicorn's error loggers
are given the same handler so an operator reads one format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TextIO

from pythonjsonlogger.json import JsonFormatter

if TYPE_CHECKING:
    from .exchange import Exchange

TRACE: Final = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS: Final = {
    "TRACE": TRACE,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}
DEFAULT_LEVEL: Final = "TRACE"

_COLOURS: Final = {
    "TRACE": "\x1b[2m",
    "DEBUG": "\x1b[36m",
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_RESET: Final = "\x1b[0m"

request_log = logging.getLogger("fluxgate.request")


_NEEDS_QUOTES: Final = re.compile(r'[\s"=\\]')


def _quoted(text: str) -> str:
    if not text or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _TextValues(dict[str, str]):
    """Strings as they appear in a text line, remembered: a request line's strings
    (method, key id, upstream, URL) repeat from line to line."""

    LIMIT: Final = 4096  # entries, each at most LONGEST characters
    LONGEST: Final = 256

    def __missing__(self, text: str) -> str:
        value = _quoted(text)
        if len(text) <= self.LONGEST:
            if len(self) >= self.LIMIT:
                self.clear()
            self[text] = value
        return value


# A string as it appears in a text line (quoted if it must be): `text_str[s]`.
text_str: Final = _TextValues()


def _text_value(value: object) -> str:
    if type(value) is str:
        return text_str[value]
    if type(value) is int or type(value) is float:  # nothing to quote
        return str(value)
    return _quoted(str(value))


class _SecondCache:
    """gmtime+strftime cost more than the rest of a line; a second's prefix is reused."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def timestamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int(msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """`LEVEL timestamp message key=value…`, with no module-path prefix."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour
        self._clock = _SecondCache()
        self._levels = {
            logging.getLevelName(name): self._level_text(name)
            for name in ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        }

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock.timestamp(record.created, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        level = self.level_text(record.levelno)
        fields: Mapping[str, Any] | None = getattr(record, "fields", None)
        line = self.line(level, record.created, record.msecs, record.getMessage(), fields)
        if record.exc_info:
            line += " exception=" + _quoted(self.formatException(record.exc_info))
        # One event, one line: journald and Loki make each line its own record.
        if "\n" in line or "\r" in line:
            line = line.replace("\r", "\\r").replace("\n", "\\n")
        return line

    def line(
        self,
        level: str,
        created: float,
        msecs: float,
        message: str,
        fields: Mapping[str, Any] | None,
    ) -> str:
        """One line from its parts; `RequestLog` calls it without making a LogRecord."""
        line = self.head(level, created, msecs, message)
        if fields:
            line += " " + " ".join([f"{k}={_text_value(v)}" for k, v in fields.items()])
        return line

    def head(self, level: str, created: float, msecs: float, message: str) -> str:
        """What precedes the fields: level, timestamp, message."""
        return f"{level} {self._clock.timestamp(created, msecs)} {message}"

    def level_text(self, levelno: int) -> str:
        return self._levels.get(levelno) or self._level_text(logging.getLevelName(levelno))

    def _level_text(self, levelname: str) -> str:
        text = f"{levelname:<5}"
        return _COLOURS.get(levelname, "") + text + _RESET if self.colour else text


class FieldsJsonFormatter(JsonFormatter):
    """One JSON object per line; a record's `fields` become top-level keys."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = _SecondCache()

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        fields = log_data.pop("fields", None)
        if fields:
            log_data.update(fields)
        log_data["level"] = self.level_text(record.levelno)
        log_data["timestamp"] = self._clock.timestamp(record.created, record.msecs)

    def line(
        self,
        level: str,
        created: float,
        msecs: float,
        message: str,
        fields: Mapping[str, Any] | None,
    ) -> str:
        """What `format` makes of such a record, without one (see RequestLog)."""
        log_data = {"message": message, **(fields or {}), "level": level,
                    "timestamp": self._clock.timestamp(created, msecs)}  # fmt: skip
        return self.serialize_log_record(self.process_log_record(log_data))

    def level_text(self, levelno: int) -> str:
        return str(logging.getLevelName(levelno))


def parse_level(value: str | None) -> int:
    if not value:
        return LEVELS[DEFAULT_LEVEL]
    return LEVELS.get(value.strip().upper(), LEVELS[DEFAULT_LEVEL])


def make_handler(
    env: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> logging.Handler:
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if env.get("FLUXGATE_LOG_FORMAT", "text").strip().lower() == "json":
        handler.setFormatter(FieldsJsonFormatter(reserved_attrs=[*_RESERVED, "color_message"]))
    else:
        style = env.get("FLUXGATE_LOG_STYLE", "auto").strip().lower()
        colour = style == "always" or (style == "auto" and stream.isatty())
        handler.setFormatter(TextFormatter(colour))
    return handler


# LogRecord attributes that are not user fields (python-json-logger would
# otherwise copy every one of them into the JSON object).
_RESERVED: Final = [
    "args",
    "asctime",
    "created",
    "exc_info",
    "exc_text",
    "filename",
    "funcName",
    "levelname",
    "levelno",
    "lineno",
    "module",
    "msecs",
    "message",
    "msg",
    "name",
    "pathname",
    "process",
    "processName",
    "relativeCreated",
    "stack_info",
    "thread",
    "threadName",
    "taskName",
]


def configure_logging(env: Mapping[str, str] | None = None) -> logging.Handler:
    """Install one handler on the loggers Fluxgate and its libraries write to."""
    # No line shows the caller's file, thread or process: skip collecting them
    # for every record (the logging docs' own advice for speed).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    env = os.environ if env is None else env
    level = parse_level(env.get("FLUXGATE_LOG"))
    handler = make_handler(env)
    for name in ("fluxgate", "gunicorn.error", "uvicorn.error", "supervisor"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # The libraries' DEBUG/TRACE output is per-connection chatter and config
    # dumps (and at TRACE uvicorn wraps the app in a message-logging
    # middleware): their loggers stay at INFO or above.
    for name in ("gunicorn.error", "uvicorn.error"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    # uvicorn's access log would duplicate our request line.
    logging.getLogger("uvicorn.access").disabled = True
    return handler


# Query parameters that carry credentials for some API or client library.
# A client that puts its key there (mistakenly) must not get it logged.
_CREDENTIAL_PARAMS: Final = frozenset(
    {b"key", b"api_key", b"api-key", b"apikey", b"token", b"access_token", b"auth", b"jwt",
     b"x-api-key", b"password", b"secret", b"client_secret", b"signature", b"sig"}
)  # fmt: skip


def loggable_target(target: bytes) -> str:
    """The request-target for `request_url`, with credential-like query values masked,
    and the userinfo of an absolute-form target (refused, but logged) too."""
    if target[:1] != b"/":
        scheme, sep, rest = target.partition(b"://")
        authority, slash, tail = rest.partition(b"/")
        if sep and b"@" in authority:
            host = authority.rpartition(b"@")[2]
            target = scheme + b"://REDACTED@" + host + slash + tail
    path, sep, query = target.partition(b"?")
    if sep and query:
        params = query.split(b"&")
        for i, param in enumerate(params):
            name, eq, _ = param.partition(b"=")
            if eq and name.lower() in _CREDENTIAL_PARAMS:
                params[i] = name + b"=REDACTED"
        target = path + b"?" + b"&".join(params)
    return target.decode("latin-1")


def loggable_url(url: str) -> str:
    """An upstream URL for `target_url`, masked like `loggable_target`: the query
    is forwarded as the client sent it, credential-like values included."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    return base + loggable_target(b"?" + query.encode("latin-1"))


class RequestLog:
    """The per-request TRACE line (README "Logs"), written in batches.

    A line formatted in the middle of request handling costs about three
    times what it costs in a loop, because the logging code is cold in the
    CPU caches by then. So a request
    only queues its raw values and its end time; `render` turns them into
    fields (the ones to show: None is left out by `render`) and the lines are
    formatted and written together, at most `delay` seconds later (as nginx's
    buffered access_log does), or at the next loop turn once `batch` lines
    wait: formatting all of a busy 50 ms at once stalled the loop (it showed
    as the 1-connection p99 with TRACE on; BENCHMARKS.md). Shutdown
    flushes the queue; a worker killed outright loses at most `delay` of lines.
    """

    def __init__(
        self,
        render: Callable[[Any], dict[str, Any]],
        logger: logging.Logger = request_log,
        delay: float = 0.05,
        batch: int = 32,
        render_text: Callable[[Any], str] | None = None,
    ) -> None:
        self.render = render
        # The same fields as `render`, already as TextFormatter writes them
        # (`k=v` pairs): the text format is the default, and skipping the
        # dict and the generic per-value dispatch halves a line's cost.
        self.render_text = render_text
        self.logger = logger
        self.delay = delay
        self.batch = batch
        self._pending: list[tuple[float, Any]] = []
        self._timer: asyncio.Handle | None = None

    def add(self, values: Any) -> None:
        pending = self._pending
        pending.append((time.time(), values))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self.flush)
        elif len(pending) == self.batch:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        for handler in _handlers(self.logger):
            if handler.level > TRACE:
                continue
            if isinstance(handler, logging.StreamHandler):
                text = self._batch_text(handler, pending)
                with handler.lock or contextlib.nullcontext():
                    handler.stream.write(text)
                    handler.flush()
            else:
                for record in self._records(pending):
                    handler.handle(record)

    def _batch_text(self, handler: logging.StreamHandler[Any], pending: list[Any]) -> str:
        """The batch as one string: one write instead of a write and a flush per line."""
        end, formatter = handler.terminator, handler.formatter
        if handler.filters or not isinstance(formatter, TextFormatter | FieldsJsonFormatter):
            records = [r for r in self._records(pending) if handler.filter(r)]
            return "".join([handler.format(r) + end for r in records])
        # The configured formats need no LogRecord (a third of a line's cost).
        level = formatter.level_text(TRACE)
        if isinstance(formatter, TextFormatter) and self.render_text is not None:
            head, text = formatter.head, self.render_text
            return "".join([head(level, t, t % 1 * 1000, "request") + " " + text(values) + end
                            for t, values in pending])  # fmt: skip
        line, render = formatter.line, self.render
        return "".join([line(level, t, t % 1 * 1000, "request", render(values)) + end
                        for t, values in pending])  # fmt: skip

    def _records(self, pending: list[tuple[float, Any]]) -> list[logging.LogRecord]:
        logger = self.logger
        records = []
        for created, values in pending:
            fields = self.render(values)
            record = logger.makeRecord(
                logger.name, TRACE, "", 0, "request", (), None, extra={"fields": fields}
            )
            record.created = created
            record.msecs = (created % 1) * 1000
            records.append(record)
        return records


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of `logger` reaches, as `Logger.callHandlers` finds them."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found.extend(current.handlers)
        current = current.parent if current.propagate else None
    return found


def log_fields(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with key=value fields, omitting the ones that are None."""
    if logger.isEnabledFor(level):
        clean = {k: v for k, v in fields.items() if v is not None}
        logger.log(level, message, extra={"fields": clean})


# The request line (README "Logs"), built from the request's Exchange.


def request_values(ex: Exchange, client_ip: str | None, duration: float) -> tuple[Any, ...]:
    """What the line needs, taken at the request's end (see `RequestLog`).

    Plain values only, so the request's scope and Exchange are freed now rather
    than held until the batch is written; formatting waits for the batch.
    """
    return (
        client_ip,
        ex.method,
        ex.target,
        ex.request_length,
        ex.key_id,
        ex.upstream,
        ex.provider_key,
        ex.target_url,
        ex.status,
        ex.outcome,
        ex.attempts,
        ex.auth_error,
        ex.limit,
        duration,
        ex.ttfb_ms,
        ex.request_bytes,
        ex.response_bytes,
        ex.response_length,
        ex.usage,
    )


def request_fields(values: tuple[Any, ...]) -> dict[str, Any]:
    """The log line's fields (those that are not None), from `request_values`."""
    (client_ip, method, target, request_length, key_id, upstream, provider_key, target_url,
     status, outcome, attempts, auth_error, limit, duration, ttfb_ms, request_bytes,
     response_bytes, response_length, usage) = values  # fmt: skip
    fields: dict[str, Any] = {"client_ip": client_ip, "method": method,
                              "request_url": loggable_target(target)}  # fmt: skip
    if client_ip is None:
        del fields["client_ip"]
    if request_length is not None:
        fields["request_body_length"] = request_length
    if key_id is not None:
        fields["api_key"] = key_id
    if upstream is not None:
        fields["upstream"] = upstream
    if provider_key is not None:
        fields["provider_key"] = provider_key
    if target_url is not None:
        fields["target_url"] = loggable_url(target_url)
    fields["status"] = status
    fields["outcome"] = outcome
    if attempts:
        fields["attempts"] = attempts
    if auth_error is not None:
        fields["auth_error"] = auth_error
    if limit is not None:
        fields["limit"] = limit
    fields["duration_ms"] = round(duration * 1000, 3)
    if ttfb_ms is not None:
        fields["ttfb_ms"] = round(ttfb_ms, 3)
    fields["request_bytes"] = request_bytes
    fields["response_bytes"] = response_bytes
    if response_length is not None:
        fields["response_body_length"] = response_length
    if usage is not None and (counts := usage.result()) is not None:
        fields.update((k, v) for k, v in counts.fields().items() if v is not None)
    return fields


def request_text(values: tuple[Any, ...]) -> str:
    """`request_fields` as the text format writes them, without the dict.

    Must produce exactly what TextFormatter makes of `request_fields(values)`
    (tests/test_logs.py checks it on generated values).
    """
    (client_ip, method, target, request_length, key_id, upstream, provider_key, target_url,
     status, outcome, attempts, auth_error, limit, duration, ttfb_ms, request_bytes,
     response_bytes, response_length, usage) = values  # fmt: skip
    parts = [] if client_ip is None else ["client_ip=" + text_str[client_ip]]
    parts.append("method=" + text_str[method])
    parts.append("request_url=" + text_str[loggable_target(target)])
    if request_length is not None:
        parts.append(f"request_body_length={request_length}")
    if key_id is not None:
        parts.append("api_key=" + text_str[key_id])
    if upstream is not None:
        parts.append("upstream=" + text_str[upstream])
    if provider_key is not None:
        parts.append("provider_key=" + text_str[provider_key])
    if target_url is not None:
        parts.append("target_url=" + text_str[loggable_url(target_url)])
    parts.append(f"status={status} outcome={text_str[outcome]}")
    if attempts:
        parts.append(f"attempts={attempts}")
    if auth_error is not None:
        parts.append("auth_error=" + auth_error)  # one of fluxgate.auth's fixed words
    if limit is not None:
        parts.append("limit=" + limit)  # one of fluxgate.ratelimit's fixed words
    parts.append(f"duration_ms={round(duration * 1000, 3)}")
    if ttfb_ms is not None:
        parts.append(f"ttfb_ms={round(ttfb_ms, 3)}")
    parts.append(f"request_bytes={request_bytes} response_bytes={response_bytes}")
    if response_length is not None:
        parts.append(f"response_body_length={response_length}")
    if usage is not None and (counts := usage.result()) is not None:
        parts.extend(f"{k}={n}" for k, n in counts.fields().items() if n is not None)
    return " ".join(parts)
