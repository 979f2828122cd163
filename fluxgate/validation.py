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

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from fluxgate.addresses import (
    HOSTNAME_LABEL,
    bind_address_problem,
    is_ip,
    plain_ascii,
    same_listener,
    valid_hostname,
)
from fluxgate.auth import MAX_TOKEN_BYTES
from fluxgate.checks import field_path, kind, number_text, quote, shown, suggest
from fluxgate.config import DEFAULT_BIND_ADDRESS, split_bind_address
from fluxgate.forwarded import parse_networks
from fluxgate.limits import MAX_SLOTS
from fluxgate.ratelimit import POLICY_LIMITS
from fluxgate.validate_upstreams import MAX_REQUEST_TIMEOUT_MS, UpstreamChecks

TOP_KEYS = ("version", "server", "upstreams", "api_keys", "limits")
SERVER_KEYS = (
    "bind_address",
    "max_connections",
    "workers",
    "metrics",
    "metrics_address",
    "trusted_proxies",
    "shutdown_timeout_ms",
)
API_KEYS_KEYS = ("static", "jwt")
STATIC_KEY_KEYS = ("id", "key", "upstreams", "limits")
JWT_KEY_KEYS = ("id", "key", "limits", "limit_by")
LIMITS_KEYS = ("backend", "redis_url", "on_backend_error", "policies")
LIMIT_BACKENDS = ("local", "redis")
BACKEND_ERROR_CHOICES = ("allow", "deny")
LIMIT_BY = ("kid", "sub")
# A policy's numbers: far above any real use, far below where counters overflow.
MAX_POLICY_VALUE = 10**15

MIN_JWT_KEY_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash

# Upper bounds (docs/security.md: every number is bounded to what the code can use).
# Each connection holds two file descriptors (client and upstream), and Linux
# caps a process at fs.nr_open descriptors, 1,048,576 by default: more
# connections than this could never be open at once.
MAX_CONNECTIONS = 500_000
# Each worker owns one slot of the shared connection table, and a change of
# bind_address runs the new pool beside the retiring one: half the slots.
MAX_WORKERS = MAX_SLOTS // 2


class _Validator(UpstreamChecks):
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
                    self.add("version", f"must be 1, got {number_text(version)}")
            else:
                self.add("version", f"must be the integer 1, got {shown(version)}")
        self.server(doc.get("server"))
        names = self.upstreams(doc.get("upstreams"))
        policies = self.limits(doc.get("limits"))
        keys = self.section("api_keys", doc.get("api_keys"), API_KEYS_KEYS)
        self.static_keys(keys.get("static"), names, policies)
        self.jwt_keys(keys.get("jwt"), policies)

    def limits(self, value: object) -> set[str]:
        """The `limits` section; returns the policy names keys may refer to."""
        limits = self.section("limits", value, LIMITS_KEYS)
        for name, choices in (("backend", LIMIT_BACKENDS),
                              ("on_backend_error", BACKEND_ERROR_CHOICES)):  # fmt: skip
            if name in limits and limits[name] not in choices:
                self.add(f"limits.{name}", f"must be one of {', '.join(choices)}, "
                         f"got {shown(limits[name])}")  # fmt: skip
        if "redis_url" in limits:
            self.redis_url(limits["redis_url"])
        elif limits.get("backend") == "redis":
            self.add("limits.redis_url", "required with backend: redis")
        policies = self.section("limits.policies", limits.get("policies"), None)
        for name, spec in policies.items():
            path = field_path("limits.policies", name)
            if not isinstance(spec, dict) or not spec:
                self.add(path, f"must be a mapping of limits ({', '.join(POLICY_LIMITS)})")
                continue
            self.section(path, spec, POLICY_LIMITS)
            for limit in POLICY_LIMITS:
                if limit in spec:
                    self.positive_int(
                        f"{path}.{limit}", spec[limit], MAX_POLICY_VALUE, "a sane bound"
                    )
        return {name for name in policies if isinstance(name, str)}

    def redis_url(self, value: object) -> None:
        text = self.string("limits.redis_url", value, secret=True)
        if text is None:
            return
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or port == -1:
            # The URL may carry a password: never quoted.
            self.add("limits.redis_url", "must be redis://[:password@]host[:port][/db] "
                     "or rediss://...")  # fmt: skip

    def policy_ref(self, path: str, value: object, policies: set[str]) -> None:
        name = self.string(path, value)
        if name is not None and name not in policies:
            self.add(path, f"unknown policy {quote(name)}; {suggest(name, sorted(policies))}")

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
        if "shutdown_timeout_ms" in server:
            self.positive_int(
                "server.shutdown_timeout_ms",
                server["shutdown_timeout_ms"],
                MAX_REQUEST_TIMEOUT_MS,
                "24 hours, as for request_timeout_ms",
            )
        if "trusted_proxies" in server:
            self.trusted_proxies(server["trusted_proxies"])

    def trusted_proxies(self, value: object) -> None:
        path = "server.trusted_proxies"
        if not isinstance(value, list):
            self.add(path, f'must be a list of addresses or networks, e.g. ["127.0.0.1"], '
                     f"got {shown(value)}")  # fmt: skip
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
            self.add("server.metrics", f"must be true or false, got {shown(enabled)}")
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

    def static_keys(self, value: object, upstream_names: set[str], policies: set[str]) -> None:
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
            if "limits" in entry:
                self.policy_ref(f"{path}.limits", entry["limits"], policies)
                if "id" not in entry:
                    self.add(f"{path}.id", "required with limits (it names the key's counts)")
            if "upstreams" in entry:
                refs_path = f"{path}.upstreams"
                for j, ref in enumerate(self.items(refs_path, entry["upstreams"])):
                    ref_name = self.string(f"{refs_path}[{j}]", ref)
                    if ref_name is not None and ref_name not in upstream_names:
                        hint = suggest(ref_name, sorted(upstream_names))
                        self.add(f"{refs_path}[{j}]", f"unknown upstream {quote(ref_name)}; {hint}")

    def jwt_keys(self, value: object, policies: set[str]) -> None:
        seen_ids: dict[str, str] = {}
        for i, entry in enumerate(self.items("api_keys.jwt", value)):
            path = f"api_keys.jwt[{i}]"
            if not isinstance(entry, dict):
                self.add(path, f"must be a mapping with an id and a key, got {kind(entry)}")
                continue
            self.section(path, entry, JWT_KEY_KEYS)
            if "limits" in entry:
                self.policy_ref(f"{path}.limits", entry["limits"], policies)
            if "limit_by" in entry and entry["limit_by"] not in LIMIT_BY:
                self.add(f"{path}.limit_by", f"must be kid or sub, got {shown(entry['limit_by'])}")
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


def validate(doc: object) -> list[str]:
    """Check a parsed configuration document; return every problem (empty = valid)."""
    validator = _Validator()
    validator.document(doc)
    return validator.errors
