"""`make demo` works end to end: the fake provider, Fluxgate, and the openai SDK through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from fluxgate.configfile import load_config_file

ROOT = Path(__file__).resolve().parent.parent


def test_demo_prints_a_completion_and_a_stream_that_came_through_the_proxy() -> None:
    env = {**os.environ, "FLUXGATE_LOG": "TRACE", "FLUXGATE_LOG_STYLE": "never"}
    out = subprocess.run(
        [sys.executable, "-m", "demo.run", "--free-ports"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "completion: Echo: Say hello through Fluxgate" in out.stdout
    assert "stream:     Echo: Say hello through Fluxgate" in out.stdout
    # Both went through Fluxgate: its request log has them, under the demo key's id.
    assert out.stderr.count("api_key=demo upstream=openai") == 2


def test_demo_config_is_valid() -> None:
    loaded = load_config_file(ROOT / "demo" / "fluxgate.yaml")
    assert [u.name for u in loaded.config.upstreams] == ["openai"]
    assert yaml.safe_load((ROOT / "demo" / "fluxgate.yaml").read_text())["version"] == 1
