"""Client authentication: which credential a request carries and who it belongs to.

README "Request handling", step 5. The credential comes from `Authorization: Bearer`, else from
`x-api-key`, else from `api-key`. It is looked up among static keys by its
SHA-256 digest (a hash lookup: nothing compares the token to a secret byte by
byte), then, if it has JWT shape, verified as an HS256 JWT whose `kid` names
a configured key. Anything else fails closed.

Verifying a JWT with PyJWT costs a large part of a whole relayed request
(BENCHMARKS.md, "Measurements behind the design"), and a client sends the
same token with every request until it expires. So a token that verified
is remembered, with the window its claims allow (`nbf`/`iat` to `exp`), in
its config's `verified_jwts`: the same bytes verify the same way under the
same keys until the clock leaves that window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Final

import jwt

from .config import Config, Principal, key_digest
from .errors import (
    BAD_SCHEME,
    NO_CREDENTIAL,
    NO_UPSTREAM_GRANTED,
    UNAUTHORIZED,
    ErrorResponse,
    ProxyError,
)

# Tokens longer than this are refused before any hashing or JWT parsing; no
# legitimate key or HS256 JWT comes near it.
MAX_TOKEN_BYTES: Final = 8192
# Verified JWTs remembered per config (each at most MAX_TOKEN_BYTES): a full
# table is emptied and refills with the tokens in use.
VERIFIED_JWTS_LIMIT: Final = 4096


class AuthError(ProxyError):
    """Authentication failed. The client sees `response` (for a bad token, only
    "invalid credential"); the log line gets `reason`, which says why without
    saying with what. Raised fresh each time (see fluxgate.errors)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str, response: ErrorResponse = UNAUTHORIZED) -> None:
        super().__init__(response)
        self.reason = reason


# Why a request was refused, as the log line's `auth_error` says it.
NO_CREDENTIAL_REASON: Final = "no_credential"
BAD_SCHEME_REASON: Final = "bad_scheme"
TOO_LONG: Final = "too_long"
UNKNOWN_KEY: Final = "unknown_key"  # neither a static key nor a JWT for a configured kid
UNKNOWN_KID: Final = "unknown_kid"
MALFORMED: Final = "malformed"  # JWT-shaped but not a well-formed HS256 JWT
BAD_SIGNATURE: Final = "bad_signature"
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not_yet_valid"
NO_UPSTREAM: Final = "no_upstream"


def extract_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The client's token; header names are lower-case, as the server hands them over."""
    x_api_key: bytes | None = None
    api_key: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                raise AuthError(BAD_SCHEME_REASON, BAD_SCHEME)
            token = token.strip()
            if not token:
                raise AuthError(NO_CREDENTIAL_REASON, NO_CREDENTIAL)
            return token
        if name == b"x-api-key" and x_api_key is None:
            x_api_key = value.strip()
        elif name == b"api-key" and api_key is None:
            api_key = value.strip()
    fallback = x_api_key or api_key
    if not fallback:
        raise AuthError(NO_CREDENTIAL_REASON, NO_CREDENTIAL)
    return fallback


def _verify_jwt(config: Config, token: bytes) -> tuple[Principal, float, float]:
    """The principal, and the time window in which the token stays valid."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError(MALFORMED) from None
    # PyJWT checks neither `typ` nor `kid` against our keys: do it before verifying.
    if header.get("alg") != "HS256":
        raise AuthError(MALFORMED)
    if "typ" in header and header["typ"] != "JWT":  # optional, but `null` is not absent
        raise AuthError(MALFORMED)
    kid = header.get("kid")
    if not isinstance(kid, str) or (secret := config.jwt_keys.get(kid)) is None:
        raise AuthError(UNKNOWN_KID)
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"verify_aud": False, "verify_iss": False, "verify_sub": False},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(EXPIRED) from None
    except jwt.ImmatureSignatureError:
        raise AuthError(NOT_YET_VALID) from None
    except jwt.InvalidSignatureError:
        raise AuthError(BAD_SIGNATURE) from None
    except jwt.PyJWTError:
        raise AuthError(MALFORMED) from None
    principal = config.jwt_principals[kid]
    if principal.limit_by_sub:  # each subject its own bucket (fluxgate.ratelimit)
        subject = claims.get("sub")
        principal = replace(principal, bucket=f"{principal.bucket}:sub:{subject or ''}")
    return principal, *_valid_window(claims)


def _outside(start: float, end: float, now: float) -> AuthError | None:
    if now < start:
        return AuthError(NOT_YET_VALID)
    if now >= end:
        return AuthError(EXPIRED)
    return None


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
        del verified[token]  # out of its window: verify again, which refuses it
    principal, start, end = _verify_jwt(config, token)
    if (error := _outside(start, end, now)) is not None:  # PyJWT read the clock earlier
        raise error
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
        raise AuthError(TOO_LONG)
    principal = config.static_keys.get(key_digest(token))
    if principal is None:
        if not config.jwt_keys or token.count(b".") != 2:
            raise AuthError(UNKNOWN_KEY)
        principal = _jwt_principal(config, token, time.time() if now is None else now)
    if not principal.routes:
        raise AuthError(NO_UPSTREAM, NO_UPSTREAM_GRANTED)
    return principal
