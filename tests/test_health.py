"""The health endpoint (README "Operations"): `GET /_fluxgate/health`, no auth, never proxied."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor


@pytest.fixture
def catch_all(upstream: Any, make_supervisor: Any) -> Supervisor:
    """The standard config plus an upstream on `/`, which would match the health path."""
    doc = proxy_config(upstream.url)
    doc["upstreams"]["everything"] = {"request_path": "/", "target_url": upstream.url}
    sup: Supervisor = make_supervisor(doc)
    return sup


def test_health_answers_200_json_with_the_generation_without_auth(proxy: Supervisor) -> None:
    status, headers, body = proxy.request("GET", "/_fluxgate/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    report = json.loads(body)
    assert report["status"] == "ok"
    assert report["generation"] == 1


def test_health_with_a_query_string_is_still_health(proxy: Supervisor) -> None:
    status, _, body = proxy.request("GET", "/_fluxgate/health?probe=lb")
    assert status == 200
    assert json.loads(body)["generation"] == 1


def test_health_is_never_proxied_even_under_a_root_upstream(
    catch_all: Supervisor, upstream: Any
) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    for headers in ({}, auth):
        status, _, body = catch_all.request("GET", "/_fluxgate/health", headers=headers)
        assert status == 200
        assert json.loads(body)["status"] == "ok"
    assert catch_all.request("HEAD", "/_fluxgate/health")[0] == 200
    assert upstream.requests == []
    # The root upstream does catch everything else.
    assert catch_all.request("GET", "/v1/models", headers=auth)[0] == 200
    assert [r.target for r in upstream.requests] == [b"/v1/models"]


def test_no_method_or_spelling_of_the_health_path_is_proxied(
    catch_all: Supervisor, upstream: Any
) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    catch_all.request("POST", "/_fluxgate/health", headers=auth, body=b"{}")
    catch_all.request("GET", "/_fluxgate/health/", headers=auth)
    assert upstream.requests == []
