"""The `fluxgate-supervisor` command line (README "Command line"), run as the installed
console script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
import yaml

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.validation import MAX_WORKERS
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor, signals_taken, wait_until

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
REFERENCE = ROOT / "config" / "fluxgate.yaml"
INVALID = sorted((ROOT / "tests" / "fixtures" / "configs" / "invalid").glob("*.yaml"))
SCRIPT = Path(sys.executable).parent / "fluxgate-supervisor"


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing: run `pip install -e .` first")
    return subprocess.run(
        [str(SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=None if env is None else {**os.environ, **env},
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
        ["start", "--workers", str(MAX_WORKERS + 1)],
        ["start", "--workers", "9" * 500],
        ["token", "--kid", "dev", "--ttl", "9" * 500],
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


def test_reload_help_shows_the_pid_file_as_required(tmp_path: Path) -> None:
    result = run("reload", "--help", cwd=tmp_path)
    usage = result.stdout.split("\n\n", 1)[0]
    assert "--pid-file PATH" in usage and "[--pid-file" not in usage, usage


def test_reload_sends_sighup_to_the_supervisor_in_the_pid_file(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    pid_file = tmp_path / "fluxgate.pid"
    sup = make_supervisor(proxy_config(upstream.url), args=["--pid-file", str(pid_file)])
    assert sup.proc is not None and int(pid_file.read_text()) == sup.proc.pid
    mark = sup.mark()
    result = run("reload", "--pid-file", str(pid_file))
    assert result.returncode == 0, result.stderr
    sup.wait_for_log(r"config unchanged", start=mark)  # SIGHUP always re-reads the file


def test_reload_refuses_a_worker_of_the_supervisor(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = make_supervisor(proxy_config(upstream.url))
    (worker,) = sup.worker_pids()
    pid_file = tmp_path / "fluxgate.pid"
    pid_file.write_text(str(worker))
    mark = sup.mark()
    result = run("reload", "--pid-file", str(pid_file))
    assert result.returncode == 1
    assert f"is a worker of the supervisor {sup.proc.pid if sup.proc else 0}" in result.stderr
    assert sup.worker_pids() == [worker]
    assert not [line for line in sup.lines[mark:] if "config" in line]


def test_reload_refuses_a_process_that_merely_mentions_fluxgate(tmp_path: Path) -> None:
    log = tmp_path / "fluxgate.log"
    log.write_text("")
    # What `tail -f fluxgate.log` looks like to a check that only greps for "fluxgate".
    tail = subprocess.Popen(["tail", "-f", str(log)])
    try:
        pid_file = tmp_path / "fluxgate.pid"
        pid_file.write_text(str(tail.pid))
        result = run("reload", "--pid-file", str(pid_file))
        assert result.returncode == 1
        assert "is not a fluxgate supervisor" in result.stderr
        # The command has exited, so a SIGHUP it sent is already queued: once tail has
        # none pending, one would have ended it.
        assert wait_until(lambda: signals_taken(tail.pid), timeout=5)
        assert tail.poll() is None
    finally:
        tail.kill()
        tail.wait()


def test_reload_refuses_a_process_that_is_not_fluxgate(tmp_path: Path) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid_file = tmp_path / "fluxgate.pid"
        pid_file.write_text(str(stranger.pid))
        result = run("reload", "--pid-file", str(pid_file))
        assert result.returncode == 1
        assert "is not a fluxgate supervisor" in result.stderr
        assert wait_until(lambda: signals_taken(stranger.pid), timeout=5)
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
    assert f"process {gone.pid} from {pid_file} is not running" in result.stderr


@pytest.mark.parametrize(
    "content",
    # Past what a pid can be: int() of 5000 digits raises, os.kill() of 11 digits overflows.
    ["", "abc", "0", "-1", "-4242", "12 34", "99999999999", "9" * 5000],
)
def test_reload_refuses_a_pid_file_without_a_single_process_id(
    tmp_path: Path, content: str
) -> None:
    pid_file = tmp_path / "fluxgate.pid"
    pid_file.write_text(content)
    result = run("reload", "--pid-file", str(pid_file))
    assert result.returncode == 1
    assert "does not contain a process id" in result.stderr


# -- check warnings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "says"), [("upstreams", "no upstreams"), ("api_keys", "no api_keys")]
)
def test_check_warns_about_a_valid_file_that_can_serve_nothing(
    tmp_path: Path, drop: str, says: str
) -> None:
    doc = yaml.safe_load(REFERENCE.read_text())
    del doc[drop]
    for entry in doc.get("api_keys", {}).get("static", []):
        entry.pop("upstreams", None)  # names of the upstreams just dropped
    path = tmp_path / "fluxgate.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run("check", "--config", str(path))
    assert result.returncode == 0
    assert result.stdout.startswith(f"OK: {path} is valid")
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("warning: ") and says in warning


def test_check_does_not_warn_about_the_reference_config() -> None:
    assert run("check", "--config", str(REFERENCE)).stderr == ""


# -- logging environment ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("FLUXGATE_LOG", "bogus", "TRACE, DEBUG, INFO, WARN, WARNING, ERROR"),
        ("FLUXGATE_LOG_FORMAT", "yaml", "text, json"),
        ("FLUXGATE_LOG_STYLE", "sometimes", "auto, always, never"),
    ],
)
def test_start_refuses_an_unknown_logging_setting_in_one_line(
    tmp_path: Path, name: str, value: str, allowed: str
) -> None:
    (tmp_path / "fluxgate.yaml").write_bytes(REFERENCE.read_bytes())
    result = run("start", cwd=tmp_path, env={name: value})
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert f"{name}='{value}'" in line and allowed in line


def _serves(sup: Supervisor) -> bool:
    try:
        return sup.request("GET", "/openai/v1/models", AUTH, timeout=1)[0] == 200
    except OSError:
        return False


def test_start_accepts_both_spellings_of_warn_in_any_case(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    for level in ("warn", "Warning"):
        sup = make_supervisor(
            proxy_config(upstream.url),
            start=False,
            env={"FLUXGATE_LOG": level, "FLUXGATE_LOG_FORMAT": "JSON"},
        )
        sup.start(wait=False)  # at WARN the INFO "serving" line is not written
        assert wait_until(lambda s=sup: _serves(s), timeout=15, interval=0.05), sup.lines
        assert sup.stop() == 0, sup.lines
