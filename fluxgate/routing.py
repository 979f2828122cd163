"""Routing: which upstream a request path belongs to, and the path to send it to.

README "Request handling", steps 6–7. Matching is on the raw request-target bytes (no decoding, so
`/%6Fpenai` is not `/openai`), on segment boundaries, longest prefix first;
`/path` and `/path/` match alike. The routes of a principal are already
ordered longest-first in the config, so the first hit wins.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_to_bytes

from .config import Upstream

# A percent-decoded path splits into segments at "/" and at "\" (which some
# servers treat as "/"), so `..%2f` and `..%5c` climb as well as `../`.
_SEGMENT_SEPARATORS: Final = re.compile(rb"[/\\]")


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


def has_dot_segment(path: bytes) -> bool:
    """Whether `path` has a `.` or `..` segment, raw or percent-encoded.

    The rest of a path after its prefix is forwarded verbatim, so an upstream
    that normalises it would climb out of the target's base path: with two
    upstreams on one host that differ by base path, `/cheap/../gpt4/...` would
    reach the other one's deployment with this one's provider key.
    """
    if b"." not in path and b"%" not in path:  # most API paths: nothing to decode
        return False
    return any(s in (b".", b"..") for s in _SEGMENT_SEPARATORS.split(unquote_to_bytes(path)))
