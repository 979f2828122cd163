"""The `fluxgate-supervisor` command line (SPEC §2), run as the installed console script."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "config" / "fluxgate.yaml"
INVALID = sorted((ROOT / "tests" / "fixtures" / "configs" / "invalid").glob("*.yaml"))
SCRIPT = Path(sys.executable).parent / "fluxgate-supervisor"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing: run `pip install -e .` first")
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


def test_help_works_in_an_empty_directory_without_a_config(tmp_path: Path) -> None:
    for flag in ("--help", "-h"):
        result = run(flag, cwd=tmp_path)
        assert result.returncode == 0
        assert result.stdout.startswith("usage: fluxgate-supervisor")
        for command in ("start", "check", "reload", "token"):
            assert command in result.stdout


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("start", ["--config", "--workers", "--pid-file"]),
        ("check", ["--config"]),
        ("reload", ["--pid-file"]),
        ("token", ["--kid", "--ttl", "--config"]),
    ],
)
def test_each_command_has_help(tmp_path: Path, command: str, options: list[str]) -> None:
    result = run(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: fluxgate-supervisor {command}")
    for option in options:
        assert option in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        [],
        ["check", "--bogus"],
        ["--bogus"],
        ["start", "--workers", "0"],
        ["start", "--workers", "many"],
        ["token"],
        ["token", "--kid", "dev", "--ttl", "-1"],
        ["reload"],
    ],
)
def test_unknown_commands_and_bad_options_exit_2_with_usage(
    tmp_path: Path, args: list[str]
) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: fluxgate-supervisor" in result.stderr


# -- check --------------------------------------------------------------------


def test_check_accepts_the_reference_config() -> None:
    result = run("check", "--config", str(REFERENCE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"OK: {REFERENCE} is valid (2 upstreams, 2 static keys, 1 JWT keys)"
    )


def test_check_reads_fluxgate_yaml_in_the_current_directory_by_default(tmp_path: Path) -> None:
    (tmp_path / "fluxgate.yaml").write_bytes(REFERENCE.read_bytes())
    result = run("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "./fluxgate.yaml is valid" in result.stdout


@pytest.mark.parametrize("fixture", INVALID, ids=[p.stem for p in INVALID])
def test_check_lists_every_problem_of_a_broken_file(fixture: Path) -> None:
    expected = fixture.with_suffix(".errors").read_text().split("\n")
    result = run("check", "--config", str(fixture))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    prefix = f"{fixture}: "
    assert all(line.startswith(prefix) for line in lines), lines
    reported = [line.removeprefix(prefix).split(": ", 1)[0] for line in lines]
    assert sorted(reported) == sorted(p for p in expected if p), result.stderr


def test_check_never_prints_a_secret() -> None:
    fixture = ROOT / "tests" / "fixtures" / "configs" / "invalid" / "duplicate_yaml_keys.yaml"
    result = run("check", "--config", str(fixture))
    assert "REPLACE-ME" not in result.stderr + result.stdout


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_check_reports_a_missing_file_or_a_directory(tmp_path: Path, name: str) -> None:
    result = run("check", "--config", str(tmp_path / name))
    assert result.returncode == 1
    assert str(tmp_path / name) in result.stderr
    assert "no such file" in result.stderr or "is a directory" in result.stderr


# -- token --------------------------------------------------------------------


def _jwt_secret(kid: str) -> str:
    doc = yaml.safe_load(REFERENCE.read_text())
    return next(str(e["key"]) for e in doc["api_keys"]["jwt"] if e["id"] == kid)


def test_token_prints_an_hs256_jwt_signed_with_the_named_key() -> None:
    result = run("token", "--kid", "dev", "--config", str(REFERENCE))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": "dev", "typ": "JWT"}
    claims = jwt.decode(token, _jwt_secret("dev"), algorithms=["HS256"])
    assert claims["sub"] == "fluxgate-cli"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60


def test_token_ttl_sets_the_expiry_and_zero_means_none() -> None:
    short = run("token", "--kid", "dev", "--ttl", "60", "--config", str(REFERENCE))
    claims = jwt.decode(short.stdout.strip(), _jwt_secret("dev"), algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 60
    forever = run("token", "--kid", "dev", "--ttl", "0", "--config", str(REFERENCE))
    claims = jwt.decode(forever.stdout.strip(), _jwt_secret("dev"), algorithms=["HS256"])
    assert "exp" not in claims


def test_token_with_an_unknown_kid_exits_1_naming_the_ids_but_no_secret() -> None:
    result = run("token", "--kid", "nobody", "--config", str(REFERENCE))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "nobody" in result.stderr and "dev" in result.stderr
    assert _jwt_secret("dev") not in result.stderr


def test_token_refuses_an_invalid_config() -> None:
    fixture = ROOT / "tests" / "fixtures" / "configs" / "invalid" / "short_jwt_key.yaml"
    result = run("token", "--kid", "ci", "--config", str(fixture))
    assert result.returncode == 1
    assert "api_keys.jwt[0].key" in result.stderr


# -- reload -------------------------------------------------------------------

HUP_CHILD = """
import signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
signal.signal(signal.SIGHUP, lambda *_: marker.write_text("hup"))
marker.with_suffix(".ready").write_text("ready")
time.sleep(30)
"""


def test_reload_sends_sighup_to_the_process_in_the_pid_file(tmp_path: Path) -> None:
    marker = tmp_path / "got-hup"
    # "fluxgate" in the command line: reload checks it is not signalling a stranger.
    child = subprocess.Popen([sys.executable, "-c", HUP_CHILD, str(marker), "fluxgate-test"])
    try:
        deadline = time.monotonic() + 10
        while not marker.with_suffix(".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pid_file = tmp_path / "fluxgate.pid"
        pid_file.write_text(f"{child.pid}\n")
        result = run("reload", "--pid-file", str(pid_file))
        assert result.returncode == 0, result.stderr
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.read_text() == "hup"
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_reload_refuses_a_process_that_is_not_fluxgate(tmp_path: Path) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid_file = tmp_path / "fluxgate.pid"
        pid_file.write_text(str(stranger.pid))
        result = run("reload", "--pid-file", str(pid_file))
        assert result.returncode == 1
        assert "stale pid file" in result.stderr
        time.sleep(0.1)
        assert stranger.poll() is None
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()


def test_reload_reports_a_missing_pid_file(tmp_path: Path) -> None:
    result = run("reload", "--pid-file", str(tmp_path / "none.pid"))
    assert result.returncode == 1
    assert "no such pid file" in result.stderr


def test_reload_reports_a_pid_that_no_longer_runs(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_file = tmp_path / "fluxgate.pid"
    pid_file.write_text(str(gone.pid))
    result = run("reload", "--pid-file", str(pid_file))
    assert result.returncode == 1
    assert f"no process with pid {gone.pid}" in result.stderr


@pytest.mark.parametrize("content", ["", "abc", "0", "-1", "-4242", "12 34"])
def test_reload_refuses_a_pid_file_without_a_single_process_id(
    tmp_path: Path, content: str
) -> None:
    pid_file = tmp_path / "fluxgate.pid"
    pid_file.write_text(content)
    result = run("reload", "--pid-file", str(pid_file))
    assert result.returncode == 1
    assert "does not contain a process id" in result.stderr
