"""Syntax checks for host names, IP addresses and listen addresses (for fluxgate.validation).

Host names follow RFC 1123 labels; a name made only of digits and dots must
be an IPv4 address. URL hosts may also carry underscores (container service
names) and non-ASCII names, which fluxgate.config sends IDNA-encoded.
"""

from __future__ import annotations

import ipaddress
import re

from fluxgate.config import split_bind_address

HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
URL_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def same_listener(first: str, second: str) -> bool:
    """Whether two valid bind addresses would clash (same port; same or wildcard host)."""
    try:
        (host_a, port_a), (host_b, port_b) = split_bind_address(first), split_bind_address(second)
    except ValueError:
        return False
    hosts = {host_a.lower(), host_b.lower()}
    return port_a == port_b and (len(hosts) == 1 or bool(hosts & _WILDCARD_HOSTS))


def plain_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable() and " " not in value


def is_ip(text: str, cls: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        cls(text)
    except ValueError:
        return False
    return True


def valid_hostname(host: str, label: re.Pattern[str]) -> bool:
    if _DOTTED_NUMBERS.fullmatch(host):  # all digits: only an IPv4 address will do
        return is_ip(host, ipaddress.IPv4Address)
    name = host[:-1] if host.endswith(".") else host
    return len(name) <= 253 and all(label.fullmatch(part) for part in name.split("."))


def valid_url_host(host: str, *, bracketed: bool) -> bool:
    if bracketed:
        return is_ip(host, ipaddress.IPv6Address)
    if not host.isascii():
        try:  # fluxgate.config sends such a host IDNA-encoded
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return valid_hostname(host, URL_HOST_LABEL)


def port_digits_ok(netloc: str) -> bool:
    """urlsplit accepts ports such as "+80"; only plain digits are allowed here."""
    after_host = netloc.rsplit("]", 1)[-1] if netloc.startswith("[") else netloc
    _host, sep, port = after_host.rpartition(":")
    return not sep or port == "" or (port.isascii() and port.isdigit())
