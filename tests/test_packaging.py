"""pyproject.toml's gunicorn range: the lower bound is the first release with
everything the master uses (checked here against the installed gunicorn)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import gunicorn
from gunicorn import sock
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
FIRST_WITH_EVERYTHING = (25, 1)  # control_socket_disable appeared in gunicorn 25.1.0


def _gunicorn_requirement() -> str:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (requirement,) = [d for d in deps if re.match(r"gunicorn\b", d)]
    return str(requirement)


def test_the_gunicorn_lower_bound_is_the_first_release_with_what_the_master_uses() -> None:
    requirement = _gunicorn_requirement()
    lower = re.search(r">=\s*([0-9.]+)", requirement)
    assert lower is not None, requirement
    assert tuple(int(p) for p in lower.group(1).split(".")) >= FIRST_WITH_EVERYTHING
    assert "<28" in requirement  # the upper bound stays


def test_the_installed_gunicorn_has_what_the_master_uses() -> None:
    installed = tuple(int(p) for p in gunicorn.__version__.split(".")[:2])
    assert installed >= FIRST_WITH_EVERYTHING
    assert "control_socket_disable" in Config().settings
    assert callable(getattr(Arbiter, "wait_for_signals", None))
    assert callable(getattr(sock, "_sock_type", None))
