"""Raw requests against a real supervisor (README "Request handling", steps 1–3), gunicorn-style.

Each `tests/requests/{valid,invalid}/NNN.http` holds the exact bytes a client
sends (CRLFs and all; `$CLIENT_KEY` stands for the suite's client key), and
`NNN.expect` beside it holds `key: value` lines: the `status`, and for valid
requests the `upstream_target` the fake upstream must receive. `#` lines
describe the case.

Invalid requests carry a valid credential and route, so anything that let
them through would reach the upstream. Each must be answered with a JSON
error and a closed connection, reach nothing upstream, and be logged: at
WARNING, as every refusal is (docs/security.md), and in the TRACE request
line with its status.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from demo.fake_upstream import FakeUpstreamThread
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor

REQUESTS = Path(__file__).parent / "requests"
TIMEOUT = 5.0


def cases(kind: str) -> list[Any]:
    return [
        pytest.param(path, id=f"{kind}/{path.stem}")
        for path in sorted((REQUESTS / kind).glob("*.http"))
    ]


def load(path: Path) -> tuple[bytes, dict[str, str]]:
    raw = path.read_bytes().replace(b"$CLIENT_KEY", CLIENT_KEY.encode())
    expect: dict[str, str] = {}
    for line in path.with_suffix(".expect").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(":")
            expect[key.strip()] = value.strip()
    return raw, expect


class Response:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes, closed: bool):
        self.status = status
        self.headers = headers
        self.body = body
        self.closed = closed  # the server closed the connection after this response


def exchange(port: int, raw: bytes, await_close: bool = False) -> Response:
    """Send `raw` on a fresh connection and read one response; with `await_close`, then
    wait (bounded) for the server to close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        # The server may answer and close before it has read an oversized head.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        reader = sock.makefile("rb")
        status_line = reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[bytes, bytes] = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = reader.read(int(headers[b"content-length"]))
        else:
            assert headers.get(b"transfer-encoding") == b"chunked", headers
            body = b""
            while size := int(reader.readline().split(b";")[0], 16):
                body += reader.read(size + 2)[:-2]
            reader.readline()
        closed = False
        if await_close:
            try:
                closed = reader.read(1) == b""
            except ConnectionResetError:
                closed = True
        return Response(int(status_line.split()[1]), headers, body, closed)


@pytest.fixture(scope="module")
def sup(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    return module_supervisor(proxy_config(up.url))


def probe_reaches_upstream(sup: Supervisor, up: FakeUpstreamThread, seen: int) -> None:
    """A valid request after the case: once it has arrived upstream, anything the case
    let through would have arrived too; exactly the probe must be new."""
    raw = b"GET /openai/probe HTTP/1.1\r\nHost: h\r\nx-api-key: %s\r\n\r\n" % CLIENT_KEY.encode()
    exchange(sup.port, raw)
    new = up.wait_for_requests(seen + 1, timeout=TIMEOUT)[seen:]
    assert [r.target for r in new] == [b"/probe"]


@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid_request_is_refused(path: Path, sup: Supervisor, up: FakeUpstreamThread) -> None:
    raw, expect = load(path)
    status = int(expect["status"])
    seen = len(up.requests)
    mark = sup.mark()

    response = exchange(sup.port, raw, await_close=True)

    assert response.status == status, response.body
    assert response.headers[b"content-type"] == b"application/json"
    error = json.loads(response.body)["error"]
    assert error["type"] and error["message"]
    assert response.headers[b"connection"] == b"close"
    assert response.closed, "the connection must be closed after a refusal"
    sup.wait_for_log(rf"^WARNING .*request rejected .*status={status}\b", start=mark)
    sup.wait_for_log(rf"^TRACE .* request .*status={status}\b", start=mark)
    probe_reaches_upstream(sup, up, seen)


@pytest.mark.parametrize("path", cases("valid"))
def test_valid_request_is_forwarded(path: Path, sup: Supervisor, up: FakeUpstreamThread) -> None:
    raw, expect = load(path)
    seen = len(up.requests)

    response = exchange(sup.port, raw)

    assert response.status == int(expect["status"]), response.body
    [forwarded] = up.wait_for_requests(seen + 1, timeout=TIMEOUT)[seen:]
    assert forwarded.target == expect["upstream_target"].encode()
    assert forwarded.header("host") == f"127.0.0.1:{up.port}".encode()


def test_matrix_is_big_enough() -> None:
    assert len(cases("invalid")) >= 20
    assert len(cases("valid")) >= 6
