"""pyproject.toml's gunicorn range: the lower bound is the first release with
everything the master uses (checked here against the installed gunicorn)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import gunicorn
from gunicorn import sock
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PROJECT = "fluxgate-gateway"
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


def test_the_distribution_name_is_our_own_and_the_license_file_matches() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == PROJECT  # `fluxgate` on PyPI is another project
    assert project["license"] == {"text": "MIT"}
    assert (PYPROJECT.parent / "LICENSE").read_text().startswith("MIT License")


def test_version_prints_the_installed_distributions_version() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "fluxgate-supervisor"), "--version"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["fluxgate-supervisor", importlib.metadata.version(PROJECT)]
