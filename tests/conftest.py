"""Shared fixtures: the fake upstream, a supervisor factory, and the suite-wide secret scan."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis

from demo.fake_upstream import FakeUpstreamThread
from tests.supervisor_process import ALL_LOG_LINES, Supervisor, free_port

# Every secret the suite uses. None may appear in any log line or error body.
CLIENT_KEY = "fg-client-key-4d1c7e0b9a"
LIMITED_KEY = "fg-limited-key-73b2a915"
OPENAI_KEY = "sk-openai-provider-secret-0042"
ANTHROPIC_KEY = "sk-ant-provider-secret-0042"
JWT_SECRET = "jwt-signing-secret-of-at-least-32-bytes!"
# A provider key pool's keys (tests/test_failover.py).
POOL_KEYS = ("sk-pool-limited-7c1d", "sk-pool-refused-9e2a", "sk-pool-good-4b8f")
# A `set_headers` value (tests/test_set_headers.py): a secret like api_key.
SET_HEADER_SECRET = "org-set-header-secret-0042"
SECRETS = [CLIENT_KEY, LIMITED_KEY, OPENAI_KEY, ANTHROPIC_KEY, JWT_SECRET, SET_HEADER_SECRET,
           *POOL_KEYS]  # fmt: skip
MINTED_TOKENS: list[str] = []  # every JWT a test made, scanned like the secrets

# The container image test builds an image (minutes, needs podman): only
# `make image-test` runs it, by naming the directory.
collect_ignore = ["image"]


def proxy_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """The suite's standard config: two providers on the fake upstream, three credentials."""
    config: dict[str, Any] = {
        "version": 1,
        "upstreams": {
            "request_timeout_ms": 5000,
            "openai": {
                "request_path": "/openai",
                "target_url": upstream_url,
                "api_key": OPENAI_KEY,
            },
            "anthropic": {
                "request_path": "/anthropic",
                "target_url": upstream_url,
                "api_key": ANTHROPIC_KEY,
                "auth_header": "x-api-key",
            },
        },
        "api_keys": {
            "static": [
                {"id": "ci", "key": CLIENT_KEY},
                {"id": "limited", "key": LIMITED_KEY, "upstreams": ["anthropic"]},
            ],
            "jwt": [{"id": "dev", "key": JWT_SECRET}],
        },
    }
    config.update(overrides)
    return config


def make_jwt(kid: str = "dev", secret: str = JWT_SECRET, **claims: Any) -> str:
    payload = {"sub": "test", "exp": int(time.time()) + 300, **claims}
    token = jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})
    MINTED_TOKENS.append(token)
    return token


@pytest.fixture
def upstream() -> Iterator[FakeUpstreamThread]:
    with FakeUpstreamThread() as up:
        yield up


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstreamThread]:
    """One fake upstream shared by a module's tests (they clear its record as needed)."""
    with FakeUpstreamThread() as server:
        yield server


@pytest.fixture
def make_supervisor(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def factory(config: dict[str, Any] | str, start: bool = True, **kwargs: Any) -> Supervisor:
        directory = tmp_path / f"sup{len(started)}"
        directory.mkdir()
        sup = Supervisor(directory, config, **kwargs)
        started.append(sup)
        return sup.start() if start else sup

    yield factory
    for sup in started:
        sup.stop()


@pytest.fixture(scope="module")
def module_supervisor(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Supervisor]]:
    """Start supervisors shared by all of a module's tests, stopped when the module ends.

    A module states only its config, in a fixture of its own:

        @pytest.fixture(scope="module")
        def sup(up, module_supervisor):
            return module_supervisor(proxy_config(up.url), workers=2)

    Keyword arguments go to `Supervisor` (workers, env, port, args).
    """
    started: list[Supervisor] = []

    def factory(config: dict[str, Any] | str, **kwargs: Any) -> Supervisor:
        sup = Supervisor(tmp_path_factory.mktemp("module-sup"), config, **kwargs)
        started.append(sup)
        return sup.start()

    yield factory
    for sup in started:
        sup.stop()


@pytest.fixture
def fresh(up: FakeUpstreamThread) -> None:
    """Clear the module's fake upstream's record before a test, so that what it received
    is this test's alone. A module opts in for all its tests with
    `pytestmark = pytest.mark.usefixtures("fresh")`."""
    up.clear()


@pytest.fixture
def proxy(upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]) -> Supervisor:
    """One supervisor with one worker, on the standard config."""
    return make_supervisor(proxy_config(upstream.url))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """After the whole run (per xdist process): no secret in any supervisor log line."""
    yield
    secrets = SECRETS + MINTED_TOKENS
    leaks = [(s, line) for line in ALL_LOG_LINES for s in secrets if s in line]
    assert not leaks, f"secrets found in log lines: {leaks[:5]}"


class RedisServer:
    """A real `redis-server` on a free loopback port, its own directory, nothing saved, and a
    password (so the tests can check it never shows). `stop` and `start` again keep the port."""

    password = "redis-secret-pass-8c41f0"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.process is None
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        args += ["--requirepass", self.password, "--logfile", str(self.directory / "redis.log")]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, (self.directory / "redis.log").read_text()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return self
            assert time.monotonic() < deadline, "redis-server did not answer PING within 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


SECRETS.append(RedisServer.password)  # a redis_url's password is never logged either


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server per test process (each xdist worker has its own), stopped at the end.
    Skips where Debian's `redis-server` package is not installed (.ci/run installs it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def empty_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, emptied before each test."""
    if redis_server.process is None:  # a test that stopped it failed before starting it again
        redis_server.start()
    redis_admin(redis_server).flushall()
    yield redis_server


def redis_admin(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)
