"""Client authentication: which credential a request carries and who it belongs to.

SPEC §4.5. The credential comes from `Authorization: Bearer`, else from
`x-api-key`, else from `api-key`. It is looked up among static keys by its
SHA-256 digest (a hash lookup: nothing compares the token to a secret byte by
byte), then, if it has JWT shape, verified as an HS256 JWT whose `kid` names
a configured key. Anything else fails closed.

Verifying a JWT costs ~45 µs of PyJWT (a third of a whole relayed request),
and a client sends the same token with every request until it expires. So a
token that verified is remembered, with the window its claims allow
(`nbf`/`iat` to `exp`), in its config's `verified_jwts`: the same bytes
verify the same way under the same keys until the clock leaves that window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Final

import jwt

from .config import Config, Principal, key_digest

CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"x-api-key", b"api-key"})

# Tokens longer than this are refused before any hashing or JWT parsing; no
# legitimate key or HS256 JWT comes near it.
MAX_TOKEN_BYTES: Final = 8192
# Verified JWTs remembered per config (each at most MAX_TOKEN_BYTES): a full
# table is emptied and refills with the tokens in use.
VERIFIED_JWTS_LIMIT: Final = 4096


class AuthError(Exception):
    """Authentication failed; the message is safe to return to the client."""


_NO_CREDENTIAL = AuthError("missing credential: send Authorization: Bearer <key>")
_BAD_SCHEME = AuthError("unsupported authorization scheme: use Bearer")
_INVALID = AuthError("invalid credential")


def extract_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The client's token; header names are lower-case, as the server hands them over."""
    x_api_key: bytes | None = None
    api_key: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                raise _BAD_SCHEME
            token = token.strip()
            if not token:
                raise _NO_CREDENTIAL
            return token
        if name == b"x-api-key" and x_api_key is None:
            x_api_key = value.strip()
        elif name == b"api-key" and api_key is None:
            api_key = value.strip()
    fallback = x_api_key or api_key
    if not fallback:
        raise _NO_CREDENTIAL
    return fallback


def _verify_jwt(config: Config, token: bytes) -> tuple[Principal, float, float]:
    """The principal, and the time window in which the token stays valid."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _INVALID from None
    # PyJWT checks neither `typ` nor `kid` against our keys: do it before verifying.
    if header.get("alg") != "HS256":
        raise _INVALID
    if "typ" in header and header["typ"] != "JWT":  # optional, but `null` is not absent
        raise _INVALID
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise _INVALID
    secret = config.jwt_keys.get(kid)
    if secret is None:
        raise _INVALID
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"verify_aud": False, "verify_iss": False, "verify_sub": False},
        )
    except jwt.PyJWTError:
        raise _INVALID from None
    return config.jwt_principals[kid], *_valid_window(claims)


def _valid_window(claims: dict[str, Any]) -> tuple[float, float]:
    """When PyJWT (no leeway) accepts these claims: from max(nbf, iat), before exp.

    They are numbers by now (PyJWT refused them otherwise) and compared as
    int(), as PyJWT does.
    """
    start = max((int(claims[name]) for name in ("nbf", "iat") if name in claims), default=-math.inf)
    end = int(claims["exp"]) if "exp" in claims else math.inf
    return start, end


def _jwt_principal(config: Config, token: bytes, now: float) -> Principal:
    verified = config.verified_jwts
    known = verified.get(token)
    if known is not None:
        principal, start, end = known
        if start <= now < end:
            return principal
        del verified[token]  # expired: verify again, which refuses it
    principal, start, end = _verify_jwt(config, token)
    if not start <= now < end:  # PyJWT read the clock a moment earlier
        raise _INVALID
    if len(verified) >= VERIFIED_JWTS_LIMIT:
        verified.clear()
    verified[token] = (principal, start, end)
    return principal


def authenticate(
    config: Config, headers: Iterable[tuple[bytes, bytes]], now: float | None = None
) -> Principal:
    """The principal behind the request's credential, or AuthError (`now`: the
    time to judge a JWT's validity at, for tests; default the clock)."""
    token = extract_token(headers)
    if len(token) > MAX_TOKEN_BYTES:
        raise _INVALID
    principal = config.static_keys.get(key_digest(token))
    if principal is None:
        if not config.jwt_keys or token.count(b".") != 2:
            raise _INVALID
        principal = _jwt_principal(config, token, time.time() if now is None else now)
    if not principal.routes:
        raise AuthError("credential grants no upstream")
    return principal
