"""Validation of a parsed configuration document against README "Configuration".

`validate(doc)` takes whatever the YAML loader produced and returns every
problem it finds, each as ``field.path: message`` (an empty list means the
document is valid and `fluxgate.config.build_config` may be called on it).
It never stops at the first problem: an operator fixing a file wants the whole
list at once.

Paths use dots for mapping keys and ``[i]`` (0-based) for list items, e.g.
``upstreams.openai.request_path`` or ``api_keys.static[1].key``; a key that is
not a plain word is quoted, e.g. ``upstreams["my api"]``.

Secret values (``api_key`` and every ``key`` under ``api_keys``) never appear
in a message, not even in part; other values may be quoted, truncated.

Choices the README states where the contract is silent:
- An optional section or list written with no value (``server:``,
  ``static:``) counts as empty; an optional *scalar* written with no value is
  an error, because ``api_key:`` left blank by mistake must not silently turn
  into "send no credential".
- ``target_url`` must not carry a query or fragment (the client's query is
  appended on forwarding, so a base query would be dropped or mangled), nor
  user info (``user:pass@``): credentials belong in ``api_key``, and
  ``target_url`` is written to every request log line.
- ``request_path`` and the ``target_url`` path must be ASCII without white
  space: routing compares raw request bytes, so a non-ASCII prefix could
  never match; percent-encode instead.
- Provider keys (``api_key``) and static client keys travel in HTTP headers:
  control characters and leading/trailing white space (HTTP strips it) are
  rejected; ``api_key`` must be Latin-1 (how it is sent), static keys ASCII
  (clients disagree on encoding the rest). JWT secrets are only HMAC keys:
  any characters.
- ``server.metrics_address`` follows the ``bind_address`` rules, must not
  clash with ``bind_address`` (same port on the same or a wildcard host), and
  is an error together with ``metrics: false`` (which of the two is meant?).
- ``usage`` is ``openai``, ``anthropic`` or ``off``; an unquoted ``off`` is
  the boolean false to YAML 1.1 and is accepted as ``off``.
- Every number has an upper bound the code can use (docs/security.md): a value past it
  would otherwise pass here and fail later, in the master, where it costs the
  process (see the ``MAX_*`` constants below).
- A static key may be at most ``fluxgate.auth.MAX_TOKEN_BYTES`` long: a longer
  token is refused before lookup, so such a key could never authenticate.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Sequence
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from fluxgate.addresses import (
    HOSTNAME_LABEL,
    bind_address_problem,
    is_ip,
    plain_ascii,
    port_digits_ok,
    same_listener,
    valid_hostname,
    valid_url_host,
)
from fluxgate.auth import MAX_TOKEN_BYTES
from fluxgate.config import DEFAULT_BIND_ADDRESS, UPSTREAM_SETTINGS, split_bind_address
from fluxgate.forwarded import parse_networks
from fluxgate.limits import MAX_SLOTS

TOP_KEYS = ("version", "server", "upstreams", "api_keys")
SERVER_KEYS = (
    "bind_address",
    "max_connections",
    "workers",
    "metrics",
    "metrics_address",
    "trusted_proxies",
)
UPSTREAM_KEYS = ("target_url", "request_path", "api_key", "auth_header", "usage")
USAGE_VALUES = ("openai", "anthropic", "off")
API_KEYS_KEYS = ("static", "jwt")
STATIC_KEY_KEYS = ("id", "key", "upstreams")
JWT_KEY_KEYS = ("id", "key")

MIN_JWT_KEY_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash

# Upper bounds (docs/security.md: every number is bounded to what the code can use).
# The deadline of one upstream exchange; it also bounds a graceful shutdown.
# A day is longer than any LLM exchange, and far below where a timer or
# float conversion overflows.
MAX_REQUEST_TIMEOUT_MS = 24 * 60 * 60 * 1000
# Each connection holds two file descriptors (client and upstream), and Linux
# caps a process at fs.nr_open descriptors, 1,048,576 by default: more
# connections than this could never be open at once.
MAX_CONNECTIONS = 500_000
# Each worker owns one slot of the shared connection table, and a change of
# bind_address runs the new pool beside the retiring one: half the slots.
MAX_WORKERS = MAX_SLOTS // 2
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "te", "trailer", "upgrade"}) | {
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "proxy-connection",
}
# The proxy sets these itself; a provider key written into them would be lost
# or would corrupt the framing of the upstream request.
FORBIDDEN_AUTH_HEADERS = HOP_BY_HOP_HEADERS | {"host", "content-length"}

_QUOTE_LIMIT = 60
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 tchar
_HOST_PORT_SEGMENT = re.compile(r"/[^/]*:[0-9]+(?:/|$)")


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


def _scalar_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _number_text(value)
    if isinstance(value, float):
        text = repr(value)
        return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, date):
        return value.isoformat()
    return type(value).__name__


def _number_text(value: int) -> str:
    """An integer for a message; a huge one by its size (its digits could fill a page)."""
    if value.bit_length() <= 64:
        return str(value)
    return f"a number of about {int(value.bit_length() * 0.30103)} digits"


def field_path(parent: str, key: object) -> str:
    """The path of `key` inside the mapping at `parent` ("" for the top level)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{_scalar_text(key)}]"


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


