"""Routing (README "Request handling", steps 6–7): which upstream a path belongs to, and
the target it is sent to.

Unit tests drive `match` and `upstream_target` with the routes of a principal
built by `build_config`, as the proxy does; the last test goes end to end.
"""

from __future__ import annotations

from typing import Any

import pytest

from fluxgate.auth import authenticate
from fluxgate.config import Config, Upstream, build_config
from fluxgate.routing import match, upstream_target
from tests.conftest import CLIENT_KEY, LIMITED_KEY, proxy_config
from tests.supervisor_process import Supervisor

HOST = "http://127.0.0.1:9"


def routes_config(**upstreams: dict[str, Any]) -> Config:
    return build_config(
        {
            "version": 1,
            "upstreams": upstreams,
            "api_keys": {"static": [{"id": "ci", "key": CLIENT_KEY}]},
        }
    )


def upstream(request_path: str, target_url: str = HOST) -> dict[str, Any]:
    return {"request_path": request_path, "target_url": target_url, "api_key": "sk-x"}


def routes(config: Config) -> tuple[Upstream, ...]:
    principal = authenticate(config, [(b"authorization", b"Bearer " + CLIENT_KEY.encode())])
    return principal.routes


def matched(config: Config, path: bytes) -> str | None:
    hit = match(routes(config), path)
    return hit.name if hit else None


@pytest.fixture(scope="module")
def openai() -> Config:
    return routes_config(openai=upstream("/openai"))


# Matching


@pytest.mark.parametrize("path", [b"/openai", b"/openai/", b"/openai/v1/chat/completions"])
def test_prefix_matches_itself_and_paths_below_it(openai: Config, path: bytes) -> None:
    assert matched(openai, path) == "openai"


@pytest.mark.parametrize("path", [b"/openaix", b"/openai-v2/models", b"/open", b"/", b"/OpenAI"])
def test_prefix_matches_only_on_a_segment_boundary(openai: Config, path: bytes) -> None:
    assert matched(openai, path) is None


@pytest.mark.parametrize("request_path", ["/openai", "/openai/"])
@pytest.mark.parametrize("path", [b"/openai", b"/openai/", b"/openai/v1/models"])
def test_trailing_slash_is_equivalent_in_config_and_request(request_path: str, path: bytes) -> None:
    assert matched(routes_config(openai=upstream(request_path)), path) == "openai"


def test_matching_is_on_raw_bytes_without_percent_decoding(openai: Config) -> None:
    assert matched(openai, b"/%6Fpenai/v1/models") is None


def test_longest_prefix_wins_whatever_the_config_order() -> None:
    config = routes_config(
        short=upstream("/api"), long=upstream("/api/v2"), middle=upstream("/api/v2/beta")
    )
    assert matched(config, b"/api/v1/x") == "short"
    assert matched(config, b"/api/v2") == "long"
    assert matched(config, b"/api/v2/x") == "long"
    assert matched(config, b"/api/v2/beta/x") == "middle"
    assert matched(config, b"/api/v2beta") == "short"


def test_root_request_path_catches_everything_but_loses_to_longer_prefixes() -> None:
    config = routes_config(catchall=upstream("/"), openai=upstream("/openai"))
    assert matched(config, b"/") == "catchall"
    assert matched(config, b"/anything/else") == "catchall"
    assert matched(config, b"/openaix") == "catchall"
    assert matched(config, b"/openai/v1/models") == "openai"


def test_no_upstream_matches_gives_none() -> None:
    config = routes_config(openai=upstream("/openai"), anthropic=upstream("/anthropic"))
    assert matched(config, b"/gemini/v1") is None


def test_credential_routes_only_to_its_own_upstreams() -> None:
    config = build_config(proxy_config(HOST))
    limited = authenticate(config, [(b"x-api-key", LIMITED_KEY.encode())])
    assert match(limited.routes, b"/openai/v1/models") is None
    hit = match(limited.routes, b"/anthropic/v1/messages")
    assert hit is not None and hit.name == "anthropic"


# Target mapping


def target(request_path: str, target_url: str, request_target: bytes) -> bytes:
    config = routes_config(up=upstream(request_path, target_url))
    hit = match(routes(config), request_target.partition(b"?")[0])
    assert hit is not None
    return upstream_target(hit, request_target)


@pytest.mark.parametrize(
    ("target_url", "request_target", "expected"),
    [
        ("https://h/base", b"/openai/v1/x", b"/base/v1/x"),
        ("https://h/base/", b"/openai/v1/x", b"/base/v1/x"),
        ("https://h/base", b"/openai", b"/base"),
        ("https://h/base", b"/openai/", b"/base/"),
        ("https://h", b"/openai/v1/x", b"/v1/x"),
        ("https://h/", b"/openai/v1/x", b"/v1/x"),
        ("https://h", b"/openai", b"/"),
        ("https://h", b"/openai/", b"/"),
    ],
)
def test_target_is_base_path_plus_rest_after_prefix(
    target_url: str, request_target: bytes, expected: bytes
) -> None:
    assert target("/openai", target_url, request_target) == expected


@pytest.mark.parametrize("target_url", ["https://h/base", "https://h"])
def test_root_request_path_keeps_the_whole_path(target_url: str) -> None:
    base = b"/base" if target_url.endswith("/base") else b""
    assert target("/", target_url, b"/v1/models") == base + b"/v1/models"


@pytest.mark.parametrize(
    ("request_target", "expected"),
    [
        (b"/openai/v1/x?a=1&b=%2F+c&a=2", b"/base/v1/x?a=1&b=%2F+c&a=2"),
        (b"/openai?x=%zz", b"/base?x=%zz"),
        (b"/openai/?", b"/base/?"),
        (b"/openai/v1/%E2%82%AC/a%2fb?q=%E2%82%AC", b"/base/v1/%E2%82%AC/a%2fb?q=%E2%82%AC"),
    ],
)
def test_path_and_query_are_kept_byte_for_byte(request_target: bytes, expected: bytes) -> None:
    assert target("/openai", "https://h/base", request_target) == expected


def test_query_on_prefix_without_base_path_goes_to_root() -> None:
    assert target("/openai", "https://h", b"/openai?x=1") == b"/?x=1"


# End to end


def test_path_of_an_upstream_the_key_may_not_use_is_404(proxy: Supervisor, upstream: Any) -> None:
    status, _, body = proxy.request(
        "GET", "/openai/v1/models", headers={"Authorization": f"Bearer {LIMITED_KEY}"}
    )
    assert status == 404
    assert b'"not_found"' in body
    status, _, _ = proxy.request(
        "GET", "/anthropic/v1/models?x=%2F", headers={"Authorization": f"Bearer {LIMITED_KEY}"}
    )
    assert status == 200
    assert [r.target for r in upstream.requests] == [b"/v1/models?x=%2F"]
