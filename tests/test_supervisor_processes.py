"""The process side of the supervisor (README "Command line" and "Operations"): pool,
listeners, signals, systemd."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demo.fake_upstream import FakeUpstreamThread
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor, free_port, signals_taken, wait_until

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def stream_in_background(sup: Supervisor, path: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["response"] = sup.request("GET", path, AUTH, timeout=30)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_workers_count_comes_from_the_flag_and_titles_name_config_and_generation(
    proxy: Supervisor,
) -> None:
    assert proxy.proc is not None
    assert title(proxy.proc.pid) == f"fluxgate: supervisor [config={proxy.config_path}]"
    (worker,) = proxy.worker_pids()
    assert title(worker) == "fluxgate: worker 1 [gen 1]"


def test_workers_flag_wins_over_the_yaml_for_the_process_lifetime(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    config = proxy_config(upstream.url)
    config["server"] = {"workers": 1}
    sup = make_supervisor(config, workers=2)
    sup.wait_for_generation(1)
    config["server"] = {"workers": 3}
    sup.write_config(config)
    sup.wait_for_generation(2)
    assert len(sup.worker_pids()) == 2


def test_yaml_worker_count_change_grows_and_shrinks_the_pool_gracefully(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    config = proxy_config(upstream.url)
    config["server"] = {"workers": 2}
    sup = make_supervisor(config, workers=None)
    sup.workers = 2
    sup.wait_for_generation(1)
    config["server"] = {"workers": 3}
    sup.write_config(config)
    sup.workers = 3
    sup.wait_for_generation(2)
    # Shrinking retires workers gracefully: a stream in flight completes.
    streamer, result = stream_in_background(sup, "/openai/sse?events=6&interval_ms=150")
    upstream.wait_for_requests(1)
    config["server"] = {"workers": 1}
    sup.write_config(config)
    sup.workers = 1
    sup.wait_for_generation(3, timeout=10)
    streamer.join(20)
    status, _, body = result["response"]
    assert status == 200 and body.count(b"data: event") == 6


def test_sigkilled_worker_is_replaced_on_the_current_generation_and_others_keep_serving(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), workers=2)
    sup.wait_for_generation(1)
    config = proxy_config(upstream.url)
    config["api_keys"]["static"].append({"id": "extra", "key": "extra-key-123"})
    sup.write_config(config)
    sup.wait_for_generation(2)
    # A stream held open on some worker must survive its neighbour's death.
    streamer, result = stream_in_background(sup, "/openai/sse?events=10&interval_ms=100")
    upstream.wait_for_requests(1)
    victim, survivor = sup.worker_pids()
    failures = 0
    os.kill(victim, signal.SIGKILL)
    for _ in range(30):
        status, _, _ = sup.request("GET", "/openai/v1/models", AUTH)
        failures += status != 200
    sup.wait_for_generation(2)
    pids = sup.worker_pids()
    assert victim not in pids and survivor in pids and len(pids) == 2
    streamer.join(30)
    if "response" in result:  # the stream was on the survivor
        assert result["response"][0] == 200 and result["response"][2].count(b"data:") == 10
    assert failures == 0


def test_sigterm_lets_a_slow_stream_finish_then_exits_zero(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    streamer, result = stream_in_background(proxy, "/openai/sse?events=6&interval_ms=250")
    upstream.wait_for_requests(1)  # the stream has started; shutdown must not cut it
    proxy.signal(signal.SIGTERM)
    assert proxy.proc is not None
    assert proxy.proc.wait(20) == 0
    streamer.join(5)
    status, _, body = result["response"]
    assert status == 200 and body.count(b"data: event") == 6
    assert any("shutting down" in line for line in proxy.lines)


def test_sigint_is_as_graceful_as_sigterm(proxy: Supervisor, upstream: FakeUpstreamThread) -> None:
    streamer, result = stream_in_background(proxy, "/openai/sse?events=4&interval_ms=250")
    upstream.wait_for_requests(1)
    proxy.signal(signal.SIGINT)
    assert proxy.proc is not None and proxy.proc.wait(20) == 0
    streamer.join(5)
    assert result["response"][2].count(b"data: event") == 4


def test_new_connections_are_refused_once_shutdown_starts(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    streamer, _ = stream_in_background(proxy, "/openai/sse?events=4&interval_ms=250")
    upstream.wait_for_requests(1)
    proxy.signal(signal.SIGTERM)
    proxy.wait_for_log("shutting down")

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        except OSError:
            return True
        return False

    assert wait_until(refused, timeout=2)
    streamer.join(10)


def test_bind_address_change_moves_the_listener_without_dropping_a_stream(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), workers=2)
    streamer, result = stream_in_background(sup, "/openai/sse?events=8&interval_ms=150")
    upstream.wait_for_requests(1)
    old_port, new_port = sup.port, free_port()
    config = proxy_config(upstream.url)
    config["server"] = {"bind_address": f"127.0.0.1:{new_port}"}
    mark = sup.mark()
    sup.write_config(config)
    sup.wait_for_log(rf"listening address=127.0.0.1:{new_port}", start=mark)
    sup.port = new_port
    sup.wait_for_generation(2)
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200

    def old_port_refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", old_port), timeout=1).close()
        except OSError:
            return True
        return False

    # The retired workers close their copy of the old socket when their
    # SIGTERM is handled, a moment after the new workers serve.
    assert wait_until(old_port_refused, timeout=5)
    streamer.join(20)
    status, _, body = result["response"]
    assert status == 200 and body.count(b"data: event") == 8


def test_bind_failure_on_reload_keeps_the_old_listener(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = proxy_config(upstream.url)
        config["server"] = {"bind_address": f"127.0.0.1:{busy}"}
        mark = sup.mark()
        sup.write_config(config)
        line = sup.wait_for_log(r"keeping the old listener", start=mark)
        assert line.startswith("WARN")
        assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200


def test_burst_of_sighups_kills_no_worker(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(proxy_config(upstream.url), workers=2)
    before = set(sup.worker_pids())
    for _ in range(30):
        sup.signal(signal.SIGHUP)
    for pid in before:
        os.kill(pid, signal.SIGHUP)
    sup.wait_for_log(r"config unchanged")
    # Every SIGHUP has been delivered; then one more round trip through the master's
    # loop, which reaps (and logs) any worker that died before it logs this reply.
    assert sup.proc is not None
    assert wait_until(lambda: all(map(signals_taken, [sup.proc.pid, *before])), timeout=5)
    mark = sup.mark()
    sup.signal(signal.SIGHUP)
    sup.wait_for_log(r"config unchanged", start=mark)
    assert set(sup.worker_pids()) == before
    assert not [line for line in sup.lines if "was sent" in line or "exited with code" in line]


def test_systemd_hears_ready_reloading_and_stopping(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(10)
    sup = make_supervisor(proxy_config(upstream.url), env={"NOTIFY_SOCKET": str(path)})
    messages = [listener.recv(4096).decode()]
    assert messages[0].startswith("READY=1")
    sup.signal(signal.SIGHUP)
    messages += [listener.recv(4096).decode(), listener.recv(4096).decode()]
    assert messages[1].startswith("RELOADING=1") and messages[2].startswith("READY=1")
    sup.signal(signal.SIGTERM)
    messages.append(listener.recv(4096).decode())
    assert messages[3].startswith("STOPPING=1")
    listener.close()
