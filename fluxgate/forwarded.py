"""The client address behind trusted proxies (`server.trusted_proxies`).

Behind nginx or a TLS terminator every connection comes from the proxy, so
the request line's `client_ip` would name the proxy. When the operator lists
the proxies' addresses, a request whose peer is one of them is logged with
the address its `X-Forwarded-For` names: walked from the right, skipping
trusted proxies, the first address that is not one (nginx's realip module
with `real_ip_recursive on`). Entries left of that are the client's own
claims and are ignored. Without the setting, the header is never read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Peer addresses already judged, per config (a proxy's few addresses repeat).
_CACHE_LIMIT: Final = 1024


class TrustedProxies:
    """The configured proxies; `client_ip` answers for one request."""

    __slots__ = ("_known", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        known = self._known.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address.strip())
            except ValueError:
                known = False
            else:
                known = any(ip in network for network in self.networks)
            if len(self._known) >= _CACHE_LIMIT:
                self._known.clear()
            self._known[address] = known
        return known

    def client_ip(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        if peer is None or not self.trusts(peer):
            return peer
        hops = [
            hop.strip()
            for name, value in headers
            if name == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")
        ]
        client = peer
        for hop in reversed(hops):
            if not _is_address(hop):
                break  # garbage: keep the last address a trusted hop vouched for
            client = hop
            if not self.trusts(hop):
                break
        return client


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_networks(values: Iterable[str]) -> list[Network]:
    """Addresses or CIDR networks ("10.0.0.0/8", "::1"); raises ValueError."""
    return [ipaddress.ip_network(value.strip(), strict=True) for value in values]
