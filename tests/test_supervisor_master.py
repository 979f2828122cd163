"""The master's failure paths (docs/security.md): bounded numbers, exit status, runtime
directory hygiene, one line per log event, the process title from the start.

Every test runs the real `fluxgate-supervisor start`; RUNTIME_DIRECTORY points
the master's private directory into the test's own tmp_path, so a leftover is
visible (and cannot be confused with another test's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from demo.fake_upstream import FakeUpstreamThread
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import SERVING, Supervisor, default_port_lock, wait_until

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
# A text record starts with its level and a timestamp; whatever the level's name.
TEXT_RECORD = re.compile(r"^[A-Z]+\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def runtime_dirs(base: Path) -> list[Path]:
    return sorted(base.glob("fluxgate-*"))


def runtime_env(base: Path, **extra: str) -> dict[str, str]:
    base.mkdir(exist_ok=True)
    return {"RUNTIME_DIRECTORY": str(base), **extra}


def exit_status(sup: Supervisor, timeout: float = 20) -> int:
    assert sup.proc is not None
    return sup.proc.wait(timeout)


def assert_one_record_per_line(lines: list[str], json_format: bool = False) -> None:
    for line in lines:
        if json_format:
            assert isinstance(json.loads(line), dict) and "level" in json.loads(line), line
        else:
            assert TEXT_RECORD.match(line), f"not a record of its own: {line!r}"


# -- numeric bounds -------------------------------------------------------------


def test_a_huge_timeout_at_start_serves_the_safe_defaults_and_at_reload_is_rejected(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    base = tmp_path / "run"
    huge = proxy_config(upstream.url)
    huge["upstreams"]["request_timeout_ms"] = 10**400
    sup = make_supervisor(huge, start=False, env=runtime_env(base))
    sup.config_path.write_text(yaml.safe_dump(huge))  # no bind_address: the defaults' one
    with default_port_lock():
        sup.start()  # the safe defaults serve (on 0.0.0.0:8080): no exit, no traceback
        warning = next(line for line in sup.lines if "safe defaults" in line)
        assert "upstreams.request_timeout_ms: must be at most 86400000" in warning
        sup.write_config(proxy_config(upstream.url))  # moves the listener to sup.port
        sup.wait_for_generation(2)
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    mark = sup.mark()
    sup.write_config(huge)
    line = sup.wait_for_log("config rejected", start=mark)
    assert "upstreams.request_timeout_ms: must be at most" in line
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    assert sup.stop() == 0
    assert_one_record_per_line(sup.lines)
    assert runtime_dirs(base) == []


def test_more_workers_than_the_connection_table_holds_is_rejected_not_an_exit_0(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), workers=None)
    config = proxy_config(upstream.url)
    config["server"] = {"workers": 100_000}
    sup.write_config(config)
    line = sup.wait_for_log("config rejected")
    assert "server.workers: must be at most" in line
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    assert sup.stop() == 0


# -- exit status ------------------------------------------------------------------

STOP_ITERATION_HOOK = """
def pre_fork(server, worker):
    raise StopIteration  # gunicorn's main loop reads this as "shut down"
"""

FAILING_HOOK = """
def pre_fork(server, worker):
    raise RuntimeError("hook failed\\nsecond line of the message")
