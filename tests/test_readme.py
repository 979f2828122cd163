"""The README against reality: its client snippet works with the reference config,
and the files and commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fluxgate.auth import authenticate
from fluxgate.configfile import load_config_file
from fluxgate.routing import match

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPET = re.compile(r'base_url="http://fluxgate:8080(?P<prefix>/[^"]*)", api_key="(?P<key>[^"]+)"')


@pytest.mark.parametrize(
    ("prefix", "key"), [(m["prefix"], m["key"]) for m in SNIPPET.finditer(README)]
)
def test_the_readme_client_snippet_authenticates_and_routes_with_the_reference_config(
    prefix: str, key: str
) -> None:
    config = load_config_file(ROOT / "config" / "fluxgate.yaml").config
    principal = authenticate(config, [(b"authorization", b"Bearer " + key.encode())])
    assert match(principal.routes, prefix.encode() + b"/chat") is not None


def test_the_readme_has_both_client_snippets() -> None:
    assert len(list(SNIPPET.finditer(README))) == 2


@pytest.mark.parametrize(
    "path", sorted(set(re.findall(r"`((?:config|docs|systemd|bench)/[\w./-]+\.\w+)`", README)))
)
def test_every_file_the_readme_names_exists(path: str) -> None:
    assert (ROOT / path).exists()
