"""`server.trusted_proxies`: which X-Forwarded-For entry names the client, and its validation.

End to end behind a real nginx: tests/test_behind_nginx.py.
"""

from __future__ import annotations

import pytest

from fluxgate.config import build_config
from fluxgate.forwarded import TrustedProxies, parse_networks
from fluxgate.validation import validate

PROXIES = TrustedProxies(parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"]))


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode()) for v in values]


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        ("127.0.0.1", xff("203.0.113.9"), "203.0.113.9"),
        ("127.0.0.1", xff("198.51.100.1, 203.0.113.9"), "203.0.113.9"),  # left: the client's claim
        ("127.0.0.1", xff("198.51.100.1", "203.0.113.9, 10.0.0.5"), "203.0.113.9"),
        ("127.0.0.1", xff("10.0.0.6, 10.0.0.5"), "10.0.0.6"),  # all trusted: the farthest
        ("127.0.0.1", xff("garbage, 10.0.0.5"), "10.0.0.5"),  # stop at what is not an address
        ("127.0.0.1", [], "127.0.0.1"),
        ("::1", xff("2001:db8::7"), "2001:db8::7"),
        ("192.0.2.1", xff("203.0.113.9"), "192.0.2.1"),  # an untrusted peer's header is ignored
    ],
)
def test_the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy(
    peer: str, headers: list[tuple[bytes, bytes]], client: str
) -> None:
    assert PROXIES.client_ip(peer, headers) == client


def test_without_trusted_proxies_the_setting_is_off() -> None:
    config = build_config({"version": 1})
    assert not config.server.trusted_proxies


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("127.0.0.1", "server.trusted_proxies"),
        (["10.0.0.1/8"], "server.trusted_proxies[0]"),  # host bits set
        (["not-an-ip"], "server.trusted_proxies[0]"),
        (["127.0.0.1", 7], "server.trusted_proxies[1]"),
    ],
)
def test_invalid_trusted_proxies_are_listed_with_their_path(value: object, path: str) -> None:
    errors = validate({"version": 1, "server": {"trusted_proxies": value}})
    assert [e.split(":")[0] for e in errors] == [path], errors


def test_valid_trusted_proxies_are_accepted() -> None:
    assert validate({"version": 1, "server": {"trusted_proxies": ["127.0.0.1", "fd00::/8"]}}) == []
