"""Prometheus metrics (`GET /_fluxgate/metrics`) on a real supervisor with two workers.

Traffic is pinned to each worker by keep-alive connections whose worker is
known from the health endpoint's pid, so a scrape through either worker must
report the exact sum of both (prometheus-client's multiprocess files), and
keep it after a worker dies.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import build_config
from supervisor.metrics import archive_dead_worker
from tests import rawhttp
from tests.conftest import CLIENT_KEY, LIMITED_KEY, proxy_config
from tests.promtext import fetch, labels_of, parse, scrape, total, value, wait_for
from tests.supervisor_process import Supervisor, free_port, wait_until
from tests.test_validation import assert_accepted, assert_rejected, doc_with

CHAT = "/openai/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello metrics world"}]
# A series file whose one record claims more than the file holds.
BROKEN_SERIES_FILE = struct.pack("ii", 48, 0) + struct.pack("i", 1000) + bytes(60)
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}


def config(upstream: FakeUpstreamThread, **server: Any) -> dict[str, Any]:
    doc = proxy_config(upstream.url)
    doc["upstreams"]["openai"]["usage"] = "openai"
    doc["upstreams"]["anthropic"]["usage"] = "anthropic"
    if server:
        doc["server"] = server
    return doc


def start(make_supervisor: Callable[..., Supervisor], doc: dict[str, Any], **kw: Any) -> Supervisor:
    sup: Supervisor = make_supervisor(doc, workers=2, **kw)
    return sup


def start_in(
    tmp_path: Path, make_supervisor: Callable[..., Supervisor], doc: dict[str, Any]
) -> tuple[Supervisor, Path]:
    """A supervisor whose runtime directory is under `tmp_path`, and its metrics directory."""
    run = tmp_path / "run"
    run.mkdir()
    sup = start(make_supervisor, doc, env={"RUNTIME_DIRECTORY": str(run)})
    (metrics_dir,) = run.glob("fluxgate-*/metrics")
    return sup, metrics_dir


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=AUTH if headers is None else headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def worker_connections(sup: Supervisor, count: int = 2) -> dict[int, http.client.HTTPConnection]:
    """One keep-alive connection per worker, each worker identified by its pid."""
    conns: dict[int, http.client.HTTPConnection] = {}
    for _ in range(300):
        conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=10)
        pid = json.loads(call(conn, "GET", "/_fluxgate/health", headers={})[1])["pid"]
        if pid in conns:
            conn.close()
        else:
            conns[pid] = conn
        if len(conns) == count:
            return conns
    raise AssertionError(f"only {len(conns)} workers answered")


def chat(conn: http.client.HTTPConnection, **extra: Any) -> tuple[int, bytes, int]:
    body = {"model": "fake-gpt", "messages": MESSAGES, **extra}
    status, data = call(conn, "POST", CHAT, body)
    return status, data, len(json.dumps(body))


def sse_usage(data: bytes) -> dict[str, Any]:
    for line in data.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            usage: dict[str, Any] = json.loads(line[6:])["usage"]
            return usage
    raise AssertionError("no usage in the stream")


# --- exact counts across workers -------------------------------------------------------


def test_a_scrape_through_either_worker_reports_the_exact_sum_of_both(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = start(make_supervisor, config(upstream))
    (pid_a, a), (pid_b, b) = worker_connections(sup).items()
    sent = received = prompt = completion = 0
    for conn in (a, a, a, b, b):
        status, data, size = chat(conn)
        assert status == 200
        usage = json.loads(data)["usage"]
        sent, received = sent + size, received + len(data)
        prompt, completion = (
            prompt + usage["prompt_tokens"],
            completion + usage["completion_tokens"],
        )
    status, data, size = chat(b, stream=True, stream_options={"include_usage": True})
    assert status == 200
    usage = sse_usage(data)
    sent, received = sent + size, received + len(data)
    prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]
    assert call(a, "POST", CHAT, {}, {"Authorization": "Bearer wrong"})[0] == 401
    assert call(b, "GET", "/nowhere/secret-path")[0] == 404
    limited = {"x-api-key": LIMITED_KEY, "content-type": "application/json"}
    message = {"model": "fake-claude", "max_tokens": 9, "messages": MESSAGES}
    status, data = call(b, "POST", "/anthropic/v1/messages", message, limited)
    assert status == 200
    anthropic_usage = json.loads(data)["usage"]

    samples = wait_for(sup.url, "fluxgate_requests_total", 6, upstream="openai", key_id="ci",
                       status_class="2xx")  # fmt: skip
    samples = wait_for(sup.url, "fluxgate_requests_total", 1, upstream="", key_id="ci",
                       status_class="4xx")  # fmt: skip
    # Each worker writes its counts within FLUSH_DELAY: wait for every series.
    samples = wait_for(sup.url, "fluxgate_requests_total", 1, upstream="", key_id="",
                       status_class="4xx")  # fmt: skip
    samples = wait_for(sup.url, "fluxgate_requests_total", 1, upstream="anthropic",
                       key_id="limited", status_class="2xx")  # fmt: skip
    requests = {
        (s["upstream"], s["key_id"], s["status_class"]): value(samples, "fluxgate_requests_total",
                                                               **s)
        for s in labels_of(samples, "fluxgate_requests_total")
    }  # fmt: skip
    # Health checks and scrapes are not proxy traffic: not counted.
    assert requests == {
        ("openai", "ci", "2xx"): 6,
        ("anthropic", "limited", "2xx"): 1,
        ("", "", "4xx"): 1,  # no valid credential: no key id
        ("", "ci", "4xx"): 1,  # a valid key, no route
    }
    # Both workers served and both answer the same aggregated numbers.
    for conn in (a, b):
        via = parse(call(conn, "GET", "/_fluxgate/metrics", headers={})[1].decode())
        assert value(via, "fluxgate_requests_total", upstream="openai", key_id="ci",
                     status_class="2xx") == 6  # fmt: skip
    assert pid_a != pid_b

    assert value(samples, "fluxgate_request_bytes_total", upstream="openai", key_id="ci") == sent
    assert (
        value(samples, "fluxgate_response_bytes_total", upstream="openai", key_id="ci") == received
    )
    assert value(samples, "fluxgate_tokens_total", upstream="openai", key_id="ci",
                 type="input") == prompt  # fmt: skip
    assert value(samples, "fluxgate_tokens_total", upstream="openai", key_id="ci",
                 type="output") == completion  # fmt: skip
    assert value(samples, "fluxgate_tokens_total", upstream="anthropic", key_id="limited",
                 type="input") == anthropic_usage["input_tokens"]  # fmt: skip
    assert value(samples, "fluxgate_tokens_total", upstream="anthropic", key_id="limited",
                 type="output") == anthropic_usage["output_tokens"]  # fmt: skip
    for name, expected in (("openai", 6), ("anthropic", 1), ("", 2)):
        histogram = "fluxgate_request_duration_seconds"
        assert value(samples, histogram + "_count", upstream=name) == expected
        assert value(samples, histogram + "_bucket", upstream=name, le="+Inf") == expected
    assert value(samples, "fluxgate_upstream_ttfb_seconds_count", upstream="openai") == 6
    assert value(samples, "fluxgate_upstream_ttfb_seconds_count", upstream="") == 0
    assert value(samples, "fluxgate_workers") == 2
    assert value(samples, "fluxgate_config_generation") == 1
    assert value(samples, "fluxgate_worker_config_generation_min") == 1
    assert value(samples, "fluxgate_worker_restarts_total") == 0
    # Labels are upstream names, key ids and fixed sets only: no path, no secret.
    text = fetch(sup.url + "/_fluxgate/metrics")
    assert "secret-path" not in text and "nowhere" not in text and CLIENT_KEY not in text
    label_names = {k for (_, labels) in samples for k, _ in labels}
    allowed = {"upstream", "key_id", "provider_key", "status_class", "type", "reason", "result",
               "limit"}  # fmt: skip
    assert label_names <= allowed | {"outcome", "le"}


def test_counts_outlive_a_crashed_worker_and_the_restart_is_counted(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup, metrics_dir = start_in(tmp_path, make_supervisor, config(upstream))
    conns = worker_connections(sup)
    for conn in conns.values():
        for _ in range(2):
            assert chat(conn)[0] == 200
    labels = {"upstream": "openai", "key_id": "ci", "status_class": "2xx"}
    assert value(wait_for(sup.url, "fluxgate_requests_total", 4, **labels),
                 "fluxgate_requests_total", **labels) == 4  # fmt: skip
    dead = next(iter(conns))
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: dead not in sup.worker_pids() and len(sup.worker_pids()) == 2, 10)
    samples = wait_for(sup.url, "fluxgate_worker_restarts_total", 1)
    assert value(samples, "fluxgate_worker_restarts_total") == 1
    assert value(samples, "fluxgate_requests_total", **labels) == 4  # nothing lost
    files = sorted(p.name for p in metrics_dir.glob("*.db"))
    assert not [f for f in files if f.endswith(f"_{dead}.db")], files
    assert "counter_archive.db" in files and "histogram_archive.db" in files
    other = conns[next(p for p in conns if p != dead)]
    assert chat(other)[0] == 200
    samples = wait_for(sup.url, "fluxgate_requests_total", 5, **labels)
    assert value(samples, "fluxgate_requests_total", **labels) == 5
    assert value(samples, "fluxgate_request_duration_seconds_count", upstream="openai") == 5


def test_a_series_file_created_but_not_yet_sized_does_not_fail_a_scrape(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    # A process makes its file empty, then sizes it; a scrape in between (a
    # writer descheduled there on a loaded machine) must still answer.
    sup, metrics_dir = start_in(tmp_path, make_supervisor, config(upstream))
    conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=10)
    assert chat(conn)[0] == 200
    labels = {"upstream": "openai", "key_id": "ci", "status_class": "2xx"}
    wait_for(sup.url, "fluxgate_requests_total", 1, **labels)
    (metrics_dir / f"histogram_{max(sup.worker_pids()) + 1}.db").touch()
    assert value(scrape(sup.url), "fluxgate_requests_total", **labels) == 1


@pytest.mark.parametrize("listener", ["main", "metrics_address"])
def test_series_files_that_stay_unreadable_answer_503_with_a_json_body_until_fixed(
    upstream: FakeUpstreamThread,
    make_supervisor: Callable[..., Supervisor],
    tmp_path: Path,
    listener: str,
) -> None:
    port = free_port()  # the master's own listener, when asked for
    own = {"metrics_address": f"127.0.0.1:{port}"} if listener == "metrics_address" else {}
    sup, metrics_dir = start_in(tmp_path, make_supervisor, config(upstream, **own))
    url = sup.url + "/_fluxgate/metrics" if not own else f"http://127.0.0.1:{port}/metrics"
    broken = metrics_dir / "counter_7.db"
    broken.write_bytes(BROKEN_SERIES_FILE)
    mark = sup.mark()
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(url)
    assert refused.value.code == 503
    assert json.loads(refused.value.read())["error"]["type"] == "metrics_unavailable"
    sup.wait_for_log("metrics unreadable", start=mark)
    assert not [line for line in sup.lines[mark:] if "Traceback" in line]
    broken.unlink()
    assert "fluxgate_config_reloads_total" in fetch(url)


def _series_file(path: Path, values: dict[str, float]) -> None:
    series = MmapedDict(str(path))
    for key, amount in values.items():
        series.write_value(key, amount, 0.0)
    series.close()


def test_a_dead_worker_file_never_sized_or_unreadable_is_dropped_and_the_rest_archived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = '["fluxgate_requests", "fluxgate_requests_total", {}, "h"]'
    _series_file(tmp_path / "counter_archive.db", {key: 2.0})
    _series_file(tmp_path / "counter_41.db", {key: 3.0})
    (tmp_path / "histogram_41.db").touch()  # died between creating and sizing it
    (tmp_path / "counter_42.db").write_bytes(BROKEN_SERIES_FILE)
    with caplog.at_level(logging.WARNING, logger="fluxgate.supervisor"):
        archive_dead_worker(str(tmp_path), 41)
        archive_dead_worker(str(tmp_path), 42)
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_archive.db"]
    archived = MmapedDict.read_all_values_from_file(str(tmp_path / "counter_archive.db"))
    assert [(k, v) for k, v, _ts, _pos in archived] == [(key, 5.0)]
    assert [r.getMessage() for r in caplog.records] == [
        "metrics of a dead worker unreadable, dropped"
    ]


def test_reloads_applied_and_rejected_and_the_generation(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    doc = config(upstream)
    sup = start(make_supervisor, doc)
    doc["upstreams"]["request_timeout_ms"] = 6000
    sup.write_config(doc)
    sup.wait_for_generation(2)
    samples = wait_for(sup.url, "fluxgate_worker_config_generation_min", 2)
    assert value(samples, "fluxgate_config_generation") == 2
    assert value(samples, "fluxgate_worker_config_generation_min") == 2
    assert value(samples, "fluxgate_config_reloads_total", outcome="applied") == 1
    assert value(samples, "fluxgate_config_reloads_total", outcome="rejected") == 0
    mark = sup.mark()
    sup.write_config("version: 2\n")
    sup.wait_for_log("config rejected", start=mark)
    samples = scrape(sup.url)
    assert value(samples, "fluxgate_config_reloads_total", outcome="rejected") == 1
    assert value(samples, "fluxgate_config_reloads_total", outcome="applied") == 1
    assert value(samples, "fluxgate_config_generation") == 2


def test_requests_the_protocol_layer_refuses_are_counted(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = start(make_supervisor, config(upstream))
    with rawhttp.Conn(sup.port) as conn:
        conn.send(b"GET /openai/v1/models HTTP/1.0\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 505
    samples = wait_for(sup.url, "fluxgate_requests_total", 1, upstream="", key_id="",
                       status_class="5xx")  # fmt: skip
    assert total(samples, "fluxgate_requests_total") == 1


def test_in_flight_streams_and_open_connections_are_gauges(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = start(make_supervisor, config(upstream))
    with rawhttp.Conn(sup.port) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/stream-forever?interval_ms=50", [
            rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]))  # fmt: skip
        next(conn.iter_chunks(conn.read_head()))
        samples = wait_for(sup.url, "fluxgate_active_streams", 1, upstream="openai")
        assert value(samples, "fluxgate_active_streams", upstream="openai") == 1
        assert value(samples, "fluxgate_active_connections") >= 1
    samples = wait_for(sup.url, "fluxgate_active_streams", 0, upstream="openai")
    assert value(samples, "fluxgate_active_streams", upstream="openai") == 0


# --- turning it off, moving it ---------------------------------------------------------


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def _refused(port: int) -> bool:
    """Nothing listens on `port` any more (a reset: the listener closed meanwhile)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def _listeners(port: int) -> str:
    ss = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    return f"still listening on {port}: {ss.stdout or ss.stderr}"


