"""Validation of the `upstreams:` section (README "Configuration"), for fluxgate.validation.

Each upstream: `target_url` an absolute http(s) URL with a host and no query,
fragment or user info; `request_path` a unique ASCII prefix; an optional
`api_key` (Latin-1, header-safe), `auth_header` (a header name the proxy
does not set itself), `usage` format, `set_headers` (names by the
`auth_header` rules, values like `api_key`: secrets) and `tls` (absolute
paths to PEM files, loaded here by the same function that builds the config,
fluxgate.tls). Every problem is listed with its field path; no secret is echoed.
"""

from __future__ import annotations

import difflib
import os
import re
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from fluxgate.addresses import plain_ascii, port_digits_ok, valid_url_host
from fluxgate.checks import Checks, field_path, has_control, kind, quote, shown
from fluxgate.config import DEFAULT_AUTH_HEADER, TIMEOUT_SETTINGS, UPSTREAM_SETTINGS
from fluxgate.tls import FILE_KEYS, TLS_KEYS, TLSFileError, upstream_ssl

UPSTREAM_KEYS = (
    "target_url",
    "request_path",
    "api_key",
    "api_keys",
    "auth_header",
    "usage",
    "set_headers",
    "tls",
    *TIMEOUT_SETTINGS,
    "max_attempts",
    "retry_on",
    "retry_body_limit",
    "retry_backoff_ms",
)
POOL_KEY_KEYS = ("id", "key", "weight")
USAGE_VALUES = ("openai", "anthropic", "off")
# The deadline of one upstream exchange, and the bound of server.shutdown_timeout_ms.
# A day is longer than any LLM exchange, and far below where a timer or
# float conversion overflows.
MAX_REQUEST_TIMEOUT_MS = 24 * 60 * 60 * 1000
# Failover (README "Upstream resilience"): attempts, the keys of a pool and
# their weights, the body kept for a replay, and the wait between attempts.
MAX_ATTEMPTS = 10
MAX_POOL_KEYS = 100
MAX_KEY_WEIGHT = 1000
MAX_RETRY_BODY_LIMIT = 64 << 20
MAX_RETRY_BACKOFF_MS = 60_000
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "te", "trailer", "upgrade"}) | {
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "proxy-connection",
}
# The proxy sets these itself; a provider key written into them would be lost
# or would corrupt the framing of the upstream request.
FORBIDDEN_AUTH_HEADERS = HOP_BY_HOP_HEADERS | {"host", "content-length"}

_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 tchar
_HOST_PORT_SEGMENT = re.compile(r"/[^/]*:[0-9]+(?:/|$)")


