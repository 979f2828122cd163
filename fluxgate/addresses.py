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


def bind_address_problem(value: str) -> str | None:
    """What is wrong with the shape of a listen address ("host:port", "[v6]:port"), or None.

    Each shape gets the message that names its actual fault: ":8080" lacks a
    host, not a valid port. Whether the host itself is valid is checked after.
    """
    if value.startswith("["):
        inside, closed, rest = value[1:].partition("]")
        if not closed:
            return 'an IPv6 address must end with "]", e.g. "[::1]:8080"'
        if not inside:
            return 'the host is missing between "[" and "]", e.g. "[::1]:8080"'
        if not rest:
            return f'the port is missing, e.g. "[{inside}]:8080"'
        if not rest.startswith(":"):
            return f'expected ":" and a port after "]", e.g. "[{inside}]:8080"'
        host, port = inside, rest[1:]
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            return 'expected host:port, e.g. "0.0.0.0:8080"; the port is missing'
    if not host:
        example = port if port.isdigit() and len(port) <= 5 else "8080"
        return (
            f'the host is missing: use "0.0.0.0:{example}" for every interface '
            f'or "127.0.0.1:{example}" for this machine only'
        )
    if not port:
        return "the port is missing after the colon"
    if not (port.isascii() and port.isdigit()):
        return "the port must be a number from 1 to 65535"
    if len(port) > 5 or not 1 <= int(port) <= 65535:
        return "the port must be from 1 to 65535"
    return None


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