def test_metrics_off_serves_and_records_nothing_until_turned_on(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    doc = config(upstream, metrics=False)
    sup = start(make_supervisor, doc)
    assert _status(sup.url + "/_fluxgate/metrics") == 404
    conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=10)
    assert chat(conn)[0] == 200
    doc["server"]["metrics"] = True
    sup.write_config(doc)
    sup.wait_for_generation(2)
    assert chat(conn)[0] == 200
    labels = {"upstream": "openai", "key_id": "ci", "status_class": "2xx"}
    samples = wait_for(sup.url, "fluxgate_requests_total", 1, **labels)
    assert value(samples, "fluxgate_requests_total", **labels) == 1  # only while on


def test_metrics_on_their_own_address_served_by_the_master_and_moved_on_reload(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    first, second = free_port(), free_port()
    doc = config(upstream, metrics_address=f"127.0.0.1:{first}")
    sup = start(make_supervisor, doc)
    assert _status(sup.url + "/_fluxgate/metrics") == 404  # not on the main listener
    conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=10)
    assert chat(conn)[0] == 200
    labels = {"upstream": "openai", "key_id": "ci", "status_class": "2xx"}
    own = f"http://127.0.0.1:{first}"
    assert value(wait_for(own, "fluxgate_requests_total", 1, path="/metrics", **labels),
                 "fluxgate_requests_total", **labels) == 1  # fmt: skip

    doc["server"]["metrics_address"] = f"127.0.0.1:{second}"
    mark = sup.mark()
    sup.write_config(doc)
    sup.wait_for_log(f"serving metrics address=127.0.0.1:{second}", start=mark)
    moved = scrape(f"http://127.0.0.1:{second}", "/metrics")
    assert value(moved, "fluxgate_requests_total", **labels) == 1
    # No worker kept a copy of the old socket open: the old port is closed.
    assert wait_until(lambda: _refused(first), timeout=5), _listeners(first)

    del doc["server"]["metrics_address"]
    sup.write_config(doc)
    sup.wait_for_generation(3)
    assert value(scrape(sup.url), "fluxgate_requests_total", **labels) == 1
    assert wait_until(lambda: _refused(second), timeout=5), _listeners(second)