"""


@pytest.mark.parametrize("hook", [STOP_ITERATION_HOOK, FAILING_HOOK], ids=["stop", "error"])
def test_an_unexpected_error_in_the_master_exits_non_zero_in_one_line(
    upstream: FakeUpstreamThread,
    make_supervisor: Callable[..., Supervisor],
    tmp_path: Path,
    hook: str,
) -> None:
    base = tmp_path / "run"
    sup = make_supervisor(proxy_config(upstream.url), start=False, env=runtime_env(base))
    # gunicorn.conf.py is read from the working directory: an operator's hook that fails.
    (sup.config_path.parent / "gunicorn.conf.py").write_text(hook)
    sup.start(wait=False)
    assert exit_status(sup) != 0
    assert_one_record_per_line(sup.lines)
    errors = [line for line in sup.lines if line.startswith("ERROR")]
    assert errors and any("pre_fork" in line for line in errors), sup.lines
    assert runtime_dirs(base) == []


def test_a_broken_gunicorn_conf_is_one_error_record_and_exit_1(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    base = tmp_path / "run"
    sup = make_supervisor(proxy_config(upstream.url), start=False, env=runtime_env(base))
    (sup.config_path.parent / "gunicorn.conf.py").write_text("timeout = (\n")
    sup.start(wait=False)
    assert exit_status(sup) == 1
    assert_one_record_per_line(sup.lines)
    assert any(line.startswith("ERROR") and "gunicorn.conf.py" in line for line in sup.lines)
    assert runtime_dirs(base) == []


def test_a_second_supervisor_on_the_same_pid_file_says_so_in_one_line(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    pid_file = tmp_path / "fluxgate.pid"
    first = make_supervisor(proxy_config(upstream.url), args=["--pid-file", str(pid_file)])
    base = tmp_path / "run"
    second = make_supervisor(
        proxy_config(upstream.url),
        start=False,
        args=["--pid-file", str(pid_file)],
        env=runtime_env(base),
    )
    second.start(wait=False)
    assert exit_status(second) == 1
    assert_one_record_per_line(second.lines)
    assert any("another supervisor is running" in line for line in second.lines), second.lines
    assert first.proc is not None and first.proc.poll() is None
    assert int(pid_file.read_text()) == first.proc.pid  # not removed by the second one
    assert runtime_dirs(base) == []
    assert first.request("GET", "/openai/v1/models", AUTH)[0] == 200


# -- runtime directory --------------------------------------------------------------


def test_a_removed_runtime_directory_is_recreated_at_the_next_change(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    base = tmp_path / "run"
    sup = make_supervisor(proxy_config(upstream.url), env=runtime_env(base))
    (directory,) = runtime_dirs(base)
    # Moved away at once, then deleted: the workers may add a metrics file to it
    # while a plain rmtree walks it.
    moved = directory.with_name("removed-by-the-test")
    directory.rename(moved)
    shutil.rmtree(moved, ignore_errors=True)
    config = proxy_config(upstream.url)
    config["api_keys"]["static"].append({"id": "new", "key": "fg-new-key-after-rmtree"})
    mark = sup.mark()
    sup.write_config(config)
    sup.wait_for_generation(2)
    assert any("runtime directory was removed" in line for line in sup.lines[mark:])
    new_key = {"Authorization": "Bearer fg-new-key-after-rmtree"}
    assert sup.request("GET", "/openai/v1/models", new_key)[0] == 200
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sup.stop() == 0
    assert runtime_dirs(base) == []


def test_a_failed_start_leaves_no_runtime_directory(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    base = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sup = make_supervisor(
            proxy_config(upstream.url),
            start=False,
            port=taken.getsockname()[1],
            env=runtime_env(base),
        )
        sup.start(wait=False)
        assert exit_status(sup) == 1
    assert runtime_dirs(base) == []


def _fake_runtime_dir(base: Path, name: str, pid: int | None) -> Path:
    directory = base / name
    directory.mkdir(mode=0o700)
    if pid is not None:
        (directory / "pid").write_text(f"{pid}\n")
    (directory / "config.json").write_text("{}")
    return directory


def test_the_next_start_removes_only_the_runtime_directories_of_dead_masters(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    base = tmp_path / "run"
    base.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = _fake_runtime_dir(base, "fluxgate-dead0001", gone.pid)
    alive = _fake_runtime_dir(base, "fluxgate-live0001", os.getpid())
    unmarked = _fake_runtime_dir(base, "fluxgate-nopid001", None)
    other_name = _fake_runtime_dir(base, "fluxgate-demo-run", gone.pid)
    elsewhere = _fake_runtime_dir(tmp_path, "target", gone.pid)
    (base / "fluxgate-link0001").symlink_to(elsewhere)
    foreign = None
    if os.getuid() == 0:  # another user's directory, whatever its pid says
        foreign = _fake_runtime_dir(base, "fluxgate-othr0001", gone.pid)
        os.chown(foreign, 65534, 65534)

    sup = make_supervisor(proxy_config(upstream.url), env=runtime_env(base))
    assert not dead.exists()
    assert any(f"path={dead}" in line and "gone" in line for line in sup.lines)
    for kept in (alive, unmarked, other_name, elsewhere / "pid", base / "fluxgate-link0001"):
        assert kept.exists(), kept
    if foreign is not None:
        assert foreign.exists()


def test_a_sigkilled_masters_directory_is_removed_by_the_next_start(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    base = tmp_path / "run"
    first = make_supervisor(proxy_config(upstream.url), env=runtime_env(base))
    (left_behind,) = runtime_dirs(base)
    workers = first.worker_pids()
    first.signal(signal.SIGKILL)
    assert exit_status(first) == -signal.SIGKILL
    # Orphaned workers notice their master is gone and exit on their own.
    assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 15)
    assert left_behind.exists()
    second = make_supervisor(proxy_config(upstream.url), env=runtime_env(base))
    assert not left_behind.exists()
    assert len(runtime_dirs(base)) == 1
    assert second.stop() == 0
    assert runtime_dirs(base) == []


# -- one event, one line ------------------------------------------------------------

BROKEN = """version: 1
server:
  bind_address: ":29080"
  workers: 0
upstreams:
  request_timeout_ms: 1{zeros}
  openai:
    request_path: "openai"
    target_url: "https://api.openai.com"
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_rejected_config_is_one_record_with_every_problem(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], log_format: str
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), env={"FLUXGATE_LOG_FORMAT": log_format})
    mark = sup.mark()
    sup.write_config(BROKEN.format(zeros="0" * 400))
    line = sup.wait_for_log("config rejected", start=mark)
    for problem in (
        "server.bind_address: the host is missing",
        "server.workers: must be at least 1",
        "upstreams.request_timeout_ms: must be at most",
        "upstreams.openai.request_path",
    ):
        assert problem in line, line
    assert sup.stop() == 0
    assert_one_record_per_line(sup.lines, json_format=log_format == "json")


# -- process title --------------------------------------------------------------------


def test_the_master_never_shows_gunicorns_title(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), start=False)
    sup.start(wait=False)
    assert sup.proc is not None
    cmdline = Path(f"/proc/{sup.proc.pid}/cmdline")
    titles: set[str] = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(re.search(SERVING, x) for x in sup.lines):
        try:
            titles.add(cmdline.read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            break
    assert any(re.search(SERVING, x) for x in sup.lines), sup.lines
    assert titles and not [t for t in titles if "gunicorn" in t], titles
    assert f"fluxgate: supervisor [config={sup.config_path}]" in titles
