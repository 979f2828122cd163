"""Reading the configuration file (README "Configuration"): encodings, line ends, size, YAML traps.

Every failure is either a `ConfigFileError` with a `.reason` (the file could
not be used) or a `ConfigInvalid` listing the problems (the content was wrong).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest

from fluxgate import configfile
from fluxgate.configfile import (
    MAX_CONFIG_BYTES,
    ConfigFileError,
    ConfigInvalid,
    LoadedConfig,
    load_config_file,
    parse_config_bytes,
    read_config_bytes,
)

REFERENCE = Path(__file__).resolve().parent.parent / "config" / "fluxgate.yaml"

MINIMAL = (
    "version: 1\n"
    "upstreams:\n"
    "  openai:\n"
    '    request_path: "/openai"\n'
    '    target_url: "https://api.openai.com"\n'
    '    api_key: "sk-test"\n'
    "api_keys:\n"
    "  static:\n"
    '    - key: "client-key"\n'
)


def write(tmp_path: Path, data: bytes | str, name: str = "fluxgate.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def errors_of(data: bytes | str) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        parse_config_bytes(data.encode() if isinstance(data, str) else data)
    return caught.value.errors


def test_the_reference_config_loads(tmp_path: Path) -> None:
    loaded = load_config_file(REFERENCE)
    assert isinstance(loaded, LoadedConfig)
    assert {u.name for u in loaded.config.upstreams} == {"openai", "anthropic"}


def test_the_digest_is_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    loaded = load_config_file(path)
    assert loaded.digest == hashlib.sha256(MINIMAL.encode()).hexdigest()
    assert loaded.doc["upstreams"]["openai"]["request_path"] == "/openai"


def test_the_generation_is_passed_to_the_config(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, MINIMAL), generation=7).config.generation == 7


def test_a_utf8_bom_is_accepted() -> None:
    loaded = parse_config_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert loaded.config.upstreams[0].name == "openai"


def test_crlf_line_ends_are_accepted() -> None:
    loaded = parse_config_bytes(MINIMAL.replace("\n", "\r\n").encode())
    assert loaded.config.upstreams[0].request_path == "/openai"


def test_trailing_spaces_are_accepted() -> None:
    loaded = parse_config_bytes(MINIMAL.replace("\n", "   \n").encode())
    assert loaded.config.upstreams[0].target_url == "https://api.openai.com"


@pytest.mark.parametrize("data", ["", "\n\n", "# only a comment\n#version: 1\n", "---\n"])
def test_an_empty_or_comments_only_file_is_invalid_for_lack_of_version(data: str) -> None:
    assert [e.split(":")[0] for e in errors_of(data)] == ["version"]


def test_a_file_just_over_10_mib_is_rejected_as_too_large(tmp_path: Path) -> None:
    path = write(tmp_path, b"version: 1\n" + b"#" * (MAX_CONFIG_BYTES - 10))
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(path)
    assert caught.value.reason == "too_large"
    assert str(path) in str(caught.value) and "10 MiB" in str(caught.value)


def test_a_file_of_exactly_the_cap_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES)
    assert len(read_config_bytes(path)) == MAX_CONFIG_BYTES


def test_a_huge_file_is_rejected_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(64 * 1024 * 1024 * 1024)  # sparse: costs no disk
    started = time.monotonic()
    with pytest.raises(ConfigFileError) as caught:
        read_config_bytes(path)
    assert caught.value.reason == "too_large"
    assert time.monotonic() - started < 1


def test_five_thousand_static_keys_load_quickly() -> None:
    lines = ["version: 1", "api_keys:", "  static:"]
    for i in range(5000):
        lines += [f"    - id: client-{i}", f'      key: "key-{i:06d}-abcdefghijkl"']
    started = time.monotonic()
    loaded = parse_config_bytes("\n".join(lines).encode())
    assert len(loaded.config.static_keys) == 5000
    assert time.monotonic() - started < 5


def test_duplicate_keys_are_reported_with_their_path_and_lines() -> None:
    data = MINIMAL + "upstreams:\n  other: {}\n"
    assert errors_of(data)[0] == (
        "upstreams: duplicate key (line 10; first on line 2); only one of them would be used"
    )


def test_duplicate_keys_inside_a_list_item_are_reported() -> None:
    data = "version: 1\napi_keys:\n  static:\n    - key: a-key\n      key: b-key\n"
    assert errors_of(data)[0].startswith("api_keys.static[0].key: duplicate key (line 5;")


def test_every_duplicate_key_is_reported_together_with_validation_problems() -> None:
    data = "version: 2\nversion: 3\nserver:\n  workers: 1\n  workers: 2\n"
    assert [e.split(":")[0] for e in errors_of(data)] == ["version", "server.workers", "version"]


def test_a_merge_key_overridden_by_an_explicit_key_is_not_a_duplicate() -> None:
    data = (
        "version: 1\n"
        "upstreams:\n"
        "  openai: &base\n"
        '    request_path: "/openai"\n'
        '    target_url: "https://api.openai.com"\n'
        "  azure:\n"
        "    <<: *base\n"
        '    request_path: "/azure"\n'
    )
    loaded = parse_config_bytes(data.encode())
    assert {u.request_path for u in loaded.config.upstreams} == {"/openai", "/azure"}


def test_a_yaml_syntax_error_is_one_error_with_line_and_column() -> None:
    errors = errors_of("version: 1\nserver:\n  workers: [1,\n")
    assert len(errors) == 1 and errors[0].startswith("line 4, column 1: invalid YAML: ")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("version: 1\nwhen: 2024-13-45\n", "invalid timestamp value"),
        ("version: 1\nx: !!python/object:os.system ls\n", "could not determine a constructor"),
        ("version: 1\nx: *nowhere\n", "found undefined alias"),
        ("--- {version: 1}\n--- {version: 1}\n", "expected a single document"),
        ("version: 1\nx: a\x00b\n", "is not allowed"),
        ("version: 1\n? [a, b]\n: c\n", "unhashable"),
    ],
)
def test_yaml_that_safe_load_would_choke_on_is_reported(data: str, problem: str) -> None:
    errors = errors_of(data)
    assert len(errors) == 1 and problem in errors[0], errors


def test_an_alias_bomb_is_rejected_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    started = time.monotonic()
    assert errors_of("\n".join(lines)) == ["(yaml): aliases expand the document too much"]
    assert time.monotonic() - started < 5


def test_a_self_referencing_alias_is_rejected() -> None:
    assert errors_of("version: 1\nx: &x [*x]\n") == [
        "(yaml): an alias refers to a node that contains it"
    ]


# A located YAML problem: "line L, column C: invalid YAML: …" or "(yaml): …". The text
# after that is the parser's own (libyaml and PyYAML word limits differently).
LOCATED_YAML_ERROR = re.compile(r"^(line \d+, column \d+|\(yaml\)): ")


def test_deep_nesting_is_rejected_without_crashing() -> None:
    errors = errors_of("[" * 200_000)
    assert len(errors) == 1 and LOCATED_YAML_ERROR.match(errors[0]), errors


def test_deep_nesting_in_the_pure_python_parser_is_our_own_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without libyaml (or below its own limit) the recursion limit is what stops it."""
    monkeypatch.setattr(configfile, "_Loader", configfile._PureLoader)
    assert errors_of("[" * 200_000) == ["(yaml): the document is nested too deeply"]


