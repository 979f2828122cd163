"""Validation rules (README "Configuration"), one accepted and one rejected side for each.

Each rejected case names the exact field path that must be reported. The
property tests at the end feed arbitrary and almost-right documents through
the whole loader: it may only ever answer with a config or `ConfigInvalid`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxgate.auth import MAX_TOKEN_BYTES
from fluxgate.config import build_config
from fluxgate.configfile import ConfigInvalid, LoadedConfig, parse_config_bytes
from fluxgate.limits import MAX_SLOTS
from fluxgate.validate_upstreams import HOP_BY_HOP_HEADERS, MAX_REQUEST_TIMEOUT_MS
from fluxgate.validation import MAX_CONNECTIONS, MAX_WORKERS, validate

REFERENCE = Path(__file__).resolve().parent.parent / "config" / "fluxgate.yaml"
DELETE = object()


def valid_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "server": {"bind_address": "127.0.0.1:8080", "max_connections": 10, "workers": 2},
        "upstreams": {
            "request_timeout_ms": 1000,
            "openai": {
                "request_path": "/openai",
                "target_url": "https://api.openai.com",
                "api_key": "sk-test-openai",
            },
            "anthropic": {
                "request_path": "/anthropic",
                "target_url": "https://api.anthropic.com",
                "api_key": "sk-ant-test",
                "auth_header": "x-api-key",
            },
        },
        "api_keys": {
            "static": [{"id": "pr", "key": "client-key-1", "upstreams": ["openai"]}],
            "jwt": [{"id": "dev", "key": "j" * 32}],
        },
    }


def _steps(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]


def doc_with(path: str, value: object) -> dict[str, Any]:
    """The valid document with the value at `path` replaced (or deleted)."""
    doc = valid_doc()
    *parents, last = _steps(path)
    node: Any = doc
    for step in parents:
        node = node[step]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


def paths(errors: list[str]) -> list[str]:
    return [error.split(": ", 1)[0] for error in errors]


def assert_accepted(doc: dict[str, Any]) -> None:
    assert validate(doc) == []
    build_config(doc)  # an accepted document must always build


def assert_rejected(doc: object, path: str) -> list[str]:
    errors = validate(doc)
    assert path in paths(errors), errors
    return errors


def test_the_base_document_and_the_reference_config_are_valid() -> None:
    assert_accepted(valid_doc())
    assert validate(yaml.safe_load(REFERENCE.read_text())) == []


def test_a_validated_document_builds_a_config() -> None:
    config = build_config(valid_doc())
    assert [u.name for u in config.upstreams] == ["openai", "anthropic"]


# -- version and the top level ------------------------------------------------


def test_version_1_is_accepted() -> None:
    assert_accepted({"version": 1})


@pytest.mark.parametrize("value", [2, 0, "1", 1.0, True, None, [1]])
def test_version_other_than_the_integer_1_is_rejected(value: object) -> None:
    assert_rejected({"version": value}, "version")


def test_version_is_required() -> None:
    assert_rejected(doc_with("version", DELETE), "version")


def test_an_empty_document_has_no_version() -> None:
    assert paths(validate(None)) == ["version"]


@pytest.mark.parametrize("doc", [[{"version": 1}], "version: 1", 1])
def test_a_top_level_that_is_not_a_mapping_is_rejected(doc: object) -> None:
    assert paths(validate(doc)) == ["(top level)"]


@pytest.mark.parametrize(
    ("path", "key", "hint"),
    [
        ("", "upstream", "upstreams"),
        ("server", "bind_addr", "bind_address"),
        ("upstreams.openai", "target-url", "target_url"),
        ("api_keys", "statics", "static"),
        ("api_keys.static[0]", "keys", "key"),
        ("api_keys.jwt[0]", "kid", "id"),
    ],
)
def test_unknown_keys_are_rejected_at_every_level_with_a_hint(
    path: str, key: str, hint: str
) -> None:
    full = f"{path}.{key}" if path else key
    errors = assert_rejected(doc_with(full, "x"), full)
    assert any(f'did you mean "{hint}"?' in e for e in errors if e.startswith(full + ":"))


def test_a_non_string_key_is_reported_by_its_value() -> None:
    assert_rejected(doc_with("7", "x"), "[7]")


@pytest.mark.parametrize("section", ["server", "upstreams", "api_keys"])
def test_optional_sections_may_be_omitted_or_empty(section: str) -> None:
    assert_accepted({"version": 1, section: None})
    assert_accepted({"version": 1, section: {}})


@pytest.mark.parametrize("section", ["server", "upstreams", "api_keys"])
@pytest.mark.parametrize("value", [[], "text", 5])
def test_a_section_that_is_not_a_mapping_is_rejected(section: str, value: object) -> None:
    assert_rejected({"version": 1, section: value}, section)


# -- server -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "0.0.0.0:8080",
        "127.0.0.1:1",
        "[::]:8080",
        "[::1]:65535",
        "localhost:8080",
        "proxy.example.com:443",
        "proxy.example.com.:443",
    ],
)
def test_bind_address_accepts_ipv4_bracketed_ipv6_and_host_names(value: str) -> None:
    assert_accepted(doc_with("server.bind_address", value))


@pytest.mark.parametrize(
    "value",
    [
        "0.0.0.0",
        "0.0.0.0:0",
        "0.0.0.0:65536",
        ":8080",
        "::1:8080",
        "[::1]",
        "[::1]8080",
        "[not-v6]:8080",
        "999.1.1.1:8080",
        "1.2.3:8080",
        "bad_host:8080",
        "-bad.example:8080",
        "host:80x",
        " 0.0.0.0:8080",
        "0.0.0.0:\uff18\uff10\uff18\uff10",  # full-width digits
        "",
        "   ",
        8080,
        ["0.0.0.0:8080"],
        None,
    ],
)
def test_bind_address_rejects_anything_but_host_and_port(value: object) -> None:
    assert_rejected(doc_with("server.bind_address", value), "server.bind_address")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (":29080", "the host is missing"),
        (":", "the host is missing"),
        ("[]:8080", "the host is missing"),
        ("0.0.0.0", "the port is missing"),
        ("0.0.0.0:", "the port is missing"),
        ("[::1]", "the port is missing"),
        ("[::1", 'must end with "]"'),
        ("[::1]8080", 'expected ":" and a port after "]"'),
        ("host:80x", "must be a number"),
        ("host:0", "from 1 to 65535"),
        ("host:99999999999", "from 1 to 65535"),
    ],
)
def test_bind_address_messages_name_the_actual_fault(value: str, says: str) -> None:
    for path in ("server.bind_address", "server.metrics_address"):
        errors = assert_rejected(doc_with(path, value), path)
        message = next(e for e in errors if e.startswith(f"{path}: "))
        assert says in message, message
        if "host is missing" in says:  # the port is fine: no word about its range
            assert "65535" not in message, message


UPPER_BOUNDS = {
    "server.max_connections": MAX_CONNECTIONS,
    "server.workers": MAX_WORKERS,
    "upstreams.request_timeout_ms": MAX_REQUEST_TIMEOUT_MS,
}


@pytest.mark.parametrize("path", sorted(UPPER_BOUNDS))
@pytest.mark.parametrize("value", [1, 2, "max"])
def test_counts_and_timeouts_accept_integers_from_1_to_their_bound(
    path: str, value: int | str
) -> None:
    assert_accepted(doc_with(path, UPPER_BOUNDS[path] if value == "max" else value))


def test_the_bounds_are_what_the_code_can_use() -> None:
    assert MAX_REQUEST_TIMEOUT_MS == 24 * 3600 * 1000  # documented in the README
    # Every worker owns a slot; a bind change runs the old and the new pool at once.
    assert 2 * MAX_WORKERS <= MAX_SLOTS
    assert 2 * MAX_CONNECTIONS < 1 << 20  # two descriptors each, under fs.nr_open


@pytest.mark.parametrize("path", sorted(UPPER_BOUNDS))
@pytest.mark.parametrize("excess", [1, 10**9, 10**400])
def test_counts_and_timeouts_above_their_bound_are_rejected_with_the_bound(
    path: str, excess: int
) -> None:
    errors = assert_rejected(doc_with(path, UPPER_BOUNDS[path] + excess), path)
    (message,) = errors
    assert f"must be at most {UPPER_BOUNDS[path]}" in message
    assert len(message) < 300  # a 400-digit number is described, not printed


@pytest.mark.parametrize(
    "path", ["server.max_connections", "server.workers", "upstreams.request_timeout_ms"]
)
@pytest.mark.parametrize("value", [0, -1, True, False, "10", 1.5, 10.0, [1], None])
def test_counts_and_timeouts_reject_non_integers_and_values_below_1(
    path: str, value: object
) -> None:
    assert_rejected(doc_with(path, value), path)


def test_workers_and_max_connections_may_be_omitted() -> None:
    assert_accepted(doc_with("server.workers", DELETE))
    assert_accepted(doc_with("server.max_connections", DELETE))


# -- upstreams ----------------------------------------------------------------


@pytest.mark.parametrize("name", [123, True, "  ", ""])
def test_upstream_names_must_be_non_empty_strings(name: object) -> None:
    doc = valid_doc()
    doc["upstreams"][name] = {"request_path": "/x", "target_url": "https://x.example"}
    errors = validate(doc)
    assert len(errors) == 1 and "upstream name" in errors[0], errors


@pytest.mark.parametrize("value", ["https://api.openai.com", None, [], 5])
def test_an_upstream_must_be_a_mapping(value: object) -> None:
    assert_rejected(doc_with("upstreams.local", value), "upstreams.local")


def test_a_misspelt_timeout_setting_gets_a_hint() -> None:
    errors = assert_rejected(
        doc_with("upstreams.request_timeout", 5000), "upstreams.request_timeout"
    )
    assert 'did you mean "request_timeout_ms"?' in errors[0]


@pytest.mark.parametrize("field", ["target_url", "request_path"])
def test_target_url_and_request_path_are_required(field: str) -> None:
    assert_rejected(doc_with(f"upstreams.openai.{field}", DELETE), f"upstreams.openai.{field}")


@pytest.mark.parametrize(
    "value",
    [
        "http://localhost:8000",
        "https://api.openai.com/v1",
        "https://h.example/base/",
        "HTTPS://API.EXAMPLE.COM",
        "https://[::1]:8443/base",
        "http://10.0.0.7:11434",
        "http://vllm_service:8000",
        "https://bücher.example",
    ],
)
def test_target_url_accepts_absolute_http_urls_with_a_base_path(value: str) -> None:
    assert_accepted(doc_with("upstreams.openai.target_url", value))


@pytest.mark.parametrize(
    "value",
    [
        "api.openai.com",
        "/v1",
        "ftp://files.example.com",
        "https://",
        "https:///v1",
        "https://h.example/v1?x=1",
        "https://h.example/?",
        "https://h.example/#frag",
        "https://user:pw@h.example",
        "https://h.example:99999",
        "https://h.example:0",
        "https://h.example:+80",
        "https://h.example:port",
        "https://[::zz]/",
        "https://a..b/",
        "https://h.example/a b",
        "https://h.example/caf\u00e9",
        "",
        "   ",
        5,
        ["https://h.example"],
    ],
)
def test_target_url_rejects_anything_else(value: object) -> None:
    assert_rejected(doc_with("upstreams.openai.target_url", value), "upstreams.openai.target_url")


@pytest.mark.parametrize("value", ["sk-abc", "sk-ant-api03-xyz_ABC-123", "k\u00e9y", DELETE])
def test_api_key_is_a_non_empty_string_or_omitted(value: object) -> None:
    assert_accepted(doc_with("upstreams.openai.api_key", value))


@pytest.mark.parametrize(
    "value", ["", "   ", None, 5, ["sk-abc"], "sk\nabc", "sk\x00abc", " sk-abc", "sk-\u20ac"]
)
def test_api_key_rejects_empty_non_strings_and_header_unsafe_characters(value: object) -> None:
    assert_rejected(doc_with("upstreams.openai.api_key", value), "upstreams.openai.api_key")


@pytest.mark.parametrize("value", ["authorization", "x-api-key", "Api-Key", "X-Goog-Api-Key"])
def test_auth_header_accepts_header_names(value: str) -> None:
    assert_accepted(doc_with("upstreams.openai.auth_header", value))


@pytest.mark.parametrize(
    "value",
    [
        *sorted(HOP_BY_HOP_HEADERS),
        "Connection",
        "host",
        "Content-Length",
        "x api key",
        "x-api-key:",
        "",
        5,
        None,
    ],
)
def test_auth_header_rejects_invalid_names_hop_by_hop_headers_and_host(value: object) -> None:
    assert_rejected(doc_with("upstreams.openai.auth_header", value), "upstreams.openai.auth_header")


@pytest.mark.parametrize(
    "value", ["/", "/openai", "/openai/", "/api/v1:2", "/a:b", "/v1/models:generate", "/%C3%A9"]
)
def test_request_path_accepts_absolute_paths(value: str) -> None:
    assert_accepted(doc_with("upstreams.openai.request_path", value))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "openai",
        "/api:8080",
        "/api:8080/v1",
        "/:8080",
        "http://h.example/a",
        "/a://b",
        "/a?b",
        "/a#b",
        "/a b",
        "/caf\u00e9",
        5,
        ["/a"],
        None,
    ],
)
def test_request_path_rejects_relative_urls_queries_fragments_and_host_port(
    value: object,
) -> None:
    path = "upstreams.openai.request_path"
    assert_rejected(doc_with(path, value), path)


@pytest.mark.parametrize("second", ["/openai", "/openai/", "/openai//"])
def test_request_paths_must_be_unique_ignoring_a_trailing_slash(second: str) -> None:
    errors = assert_rejected(
        doc_with("upstreams.anthropic.request_path", second), "upstreams.anthropic.request_path"
    )
    assert '"openai"' in errors[0]


@pytest.mark.parametrize("second", ["/openai2", "/openai/v2", "/"])
def test_distinct_request_paths_are_accepted(second: str) -> None:
    assert_accepted(doc_with("upstreams.anthropic.request_path", second))


# -- static keys --------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], [{"key": "only-a-key"}]])
def test_static_keys_may_be_empty_and_need_only_a_key(value: object) -> None:
    assert_accepted(doc_with("api_keys.static", value))


@pytest.mark.parametrize("value", [{"key": "k"}, "client-key-1", 5])
def test_static_keys_must_be_a_list(value: object) -> None:
    assert_rejected(doc_with("api_keys.static", value), "api_keys.static")


@pytest.mark.parametrize("value", ["client-key-1", None, 5, ["k"]])
def test_each_static_key_entry_must_be_a_mapping(value: object) -> None:
    assert_rejected(doc_with("api_keys.static[0]", value), "api_keys.static[0]")


def test_a_static_key_needs_its_key() -> None:
    assert_rejected(doc_with("api_keys.static[0].key", DELETE), "api_keys.static[0].key")


@pytest.mark.parametrize(
    "value", ["", "  ", None, 5, ["k"], "a\nb", "a\tb", " padded", "k\u00e9y", "k\x7fy"]
)
def test_a_static_key_must_be_a_non_empty_header_safe_ascii_string(value: object) -> None:
    assert_rejected(doc_with("api_keys.static[0].key", value), "api_keys.static[0].key")


def test_a_static_key_longer_than_the_proxy_reads_is_rejected_without_echoing_it() -> None:
    longest = "k" * MAX_TOKEN_BYTES
    assert_accepted(doc_with("api_keys.static[0].key", longest))
    errors = assert_rejected(
        doc_with("api_keys.static[0].key", longest + "k"), "api_keys.static[0].key"
    )
    assert f"at most {MAX_TOKEN_BYTES} bytes" in errors[0] and "kkkk" not in errors[0]


def test_static_keys_must_be_unique() -> None:
    doc = valid_doc()
    doc["api_keys"]["static"].append({"key": "client-key-1"})
    assert paths(validate(doc)) == ["api_keys.static[1].key"]


def test_distinct_static_keys_are_accepted() -> None:
    doc = valid_doc()
    doc["api_keys"]["static"].append({"key": "client-key-2", "id": "other"})
    assert_accepted(doc)


@pytest.mark.parametrize("value", ["", "   ", 5, None, ["pr"]])
def test_a_static_key_id_when_given_must_be_a_non_empty_string(value: object) -> None:
    assert_rejected(doc_with("api_keys.static[0].id", value), "api_keys.static[0].id")


def test_static_key_ids_must_be_unique() -> None:
    doc = valid_doc()
    doc["api_keys"]["static"].append({"key": "client-key-2", "id": "pr"})
    assert paths(validate(doc)) == ["api_keys.static[1].id"]


@pytest.mark.parametrize("value", [DELETE, None, [], ["openai", "anthropic"], ["openai", "openai"]])
def test_a_static_key_may_list_existing_upstreams(value: object) -> None:
    assert_accepted(doc_with("api_keys.static[0].upstreams", value))


@pytest.mark.parametrize("value", ["openai", {"openai": True}, 5])
def test_a_static_keys_upstreams_must_be_a_list(value: object) -> None:
    path = "api_keys.static[0].upstreams"
    assert_rejected(doc_with(path, value), path)


@pytest.mark.parametrize("name", ["opena", "request_timeout_ms", "", 5, ["openai"]])
def test_a_static_key_may_not_name_an_unknown_upstream(name: object) -> None:
    path = "api_keys.static[0].upstreams[1]"
    assert_rejected(doc_with("api_keys.static[0].upstreams", ["openai", name]), path)


def test_an_unknown_upstream_gets_a_close_match_hint() -> None:
    errors = validate(doc_with("api_keys.static[0].upstreams", ["opena"]))
    assert errors == [
        'api_keys.static[0].upstreams[0]: unknown upstream "opena"; did you mean "openai"?'
    ]


# -- JWT keys -----------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], [{"id": "a", "key": "k" * 32}]])
def test_jwt_keys_may_be_empty(value: object) -> None:
    assert_accepted(doc_with("api_keys.jwt", value))


@pytest.mark.parametrize("value", [{"id": "a", "key": "k" * 32}, "dev", 5])
def test_jwt_keys_must_be_a_list(value: object) -> None:
    assert_rejected(doc_with("api_keys.jwt", value), "api_keys.jwt")


@pytest.mark.parametrize("value", ["dev", None, 5])
def test_each_jwt_entry_must_be_a_mapping(value: object) -> None:
    assert_rejected(doc_with("api_keys.jwt[0]", value), "api_keys.jwt[0]")


@pytest.mark.parametrize("value", [DELETE, "", "   ", None, 5, ["dev"]])
def test_a_jwt_id_is_required_and_non_empty(value: object) -> None:
    assert_rejected(doc_with("api_keys.jwt[0].id", value), "api_keys.jwt[0].id")


def test_jwt_ids_must_be_unique() -> None:
    doc = valid_doc()
    doc["api_keys"]["jwt"].append({"id": "dev", "key": "other" * 8})
    assert paths(validate(doc)) == ["api_keys.jwt[1].id"]


def test_the_same_jwt_key_may_appear_under_several_ids() -> None:
    doc = valid_doc()
    doc["api_keys"]["jwt"].append({"id": "dev2", "key": "j" * 32})
    assert_accepted(doc)


@pytest.mark.parametrize("value", ["k" * 32, "k" * 100, "\u00e9" * 16, " " * 31 + "k"])
def test_a_jwt_key_of_32_bytes_or_more_is_accepted(value: str) -> None:
    assert_accepted(doc_with("api_keys.jwt[0].key", value))


@pytest.mark.parametrize("value", [DELETE, "k" * 31, "\u00e9" * 15 + "k", " " * 40, "", None, 5])
def test_a_jwt_key_shorter_than_32_utf8_bytes_or_blank_is_rejected(value: object) -> None:
    assert_rejected(doc_with("api_keys.jwt[0].key", value), "api_keys.jwt[0].key")


# -- whole-document behaviour -------------------------------------------------


def test_every_problem_in_a_document_is_listed() -> None:
    doc = valid_doc()
    doc["version"] = 2
    doc["upstream"] = {}
    doc["server"]["workers"] = 0
    doc["upstreams"]["openai"]["request_path"] = "/api:8080"
    doc["upstreams"]["anthropic"]["auth_header"] = "te"
    doc["api_keys"]["static"].append({"key": "client-key-1"})
    doc["api_keys"]["jwt"][0]["key"] = "short"
    assert sorted(paths(validate(doc))) == sorted(
        [
            "version",
            "upstream",
            "server.workers",
            "upstreams.openai.request_path",
            "upstreams.anthropic.auth_header",
            "api_keys.static[1].key",
            "api_keys.jwt[0].key",
        ]
    )


SECRETS = ["sk-secret-provider-1", "sk-secret-provider-2", "client-secret-abc", "jwt-short-secret"]


def test_no_error_message_contains_a_secret_value() -> None:
    doc = valid_doc()
    doc["upstreams"]["openai"]["api_key"] = SECRETS[0] + "\n"
    doc["upstreams"]["anthropic"]["api_key"] = [SECRETS[1]]
    doc["api_keys"]["static"] = [
        {"key": SECRETS[2]},
        {"key": SECRETS[2]},
        {"key": " " + SECRETS[2] + "\u00e9"},
        {"key": 98765432123},
        SECRETS[2],
    ]
    doc["api_keys"]["jwt"] = [{"id": "a", "key": SECRETS[3]}, {"id": "b", "key": 42424242}]
    errors = validate(doc)
    assert len(errors) >= 8, errors
    for secret in [*SECRETS, "98765432123", "42424242"]:
        assert not [e for e in errors if secret in e]


def test_no_yaml_error_message_quotes_the_offending_line() -> None:
    data = b'version: 1\nupstreams:\n  a:\n    api_key: "sk-secret-in-line" oops\n'
    with pytest.raises(ConfigInvalid) as caught:
        parse_config_bytes(data)
    assert caught.value.errors and "sk-secret" not in "\n".join(caught.value.errors)


def test_long_values_are_truncated_in_messages() -> None:
    errors = validate(doc_with("upstreams.openai.request_path", "x" * 500))
    assert len(errors[0]) < 200


# -- property tests: the loader never fails in any other way -------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
KNOWN_KEYS = "version server upstreams api_keys static jwt id key bind_address workers"
KNOWN_KEYS += " request_path target_url api_key auth_header request_timeout_ms openai x"
keys = st.sampled_from(KNOWN_KEYS.split()) | st.text(max_size=10)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)


def _loads_or_rejects(data: bytes) -> None:
    try:
        loaded = parse_config_bytes(data)
    except ConfigInvalid as exc:
        assert exc.errors, "ConfigInvalid must list at least one problem"
        assert not [e for e in exc.errors if e.startswith("(internal)")], exc.errors
    else:
        assert isinstance(loaded, LoadedConfig)


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(documents)
def test_arbitrary_documents_give_a_config_or_config_invalid(doc: object) -> None:
    assert isinstance(validate(doc), list)
    _loads_or_rejects(yaml.safe_dump(doc).encode())


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """Replace, delete or add one value somewhere in the document."""
    node = doc
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    if isinstance(node, dict):
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "add" or not node:
            node[data.draw(keys)] = data.draw(documents)
        else:
            key = data.draw(st.sampled_from(sorted(node, key=repr)))
            if action == "delete":
                del node[key]
            else:
                node[key] = data.draw(documents)
    elif isinstance(node, list):
        node.append(data.draw(documents))
    return doc


REFERENCE_DOC = yaml.safe_load(REFERENCE.read_text())


@PROPERTY
@given(st.data())
def test_mutations_of_the_reference_config_give_a_config_or_config_invalid(
    data: st.DataObject,
) -> None:
    doc = copy.deepcopy(REFERENCE_DOC)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        doc = _mutate(doc, data)
    assert isinstance(validate(doc), list)
    _loads_or_rejects(yaml.safe_dump(doc, allow_unicode=True).encode())


REFERENCE_BYTES = REFERENCE.read_bytes()


@PROPERTY
@given(
    st.lists(
        st.tuples(st.integers(0, len(REFERENCE_BYTES)), st.integers(0, 8), st.binary(max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_byte_edits_of_the_reference_file_give_a_config_or_config_invalid(
    edits: list[tuple[int, int, bytes]],
) -> None:
    data = REFERENCE_BYTES
    for at, cut, insert in edits:
        data = data[:at] + insert + data[at + cut :]
    _loads_or_rejects(data)


@PROPERTY
@given(st.binary(max_size=2000) | st.text(max_size=500).map(lambda t: t.encode("utf-8", "replace")))
def test_arbitrary_bytes_give_a_config_or_config_invalid(data: bytes) -> None:
    _loads_or_rejects(data)