def test_sigusr1_reopens_nothing_and_kills_nothing(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = start(make_supervisor, config(upstream))
    before = sorted(sup.worker_pids())
    mark = sup.mark()
    sup.signal(signal.SIGUSR1)
    sup.wait_for_log("SIGUSR1: no log files to reopen", start=mark)
    for pid in before:
        os.kill(pid, signal.SIGUSR1)  # the workers themselves too
    conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=10)
    assert chat(conn)[0] == 200
    assert sorted(sup.worker_pids()) == before
    assert sup.proc is not None and sup.proc.poll() is None


# --- configuration ---------------------------------------------------------------------


def test_metrics_are_on_by_default_on_the_main_listener() -> None:
    server = build_config({"version": 1}).server
    assert server.metrics is True and server.metrics_address is None


@pytest.mark.parametrize("value_", [True, False])
def test_server_metrics_is_a_boolean(value_: bool) -> None:
    assert_accepted(doc_with("server.metrics", value_))
    assert build_config(doc_with("server.metrics", value_)).server.metrics is value_


@pytest.mark.parametrize("value_", ["yes", 1, None, [], "true"])
def test_server_metrics_rejects_non_booleans(value_: object) -> None:
    assert_rejected(doc_with("server.metrics", value_), "server.metrics")


@pytest.mark.parametrize("address", ["127.0.0.1:9100", "[::1]:9100", "localhost:9100",
                                     "0.0.0.0:9100", "127.0.0.1:8081"])  # fmt: skip