@pytest.mark.parametrize("loader", ["_PureLoader", "_Loader"])
def test_a_tab_used_as_indentation_is_named(loader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configfile, "_Loader", getattr(configfile, loader))
    errors = errors_of("version: 1\nserver:\n\tworkers: 2\n")
    assert len(errors) == 1 and errors[0].startswith("line 3, column 1: "), errors
    assert "tab" in errors[0]


def test_not_utf8_bytes_are_a_file_error_when_loading(tmp_path: Path) -> None:
    path = write(tmp_path, b"version: 1\nx: \xff\xfe\xfa\n")
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(path)
    assert caught.value.reason == "not_utf8"
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)


def test_not_utf8_bytes_are_invalid_content_when_parsing() -> None:
    assert errors_of(b"version: 1\nx: \xc3\x28\n")[0].startswith("(file): is not valid UTF-8")


def test_a_utf16_file_is_named_as_such(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\n".encode("utf-16"))
    with pytest.raises(ConfigFileError, match="UTF-16") as caught:
        load_config_file(path)
    assert caught.value.reason == "not_utf8"


def test_a_missing_file_is_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(tmp_path / "nope.yaml")
    assert caught.value.reason == "missing"
    assert str(tmp_path / "nope.yaml") in str(caught.value)


def test_a_path_through_a_file_is_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(write(tmp_path, MINIMAL) / "child.yaml")
    assert caught.value.reason == "missing"


def test_a_directory_is_reported_as_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(tmp_path)
    assert caught.value.reason == "is_directory"
    assert "directory" in str(caught.value)


def test_a_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fluxgate.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(fifo)
    assert caught.value.reason == "unreadable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_reported_as_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    path.chmod(0)
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(path)
    assert caught.value.reason == "permission_denied"


def test_a_dangling_symlink_is_reported_as_missing(tmp_path: Path) -> None:
    link = tmp_path / "fluxgate.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(link)
    assert caught.value.reason == "missing"
