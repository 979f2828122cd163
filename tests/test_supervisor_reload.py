"""Live config reload in place (README "Changes while running"): real processes and files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.fake_upstream import FakeUpstreamThread
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor, default_port_lock

NEW_KEY = "fg-rotated-client-key-9c1e"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
NEW_AUTH = {"Authorization": f"Bearer {NEW_KEY}"}


def rotated(upstream_url: str) -> dict[str, Any]:
    """The standard config with CLIENT_KEY replaced by NEW_KEY."""
    config = proxy_config(upstream_url)
    config["api_keys"]["static"][0]["key"] = NEW_KEY
    return config


@pytest.fixture
def two_workers(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> Supervisor:
    sup = make_supervisor(proxy_config(upstream.url), workers=2)
    sup.wait_for_generation(1)
    return sup


def test_new_key_works_and_old_key_refused_in_every_worker_within_100ms(
    two_workers: Supervisor, upstream: FakeUpstreamThread
) -> None:
    sup = two_workers
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    written = time.monotonic()
    sup.write_config(rotated(upstream.url))
    sup.wait_for_generation(2, timeout=2)
    elapsed = time.monotonic() - written
    assert elapsed < 0.1, f"every worker on the new generation after {elapsed * 1000:.0f} ms"
    # Fresh connections spread over both workers: every one must agree.
    for _ in range(20):
        assert sup.request("GET", "/openai/v1/models", NEW_AUTH)[0] == 200
        assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 401


def test_applied_reload_is_logged_with_path_and_generation(
    proxy: Supervisor, upstream: Any
) -> None:
    mark = proxy.mark()
    proxy.write_config(rotated(upstream.url))
    line = proxy.wait_for_log(r"config applied", start=mark)
    assert f"path={proxy.config_path}" in line and "generation=2" in line


def test_unchanged_content_is_not_a_reload(proxy: Supervisor, upstream: Any) -> None:
    mark = proxy.mark()
    proxy.write_config(proxy.config_path.read_text())  # same bytes, new inode
    os.utime(proxy.config_path)
    proxy.signal(signal.SIGHUP)  # a HUP always reports, so it marks when the watcher is done
    proxy.wait_for_log(r"config unchanged", start=mark)
    assert not [line for line in proxy.lines[mark:] if "config applied" in line]
    assert proxy.health()["generation"] == 1


def test_invalid_file_keeps_old_config_and_logs_every_problem(proxy: Supervisor) -> None:
    mark = proxy.mark()
    proxy.write_config(
        "version: 2\nupstream: {}\napi_keys:\n  jwt:\n    - id: x\n      key: short\n"
    )
    line = proxy.wait_for_log(r"config rejected", start=mark)
    text = "\n".join(proxy.lines[proxy.lines.index(line) :])
    for path in ("version", "upstream", "api_keys.jwt[0].key"):
        assert path in text
    assert "short" not in text  # a secret value is never echoed
    assert proxy.health()["generation"] == 1
    assert proxy.request("GET", "/openai/v1/models", AUTH)[0] == 200


def test_deleted_file_keeps_serving_with_one_warning_and_restoring_resumes(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    mark = proxy.mark()
    proxy.config_path.unlink()
    proxy.wait_for_log(r"config file unavailable", start=mark)
    assert proxy.request("GET", "/openai/v1/models", AUTH)[0] == 200
    # Polls and further HUPs of the watcher kind must not repeat it: wait past
    # a safety-net poll (1 s) and check there is still exactly one warning.
    time.sleep(1.5)
    warnings = [line for line in proxy.lines[mark:] if "config file unavailable" in line]
    assert len(warnings) == 1
    proxy.write_config(rotated(upstream.url))
    proxy.wait_for_log(r"config applied", start=mark)
    proxy.wait_for_generation(2)
    assert proxy.request("GET", "/openai/v1/models", NEW_AUTH)[0] == 200


@pytest.mark.parametrize("style", ["vim", "atomic_rename", "symlink_swap"])
def test_editor_and_deployment_styles_trigger_a_reload(
    style: str, upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), start=False)
    directory = sup.config_path.parent
    text = yaml.safe_dump(sup.with_bind(rotated(upstream.url)))
    if style == "symlink_swap":
        # The Kubernetes ConfigMap layout: file -> ..data/file, ..data -> ..<stamp>
        first = directory / "..2026_01"
        first.mkdir()
        shutil.move(sup.config_path, first / "fluxgate.yaml")
        (directory / "..data").symlink_to(first.name)
        sup.config_path.symlink_to("..data/fluxgate.yaml")
    sup.start()
    mark = sup.mark()
    if style == "vim":
        backup = directory / "fluxgate.yaml~"
        os.rename(sup.config_path, backup)
        sup.config_path.write_text(text)
        backup.unlink()
    elif style == "atomic_rename":
        tmp = directory / ".fluxgate.yaml.new"
        tmp.write_text(text)
        os.replace(tmp, sup.config_path)
    else:
        second = directory / "..2026_02"
        second.mkdir()
        (second / "fluxgate.yaml").write_text(text)
        (directory / "..data_tmp").symlink_to(second.name)
        os.replace(directory / "..data_tmp", directory / "..data")
    sup.wait_for_log(r"config applied", start=mark, timeout=2)
    sup.wait_for_generation(2)
    assert sup.request("GET", "/openai/v1/models", NEW_AUTH)[0] == 200


def test_sighup_rereads_the_file(proxy: Supervisor, upstream: FakeUpstreamThread) -> None:
    mark = proxy.mark()
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"config unchanged.*generation=1", start=mark)
    proxy.write_config(rotated(upstream.url))
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"config applied.*generation=2", start=mark)
    proxy.wait_for_generation(2)
    assert proxy.health()["generation"] == 2


def test_reload_command_signals_the_supervisor_named_in_the_pid_file(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    pid_file = tmp_path / "fluxgate.pid"
    sup = make_supervisor(proxy_config(upstream.url), args=["--pid-file", str(pid_file)])
    assert sup.proc is not None and int(pid_file.read_text()) == sup.proc.pid
    mark = sup.mark()
    cli = Path(sys.executable).parent / "fluxgate-supervisor"
    subprocess.run([str(cli), "reload", "--pid-file", str(pid_file)], check=True, timeout=10)
    sup.wait_for_log(r"config unchanged", start=mark)


def test_stream_in_flight_during_ten_reloads_completes_intact(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    result: dict[str, Any] = {}

    def stream() -> None:
        result["response"] = proxy.request(
            "GET", "/openai/sse?events=20&interval_ms=50", AUTH, timeout=20
        )

    reader = threading.Thread(target=stream)
    reader.start()
    upstream.wait_for_requests(1, timeout=5)
    for generation in range(2, 12):
        config = proxy_config(upstream.url)
        config["api_keys"]["static"].append({"id": f"g{generation}", "key": f"k-{generation}-x"})
        mark = proxy.mark()
        proxy.write_config(config)
        proxy.wait_for_log(rf"config applied.*generation={generation}", start=mark)
    reader.join(20)
    status, _, body = result["response"]
    assert status == 200
    assert body.count(b"data: event") == 20
    proxy.wait_for_generation(11)


def test_missing_file_at_start_serves_defaults_that_reject_everything(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    """With no file the defaults apply: bind 0.0.0.0:8080, no keys, 401 for every request."""
    sup = make_supervisor(proxy_config(upstream.url), start=False)
    sup.config_path.unlink()
    sup.port = 8080
    with default_port_lock():
        sup.start()
        _missing_file_serves_defaults(sup, upstream)
        sup.stop()


def _missing_file_serves_defaults(sup: Supervisor, upstream: FakeUpstreamThread) -> None:
    line = next(x for x in sup.lines if "config file not loaded" in x)
    assert line.startswith("WARN") and f"path={sup.config_path}" in line and "error=missing" in line
    assert not [x for x in sup.lines if "config loaded" in x]
    assert len([x for x in sup.lines if x.startswith("WARN")]) == 1
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 401
    # Still missing at the next safety-net poll is not news.
    mark = sup.mark()
    sup.signal(signal.SIGWINCH)  # no-op signal; just let a poll pass
    time.sleep(1.2)
    assert not [x for x in sup.lines[mark:] if x.startswith("WARN")]
    # Health tells a load balancer that this host serves nothing yet, until a valid file.
    status, _, body = sup.request("GET", "/_fluxgate/health")
    assert (status, json.loads(body)["status"], json.loads(body)["reason"]) == (
        503, "unavailable", "no_config"
    )  # fmt: skip
    config = proxy_config(upstream.url)
    config["server"] = {"bind_address": "0.0.0.0:8080"}
    sup.write_config(config)
    sup.wait_for_generation(2)
    status, _, body = sup.request("GET", "/_fluxgate/health")
    assert (status, json.loads(body)["status"]) == (200, "ok")


def test_bind_failure_at_start_exits_non_zero_naming_address_and_reason(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    first = make_supervisor(proxy_config(upstream.url))
    second = make_supervisor(proxy_config(upstream.url), start=False, port=first.port)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(15) != 0
    line = second.wait_for_log(r"cannot bind")
    assert f"127.0.0.1:{first.port}" in line and "in use" in line
    assert first.request("GET", "/openai/v1/models", AUTH)[0] == 200
