"""A tiny raw-socket HTTP/1.1 client for the proxy tests.

Library clients add headers, normalise targets, merge duplicate response
headers and hide framing; these tests must control and see the exact bytes.
A request is written exactly as given (the caller supplies even `Host`), and a
response is read with its head verbatim, its body de-framed, and a flag saying
whether the framing ended properly (all of Content-Length, or the final
zero-size chunk) or the connection was cut first. Every socket has a timeout.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

Headers = Iterable[tuple[str | bytes, str | bytes]]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def host(port: int, address: str = "127.0.0.1") -> tuple[str, str]:
    return ("Host", f"{address}:{port}")


def bearer(key: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {key}")


def build_request(method: str, target: str | bytes, headers: Headers, body: bytes = b"") -> bytes:
    """Request line, the given headers in order (nothing added), blank line, body."""
    lines = [_b(method) + b" " + _b(target) + b" HTTP/1.1"]
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    """A chunk-encoded body made of `pieces`, with the terminating chunk."""
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@dataclass
class Response:
    status: int
    raw_head: bytes  # status line + header lines + CRLFCRLF, as received
    headers: list[tuple[bytes, bytes]]  # names as received; order and duplicates kept
    body: bytes = b""
    chunked: bool = False
    complete: bool = True  # False: the connection ended before the framing did
    chunk_sizes: list[int] = field(default_factory=list)

    def header_values(self, name: str) -> list[bytes]:
        key = name.lower().encode("latin-1")
        return [v for n, v in self.headers if n.lower() == key]

    def header(self, name: str) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    @property
    def header_names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]


class Conn:
    """One client connection to `127.0.0.1:port`; usable for several requests."""

    def __init__(self, port: int, address: str = "127.0.0.1", timeout: float = 10) -> None:
        self.port = port
        self.sock = socket.create_connection((address, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile: BinaryIO = self.sock.makefile("rb")

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, method: str, target: str | bytes, headers: Headers, body: bytes = b""
    ) -> Response:
        self.send(build_request(method, target, headers, body))
        return self.read_response(head_only=method == "HEAD")

    # Reading

    def read_head(self) -> Response:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise ConnectionError(f"connection closed before a full response head: {lines!r}")
            if line == b"\r\n":
                break
            lines.append(line)
        status_line = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            headers.append((name, value.strip(b" \t")))
        resp = Response(int(status_line[1]), b"".join(lines) + b"\r\n", headers)
        te = b",".join(resp.header_values("transfer-encoding")).lower()
        resp.chunked = te.rstrip().endswith(b"chunked")
        return resp

    def read_response(self, head_only: bool = False) -> Response:
        """One whole response; 1xx, 204, 304 and answers to HEAD have no body."""
        resp = self.read_head()
        if head_only or resp.status < 200 or resp.status in (204, 304):
            return resp
        if resp.chunked:
            resp.body = b"".join(self.iter_chunks(resp))
            return resp
        length = resp.header("content-length")
        try:
            if length is not None:
                resp.body = self.rfile.read(int(length))
                resp.complete = len(resp.body) == int(length)
            else:
                resp.body = self.rfile.read()  # close-delimited
        except (ConnectionError, TimeoutError):
            resp.complete = False
        return resp

    def iter_chunks(self, resp: Response) -> Iterator[bytes]:
        """Yield each chunk's data the moment it is read; sets `resp.complete`."""
        resp.complete = False
        try:
            while True:
                size_line = self.rfile.readline(4096)
                if not size_line.endswith(b"\r\n"):
                    return  # cut before a chunk-size line
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while (line := self.rfile.readline(65536)) not in (b"\r\n", b""):
                        pass  # trailers
                    resp.complete = line == b"\r\n"
                    return
                data = self.rfile.read(size)
                if len(data) < size or self.rfile.read(2) != b"\r\n":
                    return
                resp.chunk_sizes.append(size)
                yield data
        except (ConnectionError, TimeoutError):
            return

    def iter_events(self, resp: Response) -> Iterator[tuple[bytes, float]]:
        """Each SSE event of the body (without its blank line) and when it arrived."""
        buffer = b""
        for data in self.iter_chunks(resp):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                yield event, time.monotonic()

    def at_eof(self, timeout: float = 2.0) -> bool:
        """True when the peer closes (or resets) the connection within `timeout`
        without sending another byte."""
        self.sock.settimeout(timeout)
        try:
            return self.rfile.read(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def request(
    port: int,
    method: str,
    target: str | bytes,
    headers: Headers,
    body: bytes = b"",
    timeout: float = 10,
) -> Response:
    """One request on a fresh connection."""
    with Conn(port, timeout=timeout) as conn:
        return conn.request(method, target, headers, body)
