"""Field-level checks shared by the configuration validators (fluxgate.validation).

`Checks` collects problems as ``field.path: message`` and offers the checks
every section uses (a mapping's known keys, a string, a bounded whole
number, a header-safe secret); the text helpers quote values for messages,
never a secret. See fluxgate.validation for the rules themselves.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from datetime import date
from typing import Any

_QUOTE_LIMIT = 60
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def quote(value: str) -> str:
    """Quote a (non-secret) string for a message: escaped, at most ~60 characters."""
    text = value if len(value) <= _QUOTE_LIMIT else value[:_QUOTE_LIMIT] + "..."
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:  # control characters and lone surrogates would break a log line
            out.append(char.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return '"' + "".join(out) + '"'


def scalar_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return number_text(value)
    if isinstance(value, float):
        text = repr(value)
        return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, date):
        return value.isoformat()
    return type(value).__name__


def number_text(value: int) -> str:
    """An integer for a message; a huge one by its size (its digits could fill a page)."""
    if value.bit_length() <= 64:
        return str(value)
    return f"a number of about {int(value.bit_length() * 0.30103)} digits"


def field_path(parent: str, key: object) -> str:
    """The path of `key` inside the mapping at `parent` ("" for the top level)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{scalar_text(key)}]"


_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: bool is a subclass of int
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
    (date, "a date"),
    (bytes, "binary data"),
)


def kind(value: object) -> str:
    """What a value is, in the operator's words ("a list", "a string", ...)."""
    if value is None:
        return "null"
    return next((name for cls, name in _KINDS if isinstance(value, cls)), "an unsupported value")


def shown(value: object) -> str:
    """`kind` plus the value itself when it is a short scalar (non-secret fields only)."""
    if value is None or isinstance(value, list | dict | bytes):
        return kind(value)
    return f"{kind(value)} {scalar_text(value)}"


def suggest(word: object, choices: Sequence[str]) -> str:
    if isinstance(word, str):
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        if close:
            return f'did you mean "{close[0]}"?'
    return "expected one of: " + ", ".join(choices) if choices else "none are configured"


def has_control(value: str) -> bool:
    """C0 and C1 control characters and DEL: never valid in a header or a log line."""
    return any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in value)


class Checks:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # -- generic shapes -------------------------------------------------------

    def section(self, path: str, value: object, known: Sequence[str] | None) -> dict[Any, Any]:
        """An optional mapping: null counts as empty; unknown keys are reported."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {kind(value)}")
            return {}
        if known is not None:
            for key in value:
                if key not in known:
                    self.add(field_path(path, key), f"unknown key; {suggest(key, known)}")
        return value

    def items(self, path: str, value: object) -> list[Any]:
        """An optional list: null counts as empty."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(path, f"must be a list, got {kind(value)}")
            return []
        return value

    def string(self, path: str, value: object, *, secret: bool = False) -> str | None:
        """A non-empty string, or None after reporting why it is not one."""
        if not isinstance(value, str):
            what = kind(value) if secret else shown(value)
            self.add(path, f"must be a string, got {what}")
            return None
        if not value.strip():
            self.add(path, "must not be empty")
            return None
        if any("\ud800" <= char <= "\udfff" for char in value):
            self.add(path, "contains an invalid character (a lone UTF-16 surrogate)")
            return None
        return value

    def positive_int(self, path: str, value: object, maximum: int, why: str) -> None:
        """An integer from 1 to `maximum`; `why` says where the maximum comes from."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"must be an integer, got {shown(value)}")
        elif value < 1:
            self.add(path, f"must be at least 1, got {number_text(value)}")
        elif value > maximum:
            self.add(path, f"must be at most {maximum} ({why}), got {number_text(value)}")

    def whole_number(self, path: str, value: object, maximum: int) -> None:
        """An integer from 0 to `maximum`."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"must be an integer, got {shown(value)}")
        elif not 0 <= value <= maximum:
            self.add(path, f"must be from 0 to {maximum}, got {number_text(value)}")

    def header_secret(self, path: str, value: object, *, charset: str) -> str | None:
        """A secret sent in an HTTP header; the value is never echoed."""
        text = self.string(path, value, secret=True)
        if text is None:
            return None
        if has_control(text):
            self.add(path, "must not contain control characters such as line breaks")
            return None
        limit = 0x7F if charset == "ASCII" else 0xFF
        checks = (
            (text != text.strip(), "must not start or end with white space (HTTP drops it)"),
            (any(ord(c) > limit for c in text), f"must contain only {charset} characters"),
        )
        problems = [message for failed, message in checks if failed]
        for problem in problems:
            self.add(path, problem)
        return None if problems else text

    # -- the document ---------------------------------------------------------

    def unique_id(self, path: str, value: object, seen: dict[str, str]) -> None:
        text = self.string(path, value)
        if text is None:
            return
        if text in seen:
            self.add(path, f"{quote(text)} is already used by {seen[text]}")
        else:
            seen[text] = path.rsplit(".", 1)[0]