def _shown(value: object) -> str:
    """`kind` plus the value itself when it is a short scalar (non-secret fields only)."""
    if value is None or isinstance(value, list | dict | bytes):
        return kind(value)
    return f"{kind(value)} {_scalar_text(value)}"


def _suggest(word: object, choices: Sequence[str]) -> str:
    if isinstance(word, str):
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        if close:
            return f'did you mean "{close[0]}"?'
    return "expected one of: " + ", ".join(choices) if choices else "none are configured"


def _has_control(value: str) -> bool:
    """C0 and C1 control characters and DEL: never valid in a header or a log line."""
    return any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in value)


class _Validator:
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
                    self.add(field_path(path, key), f"unknown key; {_suggest(key, known)}")
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
            shown = kind(value) if secret else _shown(value)
            self.add(path, f"must be a string, got {shown}")
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
            self.add(path, f"must be an integer, got {_shown(value)}")
        elif value < 1:
            self.add(path, f"must be at least 1, got {_number_text(value)}")
        elif value > maximum:
            self.add(path, f"must be at most {maximum} ({why}), got {_number_text(value)}")

    def header_secret(self, path: str, value: object, *, charset: str) -> str | None:
        """A secret sent in an HTTP header; the value is never echoed."""
        text = self.string(path, value, secret=True)
        if text is None:
            return None
        if _has_control(text):
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

    def document(self, doc: object) -> None:
        if doc is None:
            self.add("version", "required (the file has no settings; start it with: version: 1)")
            return
        if not isinstance(doc, dict):
            self.add("(top level)", f"must be a mapping of settings, got {kind(doc)}")
            return
        self.section("", doc, TOP_KEYS)
        if "version" not in doc:
            self.add("version", "required (set version: 1)")
        else:
            version = doc["version"]
            if isinstance(version, int) and not isinstance(version, bool):
                if version != 1:
                    self.add("version", f"must be 1, got {_number_text(version)}")
            else:
                self.add("version", f"must be the integer 1, got {_shown(version)}")
        self.server(doc.get("server"))
        names = self.upstreams(doc.get("upstreams"))
        keys = self.section("api_keys", doc.get("api_keys"), API_KEYS_KEYS)
        self.static_keys(keys.get("static"), names)
        self.jwt_keys(keys.get("jwt"))

    def server(self, value: object) -> None:
        server = self.section("server", value, SERVER_KEYS)
        if "bind_address" in server:
            text = self.string("server.bind_address", server["bind_address"])
            if text is not None:
                self.bind_address("server.bind_address", text)
        if "max_connections" in server:
            self.positive_int(
                "server.max_connections",
                server["max_connections"],
                MAX_CONNECTIONS,
                "two file descriptors each, within the kernel's per-process limit",
            )
        if "workers" in server:
            self.positive_int(
                "server.workers",
                server["workers"],
                MAX_WORKERS,
                f"the connection table has {MAX_SLOTS} slots, "
                "and a bind_address change runs two pools at once",
            )
        self.metrics(server)
        if "trusted_proxies" in server:
            self.trusted_proxies(server["trusted_proxies"])

    def trusted_proxies(self, value: object) -> None:
        path = "server.trusted_proxies"
        if not isinstance(value, list):
            self.add(path, f'must be a list of addresses or networks, e.g. ["127.0.0.1"], '
                     f"got {_shown(value)}")  # fmt: skip
            return
        for i, item in enumerate(value):
            text = self.string(f"{path}[{i}]", item)
            if text is None:
                continue
            try:
                parse_networks([text])
            except ValueError:
                self.add(f"{path}[{i}]", "must be an IP address or a network such as "
                         f'"10.0.0.0/8" (no host bits set), got {quote(text)}')  # fmt: skip

    def metrics(self, server: dict[Any, Any]) -> None:
        enabled = server.get("metrics", True)
        if not isinstance(enabled, bool):
            self.add("server.metrics", f"must be true or false, got {_shown(enabled)}")
        if "metrics_address" not in server:
            return
        path = "server.metrics_address"
        text = self.string(path, server["metrics_address"])
        if text is None:
            return
        errors = len(self.errors)
        self.bind_address(path, text)
        if len(self.errors) > errors:
            return
        if enabled is False:
            self.add(path, "set while server.metrics is false; remove one of them")
        main = server.get("bind_address", DEFAULT_BIND_ADDRESS)
        if isinstance(main, str) and same_listener(text, main):
            self.add(path, f"must differ from server.bind_address {quote(main)}")

    def bind_address(self, path: str, value: str) -> None:
        if not plain_ascii(value):
            self.add(path, f"must be host:port in ASCII without spaces, got {quote(value)}")
            return
        problem = bind_address_problem(value)
        if problem is not None:
            self.add(path, f"{problem}, got {quote(value)}")
            return
        try:
            host, _port = split_bind_address(value)
        except ValueError as exc:  # bind_address_problem knows every shape this refuses
            self.add(path, f"{exc}, got {quote(value)}")
            return
        if value.startswith("["):
            if not is_ip(host, ipaddress.IPv6Address):
                self.add(path, f"{quote(host)} is not a valid IPv6 address")
        elif ":" in host:
            self.add(
                path, f'an IPv6 address must be in brackets, e.g. "[::1]:8080", got {quote(value)}'
            )
        elif not valid_hostname(host, HOSTNAME_LABEL):
            self.add(path, f"{quote(host)} is not a valid IPv4 address or host name")

    def upstreams(self, value: object) -> set[str]:
        """Check the `upstreams` section; return the names later references may use."""
        section = self.section("upstreams", value, None)
        if "request_timeout_ms" in section:
            self.positive_int(
                "upstreams.request_timeout_ms",
                section["request_timeout_ms"],
                MAX_REQUEST_TIMEOUT_MS,
                "24 hours",
            )
        names: set[str] = set()
        routes: dict[str, tuple[str, str]] = {}  # normalised prefix -> (name, as written)
        for name, spec in section.items():
            if name in UPSTREAM_SETTINGS:
                continue
            path = field_path("upstreams", name)
            if not isinstance(name, str) or not name.strip():
                self.add(path, "an upstream name must be a non-empty string")
                continue
            if not name.isprintable():
                self.add(path, "an upstream name must not contain control characters")
                continue
            names.add(name)
            self.upstream(path, name, spec, routes)
        return names

    def upstream(
        self, path: str, name: str, spec: object, routes: dict[str, tuple[str, str]]
    ) -> None:
        if not isinstance(spec, dict):
            # A scalar here is most likely a misspelt setting such as request_timeout.
            close = difflib.get_close_matches(name, sorted(UPSTREAM_SETTINGS), n=1)
            hint = f'; did you mean "{close[0]}"?' if close and not isinstance(spec, list) else ""
            what = "an upstream must be a mapping with target_url and request_path"
            self.add(path, f"{what}, got {kind(spec)}{hint}")
            return
        self.section(path, spec, UPSTREAM_KEYS)
        for required in ("target_url", "request_path"):
            if required not in spec:
                self.add(f"{path}.{required}", "required")
        if "target_url" in spec:
            url = self.string(f"{path}.target_url", spec["target_url"])
            if url is not None:
                self.target_url(f"{path}.target_url", url)
        if "request_path" in spec:
            route = self.string(f"{path}.request_path", spec["request_path"])
            if route is not None:
                self.request_path(f"{path}.request_path", route, name, routes)
        if "api_key" in spec:
            if spec["api_key"] is None:
                self.add(
                    f"{path}.api_key", "has no value; omit api_key for a provider that needs none"
                )
            else:
                self.header_secret(f"{path}.api_key", spec["api_key"], charset="Latin-1")
        if "auth_header" in spec:
            header = self.string(f"{path}.auth_header", spec["auth_header"])
            if header is not None:
                self.auth_header(f"{path}.auth_header", header)
        if "usage" in spec and spec["usage"] is not False and spec["usage"] not in USAGE_VALUES:
            # False: YAML 1.1 reads an unquoted `off` as a boolean.
            choices = ", ".join(USAGE_VALUES)
            self.add(f"{path}.usage", f"must be one of {choices}; got {_shown(spec['usage'])}")

    def target_url(self, path: str, url: str) -> None:
        authority = re.split(r"[/?#]", url.split("://", 1)[-1], maxsplit=1)[0]
        if "://" in url and "@" in authority:
            self.add(path, "must not contain user credentials (user:password@); use api_key")
            return
        if _has_control(url) or any(char.isspace() for char in url):
            self.add(path, f"must not contain white space or control characters, got {quote(url)}")
            return
        # The checks below quote the URL: that is safe now that it holds no password.
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            self.add(path, f"is not a valid URL (bad host or port), got {quote(url)}")
            return
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            self.add(path, f"must be an absolute http:// or https:// URL, got {quote(url)}")
            return
        host = parts.hostname or ""
        if not host:
            self.add(path, f"must include a host, got {quote(url)}")
        elif not valid_url_host(host, bracketed=parts.netloc.startswith("[")):
            self.add(path, f"{quote(host)} is not a valid host")
        if port == 0 or not port_digits_ok(parts.netloc):
            self.add(path, f"has an invalid port, got {quote(url)}")
        if "?" in url:
            self.add(path, "must not contain a query string (the client's query is appended)")
        if "#" in url:
            self.add(path, "must not contain a fragment (#...)")
        if not parts.path.isascii():
            self.add(path, "the path must be ASCII; percent-encode other characters")

    def request_path(
        self, path: str, value: str, name: str, routes: dict[str, tuple[str, str]]
    ) -> None:
        checks = (
            (not value.startswith("/"), 'must start with "/"'),
            ("://" in value, 'must be a path, not a URL ("://")'),
            ("?" in value, 'must not contain "?" (queries are not part of routing)'),
            ("#" in value, 'must not contain "#"'),
            (bool(_HOST_PORT_SEGMENT.match(value)), "must not have a host:port form"),
            (not plain_ascii(value), "must be ASCII without spaces; percent-encode the rest"),
        )
        problems = [message for failed, message in checks if failed]
        for problem in problems:
            self.add(path, f"{problem}, got {quote(value)}")
        if problems:
            return
        prefix = value.rstrip("/")
        if prefix in routes:
            other, written = routes[prefix]
            same = "" if written == value else ' ("/x" and "/x/" are the same route)'
            self.add(path, f"{quote(value)} is already used by upstream {quote(other)}{same}")
        else:
            routes[prefix] = (name, value)

    def auth_header(self, path: str, value: str) -> None:
        if not _HTTP_TOKEN.fullmatch(value):
            self.add(path, f"must be a valid HTTP header name, got {quote(value)}")
        elif value.lower() in FORBIDDEN_AUTH_HEADERS:
            self.add(path, f"must not be {quote(value)}: the proxy manages that header itself")

    def static_keys(self, value: object, upstream_names: set[str]) -> None:
        seen_keys: dict[str, str] = {}  # key -> path of its first use; the key is never shown
        seen_ids: dict[str, str] = {}
        for i, entry in enumerate(self.items("api_keys.static", value)):
            path = f"api_keys.static[{i}]"
            if not isinstance(entry, dict):
                self.add(path, f"must be a mapping with a key, got {kind(entry)}")
                continue
            self.section(path, entry, STATIC_KEY_KEYS)
            if "key" not in entry:
                self.add(f"{path}.key", "required")
            else:
                key = self.header_secret(f"{path}.key", entry["key"], charset="ASCII")
                if key is not None and len(key) > MAX_TOKEN_BYTES:
                    # ASCII: characters are bytes. The proxy refuses longer tokens unread.
                    self.add(
                        f"{path}.key",
                        f"must be at most {MAX_TOKEN_BYTES} bytes (the longest token "
                        f"the proxy reads), got {len(key)}",
                    )
                    key = None
                if key is not None and key in seen_keys:
                    self.add(f"{path}.key", f"duplicate: the same key as {seen_keys[key]}")
                elif key is not None:
                    seen_keys[key] = f"{path}.key"
            if "id" in entry:
                self.unique_id(f"{path}.id", entry["id"], seen_ids)
            if "upstreams" in entry:
                refs_path = f"{path}.upstreams"
                for j, ref in enumerate(self.items(refs_path, entry["upstreams"])):
                    ref_name = self.string(f"{refs_path}[{j}]", ref)
                    if ref_name is not None and ref_name not in upstream_names:
                        hint = _suggest(ref_name, sorted(upstream_names))
                        self.add(f"{refs_path}[{j}]", f"unknown upstream {quote(ref_name)}; {hint}")

    def jwt_keys(self, value: object) -> None:
        seen_ids: dict[str, str] = {}
        for i, entry in enumerate(self.items("api_keys.jwt", value)):
            path = f"api_keys.jwt[{i}]"
            if not isinstance(entry, dict):
                self.add(path, f"must be a mapping with an id and a key, got {kind(entry)}")
                continue
            self.section(path, entry, JWT_KEY_KEYS)
            if "id" not in entry:
                self.add(f"{path}.id", "required (it is matched against the token's kid)")
            else:
                self.unique_id(f"{path}.id", entry["id"], seen_ids)
            if "key" not in entry:
                self.add(f"{path}.key", "required")
            else:
                key = self.string(f"{path}.key", entry["key"], secret=True)
                size = len(key.encode()) if key is not None else MIN_JWT_KEY_BYTES
                if size < MIN_JWT_KEY_BYTES:
                    self.add(
                        f"{path}.key",
                        f"must be at least {MIN_JWT_KEY_BYTES} bytes for HS256 "
                        f"(RFC 7518 §3.2), got {size}",
                    )

    def unique_id(self, path: str, value: object, seen: dict[str, str]) -> None:
        text = self.string(path, value)
        if text is None:
            return
        if text in seen:
            self.add(path, f"{quote(text)} is already used by {seen[text]}")
        else:
            seen[text] = path.rsplit(".", 1)[0]


def validate(doc: object) -> list[str]:
    """Check a parsed configuration document; return every problem (empty = valid)."""
    validator = _Validator()
    validator.document(doc)
    return validator.errors
