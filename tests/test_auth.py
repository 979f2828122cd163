"""Authentication (README "Request handling", step 5): where the credential is read,
static keys, HS256 JWTs, fail closed.

Unit tests call `authenticate(build_config(doc), headers)` with headers as the
server hands them over: lower-case names, byte pairs. The end-to-end tests at
the bottom go through a real supervisor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from typing import Any

import jwt
import pytest

from fluxgate.auth import MAX_TOKEN_BYTES, VERIFIED_JWTS_LIMIT, AuthError, authenticate
from fluxgate.config import Config, build_config
from tests.conftest import (
    CLIENT_KEY,
    JWT_SECRET,
    LIMITED_KEY,
    MINTED_TOKENS,
    SECRETS,
    make_jwt,
    proxy_config,
)
from tests.supervisor_process import SUPERVISOR, Supervisor

UPSTREAM_URL = "http://127.0.0.1:9"  # never contacted by the unit tests


@pytest.fixture(scope="module")
def config() -> Config:
    return build_config(proxy_config(UPSTREAM_URL))


def auth(config: Config, *headers: tuple[bytes, bytes]) -> Any:
    return authenticate(config, list(headers))


def bearer(token: str | bytes) -> tuple[bytes, bytes]:
    raw = token.encode() if isinstance(token, str) else token
    return (b"authorization", b"Bearer " + raw)


def route_names(principal: Any) -> set[str]:
    return {upstream.name for upstream in principal.routes}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft_jwt(
    header: dict[str, Any], payload: dict[str, Any] | None = None, secret: str = JWT_SECRET
) -> str:
    """A token signed with HMAC-SHA256 whatever its header claims: for alg/typ/kid tricks."""
    if payload is None:
        payload = {"sub": "test", "exp": int(time.time()) + 300}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


# Where the credential is read


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"bEaReR"])
def test_bearer_scheme_is_case_insensitive(config: Config, scheme: bytes) -> None:
    principal = auth(config, (b"authorization", scheme + b" " + CLIENT_KEY.encode()))
    assert principal.key_id == "ci"


def test_x_api_key_header_carries_the_credential(config: Config) -> None:
    assert auth(config, (b"x-api-key", CLIENT_KEY.encode())).key_id == "ci"


def test_api_key_header_carries_the_credential(config: Config) -> None:
    assert auth(config, (b"api-key", CLIENT_KEY.encode())).key_id == "ci"


def test_authorization_wins_over_x_api_key(config: Config) -> None:
    principal = auth(config, (b"x-api-key", CLIENT_KEY.encode()), bearer(LIMITED_KEY))
    assert principal.key_id == "limited"


def test_authorization_wins_over_api_key(config: Config) -> None:
    principal = auth(config, (b"api-key", LIMITED_KEY.encode()), bearer(CLIENT_KEY))
    assert principal.key_id == "ci"


def test_basic_scheme_is_refused_even_with_a_valid_x_api_key(config: Config) -> None:
    with pytest.raises(AuthError, match="scheme"):
        auth(config, (b"authorization", b"Basic dXNlcjpwYXNz"), (b"x-api-key", CLIENT_KEY.encode()))


def test_bearer_without_a_token_is_no_credential(config: Config) -> None:
    with pytest.raises(AuthError, match="missing credential"):
        auth(config, (b"authorization", b"Bearer "))


def test_no_credential_is_refused(config: Config) -> None:
    with pytest.raises(AuthError, match="missing credential"):
        auth(config, (b"host", b"example"), (b"content-type", b"application/json"))


# Static keys


def test_unknown_static_key_is_refused(config: Config) -> None:
    with pytest.raises(AuthError):
        auth(config, bearer("fg-not-a-configured-key"))


def test_static_key_gives_its_id_and_all_upstreams_when_none_listed(config: Config) -> None:
    principal = auth(config, bearer(CLIENT_KEY))
    assert principal.key_id == "ci"
    assert route_names(principal) == {"openai", "anthropic"}


def test_static_key_with_an_upstream_list_gets_only_those_upstreams(config: Config) -> None:
    principal = auth(config, bearer(LIMITED_KEY))
    assert principal.key_id == "limited"
    assert route_names(principal) == {"anthropic"}


def test_static_key_without_id_authenticates_with_no_id() -> None:
    doc = proxy_config(UPSTREAM_URL, api_keys={"static": [{"key": CLIENT_KEY}]})
    principal = auth(build_config(doc), bearer(CLIENT_KEY))
    assert principal.key_id is None
    assert route_names(principal) == {"openai", "anthropic"}


def test_no_keys_configured_fails_closed() -> None:
    config = build_config(proxy_config(UPSTREAM_URL, api_keys={}))
    for token in (CLIENT_KEY, make_jwt()):
        with pytest.raises(AuthError):
            auth(config, bearer(token))


def test_credential_that_reaches_no_upstream_is_refused() -> None:
    keys = {"static": [{"id": "ci", "key": CLIENT_KEY}], "jwt": [{"id": "dev", "key": JWT_SECRET}]}
    config = build_config(proxy_config(UPSTREAM_URL, upstreams={}, api_keys=keys))
    with pytest.raises(AuthError, match="no upstream"):
        auth(config, bearer(CLIENT_KEY))
    with pytest.raises(AuthError, match="no upstream"):
        auth(config, bearer(make_jwt()))


def test_key_is_compared_exactly(config: Config) -> None:
    for near_miss in (CLIENT_KEY[:-1], CLIENT_KEY + "x", CLIENT_KEY.upper()):
        with pytest.raises(AuthError):
            auth(config, bearer(near_miss))


# JWT


def test_valid_hs256_jwt_with_known_kid_is_accepted_for_all_upstreams(config: Config) -> None:
    principal = auth(config, bearer(make_jwt("dev")))
    assert principal.key_id == "dev"
    assert route_names(principal) == {"openai", "anthropic"}


def test_jwt_in_x_api_key_is_accepted(config: Config) -> None:
    assert auth(config, (b"x-api-key", make_jwt().encode())).key_id == "dev"


def test_jwt_with_typ_jwt_is_accepted(config: Config) -> None:
    token = craft_jwt({"alg": "HS256", "typ": "JWT", "kid": "dev"})
    assert auth(config, bearer(token)).key_id == "dev"


def test_jwt_without_typ_is_accepted(config: Config) -> None:
    token = craft_jwt({"alg": "HS256", "kid": "dev"})
    assert auth(config, bearer(token)).key_id == "dev"


def test_jwt_without_exp_is_accepted(config: Config) -> None:
    token = craft_jwt({"alg": "HS256", "kid": "dev"}, {"sub": "test"})
    assert auth(config, bearer(token)).key_id == "dev"


@pytest.mark.parametrize("typ", ["JWS", "at+jwt", "", None])
def test_jwt_with_typ_other_than_jwt_is_refused(config: Config, typ: Any) -> None:
    token = craft_jwt({"alg": "HS256", "typ": typ, "kid": "dev"})
    with pytest.raises(AuthError):
        auth(config, bearer(token))


def test_jwt_with_alg_none_is_refused(config: Config) -> None:
    header = b64url(json.dumps({"alg": "none", "kid": "dev", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": "test", "exp": int(time.time()) + 300}).encode())
    with pytest.raises(AuthError):
        auth(config, bearer(f"{header}.{payload}."))


@pytest.mark.filterwarnings("ignore:The HMAC key is")
def test_jwt_signed_with_hs384_is_refused(config: Config) -> None:
    import jwt

    token = jwt.encode({"sub": "test"}, JWT_SECRET, algorithm="HS384", headers={"kid": "dev"})
    with pytest.raises(AuthError):
        auth(config, bearer(token))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "hs256", "HS256 ", None])
def test_jwt_whose_header_names_another_alg_is_refused_even_with_a_valid_hmac(
    config: Config, alg: Any
) -> None:
    # The classic confusion: an RS256-shaped header with an HMAC made from the shared secret.
    token = craft_jwt({"alg": alg, "typ": "JWT", "kid": "dev"})
    with pytest.raises(AuthError):
        auth(config, bearer(token))


def test_jwt_without_kid_is_refused(config: Config) -> None:
    token = craft_jwt({"alg": "HS256", "typ": "JWT"})
    with pytest.raises(AuthError):
        auth(config, bearer(token))


def test_jwt_with_unknown_kid_is_refused(config: Config) -> None:
    with pytest.raises(AuthError):
        auth(config, bearer(make_jwt("prod")))


@pytest.mark.parametrize("kid", ["../dev", "dev\u0000", "dev/", "DEV", " dev", "dev ", ["dev"], 1])
def test_jwt_kid_must_name_a_key_exactly(config: Config, kid: Any) -> None:
    token = craft_jwt({"alg": "HS256", "typ": "JWT", "kid": kid})
    with pytest.raises(AuthError):
        auth(config, bearer(token))


def test_jwt_signed_with_another_secret_is_refused(config: Config) -> None:
    token = make_jwt("dev", secret="another-secret-that-is-also-32-bytes-long")
    with pytest.raises(AuthError):
        auth(config, bearer(token))


def test_jwt_with_tampered_payload_is_refused(config: Config) -> None:
    header, _, signature = make_jwt("dev").split(".")
    forged = b64url(json.dumps({"sub": "admin", "exp": int(time.time()) + 300}).encode())
    with pytest.raises(AuthError):
        auth(config, bearer(f"{header}.{forged}.{signature}"))


def test_expired_jwt_is_refused(config: Config) -> None:
    with pytest.raises(AuthError):
        auth(config, bearer(make_jwt("dev", exp=int(time.time()) - 10)))


def test_jwt_not_yet_valid_is_refused(config: Config) -> None:
    with pytest.raises(AuthError):
        auth(config, bearer(make_jwt("dev", nbf=int(time.time()) + 300)))


@pytest.mark.parametrize("token", ["abc.def.ghi", "..", "e30.e30.", "!!!.???.***", "a.b.c.d"])
def test_malformed_jwt_is_refused(config: Config, token: str) -> None:
    with pytest.raises(AuthError):
        auth(config, bearer(token))


def test_token_over_the_size_cap_is_refused_even_if_validly_signed(config: Config) -> None:
    token = make_jwt("dev", pad="x" * MAX_TOKEN_BYTES)
    assert len(token) > MAX_TOKEN_BYTES
    with pytest.raises(AuthError):
        auth(config, bearer(token))


# A verified JWT is remembered with its config (fluxgate.auth): never past its claims


def test_remembered_jwt_is_refused_once_its_exp_has_passed() -> None:
    config = build_config(proxy_config(UPSTREAM_URL))
    now = time.time()
    token = make_jwt("dev", exp=int(now) + 60)
    assert authenticate(config, [bearer(token)], now=now).key_id == "dev"
    assert authenticate(config, [bearer(token)], now=now + 59).key_id == "dev"
    with pytest.raises(AuthError):
        authenticate(config, [bearer(token)], now=now + 61)


def test_remembered_jwt_is_refused_before_its_nbf_and_iat() -> None:
    config = build_config(proxy_config(UPSTREAM_URL))
    now = int(time.time())
    token = make_jwt("dev", nbf=now - 5, iat=now - 2)
    assert authenticate(config, [bearer(token)], now=now).key_id == "dev"
    for earlier in (now - 10, now - 3):  # before nbf, then after nbf but before iat
        with pytest.raises(AuthError):
            authenticate(config, [bearer(token)], now=earlier)


def test_jwt_verified_before_a_key_rotation_is_refused_after_it() -> None:
    doc = proxy_config(UPSTREAM_URL)
    token = make_jwt("dev")
    assert auth(build_config(doc), bearer(token)).key_id == "dev"
    doc["api_keys"]["jwt"] = [{"id": "dev", "key": "a-new-secret-of-at-least-32-bytes-0123"}]
    with pytest.raises(AuthError):
        auth(build_config(doc), bearer(token))


def test_remembered_jwts_are_bounded() -> None:
    config = build_config(proxy_config(UPSTREAM_URL))
    exp = int(time.time()) + 300
    for i in range(VERIFIED_JWTS_LIMIT + 5):  # not make_jwt: no log ever sees these
        token = jwt.encode({"n": i, "exp": exp}, JWT_SECRET, algorithm="HS256",
                           headers={"kid": "dev"})  # fmt: skip
        auth(config, bearer(token))
    assert 0 < len(config.verified_jwts) <= VERIFIED_JWTS_LIMIT


def test_jwt_keys_may_share_a_secret_and_each_kid_is_its_own_id() -> None:
    doc = proxy_config(UPSTREAM_URL)
    doc["api_keys"]["jwt"] = [{"id": "dev", "key": JWT_SECRET}, {"id": "ci", "key": JWT_SECRET}]
    config = build_config(doc)
    assert auth(config, bearer(make_jwt("ci"))).key_id == "ci"
    assert auth(config, bearer(make_jwt("dev"))).key_id == "dev"


# End to end, through a running supervisor


def assert_unauthorized(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 401
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "unauthorized"
    assert error["message"]
    assert not any(secret in body.decode() for secret in SECRETS)


def test_request_without_credential_gets_401_json(proxy: Supervisor) -> None:
    assert_unauthorized(*proxy.request("GET", "/openai/v1/models"))


def test_request_with_wrong_key_gets_401_json(proxy: Supervisor) -> None:
    headers = {"Authorization": "Bearer fg-wrong-key"}
    assert_unauthorized(*proxy.request("GET", "/openai/v1/models", headers=headers))


def test_request_with_basic_scheme_gets_401_json(proxy: Supervisor) -> None:
    headers = {"Authorization": "Basic Y2k6cGFzcw==", "x-api-key": CLIENT_KEY}
    assert_unauthorized(*proxy.request("GET", "/openai/v1/models", headers=headers))


# A valid key of its own, so that the query-string tests below cannot hide a
# leak of the suite's real keys. request_url masks credential-like query values.
QUERY_KEY = "fg-query-string-key-5e81"


@pytest.fixture
def query_key_proxy(upstream: Any, make_supervisor: Any) -> Supervisor:
    doc = proxy_config(upstream.url)
    doc["api_keys"]["static"].append({"id": "query", "key": QUERY_KEY})
    sup: Supervisor = make_supervisor(doc)
    return sup


def test_credential_in_the_query_string_is_ignored(
    query_key_proxy: Supervisor, upstream: Any
) -> None:
    assert query_key_proxy.request(
        "GET", "/openai/v1/models", headers={"x-api-key": QUERY_KEY}
    )[0] == 200  # fmt: skip
    for name in ("api_key", "key", "access_token", "api-key"):
        status, headers, body = query_key_proxy.request(
            "GET", f"/openai/v1/models?{name}={QUERY_KEY}"
        )
        assert_unauthorized(status, headers, body)
    assert len(upstream.requests) == 1


def test_credential_in_the_query_string_does_not_reach_the_log(
    query_key_proxy: Supervisor,
) -> None:
    mark = query_key_proxy.mark()
    query_key_proxy.request("GET", f"/openai/v1/models?api_key={QUERY_KEY}")
    query_key_proxy.wait_for_log(r"request .*status=401", start=mark)
    assert not [line for line in query_key_proxy.lines if QUERY_KEY in line]


def test_token_from_the_cli_is_accepted_by_the_running_proxy(
    proxy: Supervisor, upstream: Any
) -> None:
    out = subprocess.run(
        [SUPERVISOR, "token", "--kid", "dev", "--config", str(proxy.config_path)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    token = out.stdout.strip()
    MINTED_TOKENS.append(token)
    status, _, body = proxy.request(
        "GET", "/openai/v1/models", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200, body
    assert json.loads(body)["object"] == "list"
    assert upstream.requests[-1].path == "/v1/models"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no_credential"),
        ({"Authorization": "Basic Y2k6cGFzcw=="}, "bad_scheme"),
        ({"Authorization": "Bearer fg-wrong-key"}, "unknown_key"),
        ({"Authorization": "Bearer " + "k" * (MAX_TOKEN_BYTES + 1)}, "too_long"),
        ({"Authorization": "Bearer not.a.jwt"}, "malformed"),
    ],
)
def test_the_log_line_says_why_a_credential_was_refused(
    proxy: Supervisor, headers: dict[str, str], reason: str
) -> None:
    mark = proxy.mark()
    status = proxy.request("GET", "/openai/v1/models", headers=headers)[0]
    assert status == 401
    line = proxy.wait_for_log(r"request .*status=401", start=mark)
    assert f" auth_error={reason} " in line


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: make_jwt(exp=int(time.time()) - 60), "expired"),
        (lambda: make_jwt(nbf=int(time.time()) + 600), "not_yet_valid"),
        (lambda: make_jwt(secret="a-rotated-secret-of-at-least-32-bytes!!"), "bad_signature"),
        (lambda: make_jwt(kid="nobody"), "unknown_kid"),
    ],
    ids=["expired", "not_yet_valid", "bad_signature", "unknown_kid"],
)
def test_a_refused_jwt_logs_its_reason_and_the_client_sees_only_invalid_credential(
    proxy: Supervisor, token: Any, reason: str
) -> None:
    jwt_text = token()
    mark = proxy.mark()
    status, _, body = proxy.request(
        "GET", "/openai/v1/models", headers={"Authorization": f"Bearer {jwt_text}"}
    )
    assert status == 401
    assert json.loads(body)["error"]["message"] == "invalid credential"
    line = proxy.wait_for_log(r"request .*status=401", start=mark)
    assert f" auth_error={reason} " in line
    assert jwt_text not in line
