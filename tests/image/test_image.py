"""The container image works as README's "Container" section says (`make image-test`).

Builds the Dockerfile with podman and runs the image as an operator would:
the config directory mounted read-only, the supervisor as PID 1. Against the
fake provider on the host's loopback (the container shares the host's
network), it checks a completion and a stream with the openai SDK, a config
edit applied live through the mount, a SIGHUP reload, the health check, the
non-root user, and a clean exit 0 on SIGTERM.

Not part of `make test`: tests/conftest.py leaves this directory out, since a
build takes minutes and needs podman. The tests share one container and run
in file order; the last one stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from demo.fake_upstream import FakeUpstreamThread
from tests.image import podman as pm
from tests.supervisor_process import free_port

# Building from a cold cache (base image, apt in two stages) takes minutes;
# pyproject's per-test default is meant for the process tests.
pytestmark = pytest.mark.timeout(1800)

KEY_BEFORE = "fg-image-key-before-5e1a"
KEY_AFTER = "fg-image-key-after-93c7"
PROVIDER_KEY = "sk-image-provider-key-77"
PROMPT = "say hello through the container"
REPLY = "Echo: " + PROMPT  # what the fake provider answers
MESSAGES: Any = [{"role": "user", "content": PROMPT}]
HEALTH_URL_IN_IMAGE = "http://127.0.0.1:8080/_fluxgate/health"


def config_text(upstream_url: str, port: int, client_key: str) -> str:
    return yaml.safe_dump(
        {
            "version": 1,
            "server": {"bind_address": f"127.0.0.1:{port}", "workers": 2},
            "upstreams": {
                # Bounds the graceful drain at SIGTERM (timeout + 5 s).
                "request_timeout_ms": 5000,
                "openai": {
                    "request_path": "/openai",
                    "target_url": upstream_url,
                    "api_key": PROVIDER_KEY,
                },
            },
            "api_keys": {"static": [{"id": "image", "key": client_key}]},
        }
    )


def replace_file(path: Path, text: str) -> None:
    """Write a temporary file and rename it over `path`, as editors and ConfigMaps do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)  # the container's user (uid 10001) must read it
    os.replace(tmp, path)


class Container:
    def __init__(self, name: str, port: int, config_dir: Path) -> None:
        self.name = name
        self.port = port
        self.config_dir = config_dir
        self.config_path = config_dir / "fluxgate.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> tuple[str, str]:
        result = pm.podman("logs", self.name, timeout=30, check=False)
        return result.stdout, result.stderr

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Until `text` appears in the container's stderr (where Fluxgate logs)."""
        deadline = time.monotonic() + timeout
        while True:
            stderr = self.logs()[1]
            if text in stderr:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the container's stderr:\n{stderr[-4000:]}")
            time.sleep(0.2)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_fluxgate/health", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def state(self) -> str:
        return pm.podman("inspect", self.name, "--format", "{{.State.Status}}").stdout.strip()

    def exec(self, *args: str) -> str:
        return pm.podman("exec", self.name, *args, timeout=30).stdout

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/openai/v1", api_key=key, max_retries=0, timeout=10
        )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstreamThread]:
    with FakeUpstreamThread() as up:
        yield up


@pytest.fixture(scope="module")
def image() -> dict[str, object]:
    # Skipped here rather than for the module: tests that were skipped count,
    # while a module skip leaves pytest with no tests and exit status 5.
    reason = pm.unavailable_reason()
    if reason is not None:
        pytest.skip(f"container image test skipped: {reason}")

    def log(message: str) -> None:
        print(f"[image-test] {message}", flush=True)

    started = time.monotonic()
    pm.ensure_base_image(log)
    pm.build_image(log)
    log(f"base image and build took {time.monotonic() - started:.1f} s")
    return pm.image_config()


