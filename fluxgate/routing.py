"""Routing: which upstream a request path belongs to, and the path to send it to.

SPEC §4.6–4.7. Matching is on the raw request-target bytes (no decoding, so
`/%6Fpenai` is not `/openai`), on segment boundaries, longest prefix first;
`/path` and `/path/` match alike. The routes of a principal are already
ordered longest-first in the config, so the first hit wins.
"""

from __future__ import annotations

from .config import Upstream


def match(routes: tuple[Upstream, ...], path: bytes) -> Upstream | None:
    """The upstream whose prefix matches `path` (query excluded) on a segment boundary."""
    for upstream in routes:
        prefix = upstream.prefix
        if path.startswith(prefix):
            n = len(prefix)
            if len(path) == n or path[n] == 0x2F:  # "/"
                return upstream
    return None


def upstream_target(upstream: Upstream, target: bytes) -> bytes:
    """Path and query to request upstream: base path + the rest after the prefix, verbatim.

    `target` is the request-target exactly as the client sent it, so
    percent-encoding and the query survive byte for byte.
    """
    rest = target[len(upstream.prefix) :]
    if not rest or rest[0] == 0x3F:  # "?": the request was for the prefix itself
        return (upstream.base_path or b"/") + rest
    return upstream.base_path + rest