class UpstreamChecks(Checks):
    def upstreams(self, value: object) -> set[str]:
        """Check the `upstreams` section; return the names later references may use."""
        section = self.section("upstreams", value, None)
        self.timeouts("upstreams", section)
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
        if "api_key" in spec and "api_keys" in spec:
            self.add(f"{path}.api_keys", "set together with api_key; keep one of them")
        if "api_keys" in spec:
            self.key_pool(f"{path}.api_keys", spec["api_keys"])
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
            self.add(f"{path}.usage", f"must be one of {choices}; got {shown(spec['usage'])}")
        if "set_headers" in spec:
            self.set_headers(f"{path}.set_headers", spec)
        if "tls" in spec:
            self.tls(f"{path}.tls", spec)
        self.timeouts(path, spec)
        self.failover(path, spec)

    def timeouts(self, path: str, spec: dict[Any, Any]) -> None:
        """The deadlines, in an upstream or as the defaults under `upstreams:`."""
        for name in TIMEOUT_SETTINGS:
            if name in spec:
                self.positive_int(f"{path}.{name}", spec[name], MAX_REQUEST_TIMEOUT_MS, "24 hours")

    def failover(self, path: str, spec: dict[Any, Any]) -> None:
        if "max_attempts" in spec:
            self.positive_int(
                f"{path}.max_attempts",
                spec["max_attempts"],
                MAX_ATTEMPTS,
                "each is a whole request",
            )
        for name, maximum in (
            ("retry_body_limit", MAX_RETRY_BODY_LIMIT),
            ("retry_backoff_ms", MAX_RETRY_BACKOFF_MS),
        ):
            if name in spec:
                self.whole_number(f"{path}.{name}", spec[name], maximum)
        if "retry_on" in spec:
            statuses = self.items(f"{path}.retry_on", spec["retry_on"])
            for i, status in enumerate(statuses):
                if isinstance(status, bool) or not isinstance(status, int):
                    self.add(f"{path}.retry_on[{i}]", f"must be a status code, got {shown(status)}")
                elif not 400 <= status <= 599:
                    self.add(f"{path}.retry_on[{i}]", f"must be from 400 to 599, got {status}")

    def key_pool(self, path: str, value: object) -> None:
        """`api_keys`: the provider keys of a pool, each with an id and an optional weight."""
        entries = self.items(path, value)
        if isinstance(value, list) and not entries:
            self.add(path, "must list at least one key (or use api_key)")
        if len(entries) > MAX_POOL_KEYS:
            self.add(path, f"must list at most {MAX_POOL_KEYS} keys, got {len(entries)}")
        seen: dict[str, str] = {}
        for i, entry in enumerate(entries):
            entry_path = f"{path}[{i}]"
            if not isinstance(entry, dict):
                self.add(entry_path, f"must be a mapping with id and key, got {kind(entry)}")
                continue
            self.section(entry_path, entry, POOL_KEY_KEYS)
            for required in ("id", "key"):
                if required not in entry:
                    self.add(f"{entry_path}.{required}", "required")
            if "id" in entry:
                self.unique_id(f"{entry_path}.id", entry["id"], seen)
            if "key" in entry:
                self.header_secret(f"{entry_path}.key", entry["key"], charset="Latin-1")
            if "weight" in entry:
                self.positive_int(
                    f"{entry_path}.weight", entry["weight"], MAX_KEY_WEIGHT, "a share, not a count"
                )

    def target_url(self, path: str, url: str) -> None:
        authority = re.split(r"[/?#]", url.split("://", 1)[-1], maxsplit=1)[0]
        if "://" in url and "@" in authority:
            self.add(path, "must not contain user credentials (user:password@); use api_key")
            return
        if has_control(url) or any(char.isspace() for char in url):
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

    def set_headers(self, path: str, spec: dict[object, object]) -> None:
        """Headers set on every request: names as for auth_header, values secret."""
        headers = self.section(path, spec["set_headers"], None)
        # The header carrying api_key; without api_key or auth_header none is sent.
        auth = spec.get("auth_header", DEFAULT_AUTH_HEADER)
        in_use = isinstance(auth, str) and ("api_key" in spec or "auth_header" in spec)
        seen: dict[str, str] = {}  # lower-case name -> name as first written
        for name, value in headers.items():
            item = field_path(path, name)
            header = self.string(item, name)
            if header is None:
                continue
            self.auth_header(item, header)
            lower = header.lower()
            if in_use and lower == str(auth).lower():
                self.add(item, "is the auth_header, which carries api_key; set the value there")
            if lower in seen:
                self.add(item, f"the same header as {quote(seen[lower])} (names ignore case)")
            seen.setdefault(lower, header)
            if isinstance(value, bool | int | float | date):
                # `anthropic-version: 2023-06-01` unquoted is a date to YAML.
                self.add(item, f"must be a string, got {kind(value)}; quote it in the YAML")
            else:
                self.header_secret(item, value, charset="Latin-1")

    def tls(self, path: str, spec: dict[object, object]) -> None:
        section = self.section(path, spec["tls"], TLS_KEYS)
        errors = len(self.errors)
        verify = section.get("verify", True)
        if not isinstance(verify, bool):
            self.add(f"{path}.verify", f"must be true or false, got {shown(verify)}")
        for key in FILE_KEYS:
            if key in section:
                file = self.string(f"{path}.{key}", section[key])
                if file is not None and (has_control(file) or not os.path.isabs(file)):
                    self.add(f"{path}.{key}", f"must be an absolute path, got {quote(file)}")
        if "key_file" in section and "cert_file" not in section:
            self.add(f"{path}.key_file", "set without cert_file (the certificate it belongs to)")
        if verify is False and "ca_file" in section:
            self.add(f"{path}.ca_file", "set while verify is false; remove one of them")
        url = spec.get("target_url")
        if section and isinstance(url, str) and url.lower().startswith("http://"):
            self.add(path, "set for an http:// target_url; use https:// or remove tls")
        if len(self.errors) > errors:
            return  # the files are read only once their settings make sense
        try:
            upstream_ssl(section)
        except TLSFileError as exc:
            for key, message in exc.problems:
                self.add(f"{path}.{key}", message)