def test_metrics_address_accepts_host_and_port(address: str) -> None:
    doc = doc_with("server.metrics_address", address)
    assert_accepted(doc)
    assert build_config(doc).server.metrics_address == address


@pytest.mark.parametrize(
    "address",
    ["9100", "127.0.0.1", "127.0.0.1:0", "::1:9100", "http://h:1", "", 9100, None, ["a:1"],
     "127.0.0.1:8080", "0.0.0.0:8080", "[::]:8080"],
)  # fmt: skip
def test_metrics_address_rejects_bad_or_clashing_addresses(address: object) -> None:
    # The base document binds 127.0.0.1:8080.
    assert_rejected(doc_with("server.metrics_address", address), "server.metrics_address")


def test_metrics_address_with_metrics_off_is_an_error() -> None:
    doc = doc_with("server.metrics_address", "127.0.0.1:9100")
    doc["server"]["metrics"] = False
    errors = assert_rejected(doc, "server.metrics_address")
    assert any("server.metrics is false" in e for e in errors)


# --- the worker's batching, in a process of its own (the library reads the directory
# from the environment when first imported) ------------------------------------------------

BATCHING_SCRIPT = r"""
import asyncio, json, sys
from fluxgate.metrics import WorkerMetrics, render
from fluxgate.exchange import Exchange

def requests(text):
    lines = text.decode().splitlines()
    found = [l for l in lines if l.startswith("fluxgate_requests_total")]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0

async def main():
    m = WorkerMetrics(delay=0.02)
    seen = []
    for tick in range(200):  # 10 requests every ms for 0.2 s: the queue is never empty
        for _ in range(10):
            ex = Exchange()
            ex.status, ex.upstream, ex.key_id = 200, "openai", "ci"
            m.add(ex, 0.001)
        await asyncio.sleep(0.001)
        if tick % 50 == 49:
            seen.append(requests(await asyncio.to_thread(render, m.directory)))
    m.flush()
    print(json.dumps({"during": seen, "total": requests(render(m.directory))}))

asyncio.run(main())
"""


def test_a_busy_worker_still_writes_its_counts_while_requests_keep_coming(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", BATCHING_SCRIPT], env=env, capture_output=True, text=True,
        timeout=60, cwd=root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["total"] == 2000
    # Counted and written while the queue never ran empty, not only at the end.
    # (the last sample may already see all 2000 on a fast machine: the first
    # must not, or nothing was written before the end).
    assert 0 < result["during"][0] < 2000
    assert result["during"] == sorted(result["during"])