@pytest.fixture(scope="module")
def container(
    image: dict[str, object],
    upstream: FakeUpstreamThread,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    config_dir = tmp_path_factory.mktemp("image-config")
    # Mounted into the container, where uid 10001 must list and read it.
    config_dir.chmod(0o755)
    port = free_port()
    box = Container(f"fluxgate-image-test-{os.getpid()}", port, config_dir)
    replace_file(box.config_path, config_text(upstream.url, port, KEY_BEFORE))

    # The image's own health check command, pointed at this test's port: the
    # container shares the host's network, where 8080 may be taken.
    healthcheck = image["Healthcheck"]
    assert isinstance(healthcheck, dict) and healthcheck["Test"][0] == "CMD", healthcheck
    # --health-cmd takes the bare argv (a JSON array) and adds "CMD" itself.
    health_cmd = [arg.replace(HEALTH_URL_IN_IMAGE, box.url + "/_fluxgate/health")
                  for arg in healthcheck["Test"][1:]]  # fmt: skip
    assert health_cmd != healthcheck["Test"][1:], healthcheck

    pm.podman("rm", "--force", "--ignore", box.name, timeout=60)
    try:
        pm.podman(
            "run", "--detach", "--name", box.name,
            "--network", "host",
            # The sandbox here refuses higher limits than these.
            "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
            "--volume", f"{config_dir}:/etc/fluxgate:ro",
            # Read-only root file system: only /tmp (the runtime directory) is written.
            "--read-only", "--tmpfs", "/tmp",
            "--health-cmd", json.dumps(health_cmd),
            # Run on demand below: a timer needs systemd, which is absent here.
            "--health-interval", "disable",
            pm.IMAGE,
            timeout=60,
        )  # fmt: skip

        def serving() -> bool:
            if box.state() != "running":
                raise AssertionError(f"container {box.state()}:\n{box.logs()[1][-4000:]}")
            try:
                box.health()
            except OSError:
                return False
            return True

        wait_until(serving, 30, "the container answers its health endpoint")
        yield box
    finally:
        stderr = box.logs()[1]
        print(f"\n--- container stderr ---\n{stderr[-6000:]}")
        pm.podman("rm", "--force", "--time", "0", "--ignore", box.name, timeout=60, check=False)


def test_image_metadata(image: dict[str, object]) -> None:
    assert image["User"] == "10001:10001"
    assert "8080/tcp" in image["ExposedPorts"]  # type: ignore[operator]
    assert image["Entrypoint"] == ["/opt/fluxgate/bin/fluxgate-supervisor"]
    assert image["Cmd"] == ["start", "--config", "/etc/fluxgate/fluxgate.yaml"]
    healthcheck = image["Healthcheck"]
    assert isinstance(healthcheck, dict) and HEALTH_URL_IN_IMAGE in " ".join(healthcheck["Test"])


def test_supervisor_is_pid_1_and_not_root(container: Container) -> None:
    title = container.exec("cat", "/proc/1/cmdline").replace("\0", " ")
    assert title.startswith("fluxgate: supervisor [config=/etc/fluxgate/fluxgate.yaml]"), title
    status = container.exec("cat", "/proc/1/status")
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {"10001"}, status
    # Logs go to stderr, nothing to stdout.
    stdout, stderr = container.logs()
    assert "serving" in stderr and stdout == ""


def test_completion_and_stream(container: Container) -> None:
    client = container.client(KEY_BEFORE)
    completion = client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY

    stream = client.chat.completions.create(model="fake-gpt", messages=MESSAGES, stream=True)
    text = "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )  # fmt: skip
    assert text == REPLY


def test_health_check(container: Container) -> None:
    result = pm.podman("healthcheck", "run", container.name, timeout=30, check=False)
    assert result.returncode == 0, (result.stdout, result.stderr)


def test_edited_config_file_applies_live(
    container: Container, upstream: FakeUpstreamThread
) -> None:
    generation = container.health()["generation"]
    replace_file(container.config_path, config_text(upstream.url, container.port, KEY_AFTER))

    def new_key_works() -> bool:
        try:
            container.client(KEY_AFTER).models.list()
        except openai.AuthenticationError:
            return False
        return True

    wait_until(new_key_works, 10, "the edited config's new key is accepted")
    assert container.health()["generation"] > generation
    with pytest.raises(openai.AuthenticationError):
        container.client(KEY_BEFORE).models.list()
    completion = container.client(KEY_AFTER).chat.completions.create(
        model="fake-gpt", messages=MESSAGES
    )
    assert completion.choices[0].message.content == REPLY


def test_sighup_reloads(container: Container) -> None:
    generation = container.health()["generation"]
    pm.podman("kill", "--signal", "HUP", container.name, timeout=30)
    # Same content: the master re-reads it and says so, keeping the generation.
    container.wait_for_log("config unchanged")
    assert container.state() == "running"
    assert container.health()["generation"] == generation


def test_sigterm_exits_zero(container: Container) -> None:
    """Last: it stops the shared container."""
    pm.podman("kill", "--signal", "TERM", container.name, timeout=30)
    try:
        waited = pm.podman("wait", container.name, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 30 s after SIGTERM:\n{container.logs()[1]}") from None
    assert waited.stdout.strip() == "0", container.logs()[1][-4000:]
    container.wait_for_log("shutting down", timeout=1)
