"""Client authentication: which credential a request carries and who it belongs to.

SPEC §4.5. The credential comes from `Authorization: Bearer`, else from
`x-api-key`, else from `api-key`. It is looked up among static keys by its
SHA-256 digest (a hash lookup: nothing compares the token to a secret byte by
byte), then, if it has JWT shape, verified as an HS256 JWT whose `kid` names
a configured key. Anything else fails closed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import jwt

from .config import Config, Principal, key_digest

CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"x-api-key", b"api-key"})

# Tokens longer than this are refused before any hashing or JWT parsing; no
# legitimate key or HS256 JWT comes near it.
MAX_TOKEN_BYTES: Final = 8192


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


def _verify_jwt(config: Config, token: bytes) -> Principal:
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
        jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"verify_aud": False, "verify_iss": False, "verify_sub": False},
        )
    except jwt.PyJWTError:
        raise _INVALID from None
    return config.jwt_principals[kid]


def authenticate(config: Config, headers: Iterable[tuple[bytes, bytes]]) -> Principal:
    """The principal behind the request's credential, or AuthError."""
    token = extract_token(headers)
    if len(token) > MAX_TOKEN_BYTES:
        raise _INVALID
    principal = config.static_keys.get(key_digest(token))
    if principal is None:
        if not config.jwt_keys or token.count(b".") != 2:
            raise _INVALID
        principal = _verify_jwt(config, token)
    if not principal.routes:
        raise AuthError("credential grants no upstream")
    return principal
