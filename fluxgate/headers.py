"""Header rewriting between client and upstream (README "Request handling", steps 7 and 9).

Everything passes through in order, duplicates kept, except hop-by-hop
headers (and those a `Connection` header names), the client's credential
headers, `Host` and `Expect`, which the proxy replaces or consumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol


class Target(Protocol):
    """What header rewriting needs of an upstream (fluxgate.config.Upstream)."""

    @property
    def host_item(self) -> tuple[str, str]: ...
    @property
    def drop_headers(self) -> frozenset[bytes]: ...
    @property
    def set_headers(self) -> tuple[tuple[str, str], ...]: ...


HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Where a client may put its credential for Fluxgate (fluxgate.auth reads them).
CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"x-api-key", b"api-key"})

# `Host` is set from the target URL; `Expect: 100-continue` is answered by
# uvicorn itself, and forwarding it would make the client library wait for
# a second 100 from the upstream.
_DROP_UPSTREAM: Final = HOP_BY_HOP | CREDENTIAL_HEADERS | {b"host", b"expect"}


def drop_headers(auth_header: bytes, set_names: Iterable[bytes] = ()) -> frozenset[bytes]:
    """Client headers not forwarded to an upstream whose key goes in `auth_header`:
    a client's own copy of that header (`x-goog-api-key`, say) would reach the
    provider ahead of ours. `set_names`: the upstream's `set_headers` (lower
    case), replaced the same way, so each reaches the provider once."""
    return _DROP_UPSTREAM | {auth_header} | frozenset(set_names)


def wire_text(raw: bytes) -> str:
    """The `str` that aiohttp's request writer turns back into `raw`.

    aiohttp encodes the request line and headers as UTF-8, so decoding with
    latin-1 would double-encode every non-ASCII byte (`é` as UTF-8 went up as
    `Ã©`). Bytes that are not valid UTF-8 have no such `str`: they fall back
    to latin-1 (one code point per byte), which reaches the upstream
    re-encoded rather than failing the request.
    """
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    upstream: Target,
    connection_tokens: frozenset[bytes] | None,
) -> list[tuple[str, str]]:
    """Request headers for the upstream, from the client's (names lower-case);
    `connection_tokens`: what the client's `Connection` header named, if it sent one.
    The provider key's header is added per attempt (fluxgate.forward), last.

    aiohttp takes `str` pairs and writes the head as UTF-8, so values are
    decoded as UTF-8 to go up byte for byte (see `wire_text`).
    """
    drop = upstream.drop_headers
    if connection_tokens is not None:
        drop = drop | connection_tokens
    out = [upstream.host_item]
    try:
        out += [(n.decode(), v.decode()) for n, v in headers if n not in drop]
    except UnicodeDecodeError:  # rare: some value is not UTF-8
        out += [(n.decode(), wire_text(v)) for n, v in headers if n not in drop]
    out += upstream.set_headers
    return out


def client_headers(raw_headers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """Response headers for the client, from the upstream's (names lower-cased, as
    uvicorn would write them): all but the hop-by-hop ones and those a
    `Connection` header names. One pass; a second only when a `Connection`
    header names something that is not hop-by-hop already (rare: most say
    `keep-alive` or `close`)."""
    out: list[tuple[bytes, bytes]] = []
    named: list[bytes] | None = None
    for name, value in raw_headers:
        name = name.lower()
        if name in HOP_BY_HOP:
            if name == b"connection":
                named = (named or []) + value.split(b",")
            continue
        out.append((name, value))
    if named is not None:
        tokens = {token.strip().lower() for token in named} - HOP_BY_HOP
        if tokens:
            return [item for item in out if item[0] not in tokens]
    return out
