"""Secrets and auth attacks end to end (hardening): no secret in any error body, no
client credential forwarded upstream, and every JWT or credential trick refused
before anything reaches the upstream.

Already proven elsewhere and not repeated here:
- test_auth.py: the authentication rules at unit level (alg none, HS384, RS256/ES256
  headers with a valid HMAC, `kid` tricks, expiry, tampering, oversized tokens,
  credential precedence) and the query-string credential ignored and not logged;
- test_fidelity.py: each client credential header (lower-case) replaced by the
  provider key, none sent to an upstream without `api_key`;
- test_upstream_errors.py: 502 bodies for refused/reset/garbage/DNS/TLS carry no
  secret and no host name;
- conftest.py: after the run, every log line of every supervisor is scanned for
  every secret and every minted JWT (`no_secret_in_any_log_line`).

Here every request carries the suite's secrets in as many places as it can (the
credential, the query, the path, other headers, the body), and the whole response,
head and body, must contain none of them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from demo.fake_upstream import FakeUpstreamThread
from tests import rawhttp
from tests.conftest import (
    ANTHROPIC_KEY,
    CLIENT_KEY,
    JWT_SECRET,
    LIMITED_KEY,
    MINTED_TOKENS,
    OPENAI_KEY,
    SECRETS,
    make_jwt,
    proxy_config,
)
from tests.supervisor_process import Supervisor, free_port

DEADLINE_MS = 500
pytestmark = pytest.mark.usefixtures("fresh")  # each test sees only its own requests
# Secret-looking values only these tests use: a mistyped key, a key in a cookie...
TYPO_KEY = "fg-client-key-4d1c7e0b9b"  # one character off CLIENT_KEY
EXTRA_SECRETS = [TYPO_KEY, base64.b64encode(f"ci:{CLIENT_KEY}".encode()).decode()]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def crafted_jwt(header: dict[str, Any], secret: str = JWT_SECRET, **claims: Any) -> str:
    """HMAC-SHA256 over whatever header is given: for alg/kid tricks."""
    payload = {"sub": "attacker", "exp": int(time.time()) + 300, **claims}
    signing = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    token = f"{signing}.{b64url(signature)}"
    MINTED_TOKENS.append(token)  # scanned in every log line at the end of the run
    return token


def unsigned_jwt(**header: Any) -> str:
    body = b64url(json.dumps({"sub": "attacker", "secret": OPENAI_KEY}).encode())
    token = f"{b64url(json.dumps(header).encode())}.{body}."
    MINTED_TOKENS.append(token)
    return token


@pytest.fixture(scope="module")
def sup(
    up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]
) -> Iterator[Supervisor]:
    config = proxy_config(up.url)
    config["upstreams"]["request_timeout_ms"] = DEADLINE_MS
    config["upstreams"].update(
        {
            "refused": {"request_path": "/refused", "api_key": OPENAI_KEY,
                        "target_url": f"http://127.0.0.1:{free_port()}"},
            "dns": {"request_path": "/dns", "api_key": OPENAI_KEY,
                    "target_url": "http://does-not-exist.invalid"},
        }
    )  # fmt: skip
    proc = module_supervisor(config)
    yield proc
    proc.stop()
    # Every line this supervisor printed, including the ones logged after the last test
    # (the session-wide scan in conftest covers SECRETS and the minted JWTs).
    leaks = [line for line in proc.lines for s in EXTRA_SECRETS if s in line]
    assert leaks == [], leaks


def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        reader = sock.makefile("rb")
        status_line = reader.readline()
        head = [status_line]
        while (line := reader.readline()) not in (b"\r\n", b""):
            head.append(line)
        length = next(
            int(h.split(b":")[1]) for h in head if h.lower().startswith(b"content-length")
        )
        return b"".join(head) + b"\r\n" + reader.read(length)


H = "Host: fluxgate.test\r\n"
# The suite's secrets in places a careless error path might echo.
SPRAY = (
    f"X-Debug: {OPENAI_KEY}\r\nCookie: api_key={ANTHROPIC_KEY}\r\nX-Jwt-Secret: {JWT_SECRET}\r\n"
)
BODY = json.dumps({"api_key": OPENAI_KEY, "note": LIMITED_KEY}).encode()


def get(target: str, auth: str = f"Authorization: Bearer {CLIENT_KEY}\r\n") -> bytes:
    return f"GET {target} HTTP/1.1\r\n{H}{auth}{SPRAY}\r\n".encode()


def post(target: str, auth: str = f"Authorization: Bearer {CLIENT_KEY}\r\n") -> bytes:
    head = f"POST {target} HTTP/1.1\r\n{H}{auth}{SPRAY}Content-Length: {len(BODY)}\r\n\r\n"
    return head.encode() + BODY


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}\r\n"


QUERY = f"?api_key={CLIENT_KEY}&key={OPENAI_KEY}&token={JWT_SECRET}"


def error_cases() -> list[Any]:
    expired = make_jwt("dev", exp=int(time.time()) - 60)
    models = "/openai/v1/models"
    over_cap = get(models).replace(SPRAY.encode(), f"X-Big: {CLIENT_KEY * 3000}\r\n".encode())
    two_hosts = get(models).replace(H.encode(), f"{H}Host: {OPENAI_KEY}\r\n".encode())
    upgrade = f"Upgrade: websocket\r\nConnection: Upgrade\r\n{SPRAY}".encode()
    cases = [
        # The protocol's own refusals (README "Request handling", steps 1–3)
        (400, "bad_request", f"GET {models}{QUERY} HTTP/1.1\r\n"
         f"Authorization: Bearer {CLIENT_KEY}\r\n{SPRAY}\r\n".encode()),  # no Host
        (400, "bad_request", post("/openai/echo").replace(
            b"Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length")),
        (400, "bad_request", get(f"http://{CLIENT_KEY}:{OPENAI_KEY}@fluxgate.test{models}{QUERY}")),
        (400, "bad_request", two_hosts),
        (400, "bad_request", f"POST /openai/echo HTTP/1.1\r\n{H}{bearer(CLIENT_KEY)}{SPRAY}"
         f"Transfer-Encoding: chunked\r\n\r\n{OPENAI_KEY}\r\n".encode()),  # not a chunk size
        (431, "request_header_fields_too_large", over_cap),
        (501, "not_implemented", get("/openai/v1/realtime").replace(SPRAY.encode(), upgrade)),
        (505, "http_version_not_supported", get(models).replace(b"HTTP/1.1", b"HTTP/1.0")),
        # Authentication (§4.5)
        (401, "unauthorized", get(f"{models}{QUERY}", auth="")),
        (401, "unauthorized", get(models, auth=bearer(TYPO_KEY))),
        (401, "unauthorized", get(models, auth=f"x-api-key: {TYPO_KEY}\r\n")),
        (401, "unauthorized", get(models, auth=f"Authorization: Basic {EXTRA_SECRETS[1]}\r\n")),
        (401, "unauthorized", get(models, auth=bearer(expired))),
        (401, "unauthorized", get(models, auth=bearer(unsigned_jwt(alg="none", kid="dev")))),
        (401, "unauthorized", get(models, auth=bearer(crafted_jwt({"alg": "HS256",
                                                                   "kid": JWT_SECRET})))),
        (401, "unauthorized", get(models, auth=bearer(CLIENT_KEY * 400))),
        (401, "unauthorized", post("/openai/echo", auth=f"Proxy-Authorization: {CLIENT_KEY}\r\n")),
        # Routing and Fluxgate's own endpoints (§4.6, health)
        (404, "not_found", get(f"{models}{QUERY}", auth=bearer(LIMITED_KEY))),
        (404, "not_found", get(f"/_fluxgate/secrets{QUERY}")),
        (405, "method_not_allowed", post(f"/_fluxgate/health{QUERY}")),
        # The upstream fails (§4.10)
        (502, "upstream_unreachable", post(f"/refused/v1/chat/completions{QUERY}")),
        (502, "upstream_dns_error", get(f"/dns/v1/models{QUERY}")),
        (502, "upstream_connection_error", post(f"/openai/reset{QUERY}")),
        (502, "upstream_bad_response", get(f"/openai/garbage{QUERY}")),
        (504, "upstream_timeout", post(f"/openai/stall{QUERY}")),
    ]  # fmt: skip
    return [pytest.param(s, t, raw, id=f"{s}-{t}-{i}") for i, (s, t, raw) in enumerate(cases)]


@pytest.mark.parametrize(("status", "error_type", "raw"), error_cases())
def test_no_error_response_reveals_a_secret_or_echoes_the_request(
    sup: Supervisor, up: FakeUpstreamThread, status: int, error_type: str, raw: bytes
) -> None:
    response = exchange(sup.port, raw)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), response[:300]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)
    assert list(error) == ["error"] and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == error_type
    secrets = [*SECRETS, *EXTRA_SECRETS, *MINTED_TOKENS]
    assert not [s for s in secrets if s.encode() in response], response
    # Nothing of the request comes back: not its target, host names, or headers.
    for echo in (b"fluxgate.test", b"does-not-exist", b"127.0.0.1", b"X-Debug", b"api_key"):
        assert echo not in response, (echo, response)
    if status in (400, 401, 404, 405, 431, 501, 505):
        assert up.requests == []  # refused before anything was forwarded


def test_over_capacity_response_reveals_no_secret(
    up: FakeUpstreamThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = proxy_config(up.url, server={"max_connections": 1})
    proc = Supervisor(tmp_path_factory.mktemp("capacity"), config).start()
    try:
        with rawhttp.Conn(proc.port) as held:
            assert held.request("GET", "/_fluxgate/health", [rawhttp.host(proc.port)]).status == 200
            response = exchange(proc.port, get(f"/openai/v1/models{QUERY}"))
    finally:
        proc.stop()
    assert response.startswith(b"HTTP/1.1 503 ")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["error"]["type"] == "over_capacity"
    assert not [s for s in SECRETS if s.encode() in response]


# --- auth attacks through the running proxy: 401, and nothing reaches the upstream -------


def attack_tokens() -> list[Any]:
    now = int(time.time())
    return [
        pytest.param(unsigned_jwt(alg="none", typ="JWT", kid="dev"), id="alg-none"),
        pytest.param(unsigned_jwt(alg="None", kid="dev"), id="alg-None"),
        pytest.param(crafted_jwt({"alg": "none", "kid": "dev"}), id="alg-none-with-signature"),
        pytest.param(crafted_jwt({"alg": "RS256", "kid": "dev"}), id="rs256-confusion"),
        pytest.param(crafted_jwt({"alg": "HS512", "kid": "dev"}), id="hs512"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "../dev"}), id="kid-path-traversal"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "/dev/null"}, secret=""),
                     id="kid-dev-null"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "dev' OR '1'='1"}), id="kid-injection"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": {"id": "dev"}}), id="kid-object"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "dev", "jku": "http://evil/"},
                                 secret="attacker-secret-of-at-least-32-bytes!"), id="jku-own-key"),
        pytest.param(crafted_jwt({"alg": "HS256"}), id="no-kid"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "dev"}, exp=now - 1), id="expired"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "dev"}, nbf=now + 600), id="not-yet"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "dev"}, pad="x" * 9000), id="huge-8k+"),
        pytest.param(crafted_jwt({"alg": "HS256", "kid": "dev"}, pad="x" * 45000), id="huge-60k"),
        pytest.param(CLIENT_KEY.upper(), id="static-key-case"),
        pytest.param(CLIENT_KEY + "\x00", id="static-key-nul"),  # refused by the parser: 400
    ]  # fmt: skip


@pytest.mark.parametrize("token", attack_tokens())
def test_forged_or_tricked_credentials_are_refused_before_the_upstream(
    sup: Supervisor, up: FakeUpstreamThread, token: str
) -> None:
    for header in ("Authorization", "x-api-key"):
        value = f"Bearer {token}" if header == "Authorization" else token
        response = exchange(sup.port, get("/openai/v1/models", auth=f"{header}: {value}\r\n"))
        status = int(response.split(b" ", 2)[1])
        assert status == (400 if "\x00" in token else 401), response[:200]
        assert token.encode() not in response
    assert up.requests == []


@pytest.mark.parametrize(
    "where",
    [
        f"?api_key={CLIENT_KEY}",
        f"?access_token={CLIENT_KEY}",
        f"?key={CLIENT_KEY}",
        f"?token={make_jwt()}",
        f"?x-api-key={CLIENT_KEY}",
    ],
    ids=["api_key", "access_token", "key", "jwt-token", "x-api-key"],
)
def test_credentials_in_the_query_string_or_a_cookie_are_not_read(
    sup: Supervisor, up: FakeUpstreamThread, where: str
) -> None:
    raw = (f"GET /openai/v1/models{where} HTTP/1.1\r\n{H}Cookie: api_key={CLIENT_KEY}; "
           f"token={CLIENT_KEY}\r\n\r\n").encode()  # fmt: skip
    assert exchange(sup.port, raw).startswith(b"HTTP/1.1 401 ")
    assert up.requests == []


def test_no_client_credential_header_reaches_the_upstream_in_any_case_or_number(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """Odd-case names, duplicates, all three credential headers at once and
    Proxy-Authorization: the upstream sees exactly one credential, the provider's."""
    raw = (
        f"POST /openai/echo HTTP/1.1\r\n{H}"
        f"AUTHORIZATION: Bearer {CLIENT_KEY}\r\n"
        f"authorization: Bearer {LIMITED_KEY}\r\n"
        f"X-API-Key: {CLIENT_KEY}\r\nx-api-key: {TYPO_KEY}\r\n"
        f"Api-Key: {LIMITED_KEY}\r\nAPI-KEY: {CLIENT_KEY}\r\n"
        f"Proxy-Authorization: Basic {EXTRA_SECRETS[1]}\r\n"
        f"Connection: x-forward-me\r\nX-Forward-Me: {CLIENT_KEY}\r\n"
        f"Content-Length: 2\r\n\r\n{{}}"
    ).encode()
    assert exchange(sup.port, raw).startswith(b"HTTP/1.1 200 ")
    (req,) = up.wait_for_requests(1)
    credentials = [(n.lower(), v) for n, v in req.headers
                   if n.lower() in (b"authorization", b"x-api-key", b"api-key",
                                    b"proxy-authorization")]  # fmt: skip
    assert credentials == [(b"authorization", f"Bearer {OPENAI_KEY}".encode())]
    for secret in (CLIENT_KEY, LIMITED_KEY, TYPO_KEY, EXTRA_SECRETS[1]):
        assert secret.encode() not in req.raw_head
