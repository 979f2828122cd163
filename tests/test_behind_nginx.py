"""Behind nginx (README: "Behind nginx or a TLS terminator"): Debian's nginx runs
`config/nginx-fluxgate.conf` as shipped, with only its two addresses changed.

Through it: a completion with the openai SDK, SSE events unbuffered (each as
the upstream emits it), `X-Forwarded-For` logged as the client only when
`server.trusted_proxies` names nginx, and nginx's default HTTP/1.0 upstream
answered with a 505 that says what to change.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from demo.fake_upstream import FakeUpstreamThread
from tests import rawhttp
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor, free_port, wait_until

NGINX_CONF = Path(__file__).resolve().parent.parent / "config" / "nginx-fluxgate.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """Debian's nginx in the foreground, on a config made in `tmp` around `server_block`."""

    def __init__(self, tmp: Path, server_block: str) -> None:
        self.port = free_port()
        block = server_block.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
        conf = tmp / "nginx.conf"
        conf.write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n"
            f"  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n"
            f"  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n{block}\n}}\n"
        )
        self.proc = subprocess.Popen(
            [NGINX, "-e", str(tmp / "startup.log"), "-g", "daemon off;", "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not wait_until(self._listening, timeout=10):
            self.stop()
            raise AssertionError(f"nginx did not listen: {(tmp / 'startup.log').read_text()}")

    def _listening(self) -> bool:
        try:
            with rawhttp.Conn(self.port, timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def behind_nginx(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> Iterator[Callable[..., tuple[Supervisor, Nginx]]]:
    started: list[Nginx] = []

    def start(*drop: str, **server: Any) -> tuple[Supervisor, Nginx]:
        """Fluxgate with `server` settings behind nginx, minus the `drop` directives."""
        sup = make_supervisor(proxy_config(upstream.url, server=server or None))
        block = NGINX_CONF.read_text().replace("127.0.0.1:8080", f"127.0.0.1:{sup.port}")
        lines = block.splitlines()
        block = "\n".join(x for x in lines if not any(x.strip().startswith(d) for d in drop))
        directory = tmp_path / f"nginx{len(started)}"
        directory.mkdir()
        started.append(Nginx(directory, block))
        return sup, started[-1]

    yield start
    for nginx in started:
        nginx.stop()


def test_a_completion_through_nginx_with_the_openai_sdk(behind_nginx: Any) -> None:
    _sup, nginx = behind_nginx()
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{nginx.port}/openai/v1", api_key=CLIENT_KEY, max_retries=0
    )
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content


def test_sse_events_arrive_through_nginx_one_by_one(behind_nginx: Any) -> None:
    _sup, nginx = behind_nginx()
    arrivals: list[tuple[bytes, float]] = []
    with rawhttp.Conn(nginx.port) as conn:
        head = [rawhttp.host(nginx.port), rawhttp.bearer(CLIENT_KEY)]
        conn.send(rawhttp.build_request("GET", "/openai/sse?events=4&interval_ms=300", head))
        resp = conn.read_head()
        assert resp.status == 200
        arrivals += conn.iter_events(resp)
    assert [event for event, _ in arrivals] == [b"data: event %d" % i for i in range(1, 5)]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(arrivals)]
    assert all(gap > 0.15 for gap in gaps), gaps


def request_line_for(sup: Supervisor, nginx: Nginx, forwarded_for: str) -> str:
    mark = sup.mark()
    headers = [
        rawhttp.host(nginx.port),
        rawhttp.bearer(CLIENT_KEY),
        ("X-Forwarded-For", forwarded_for),
    ]
    assert rawhttp.request(nginx.port, "GET", "/openai/v1/models", headers).status == 200
    return sup.wait_for_log(r"request .*request_url=/openai/v1/models", start=mark)


def test_x_forwarded_for_names_the_client_when_nginx_is_a_trusted_proxy(
    behind_nginx: Any,
) -> None:
    sup, nginx = behind_nginx(trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"])
    # The client claims 198.51.100.1; 10.1.2.3 is a trusted proxy in front of nginx.
    line = request_line_for(sup, nginx, "198.51.100.1, 203.0.113.9, 10.1.2.3")
    assert " client_ip=203.0.113.9 " in line


def test_x_forwarded_for_is_ignored_unless_the_operator_opts_in(behind_nginx: Any) -> None:
    sup, nginx = behind_nginx()
    line = request_line_for(sup, nginx, "203.0.113.9")
    assert " client_ip=127.0.0.1 " in line


def test_nginx_default_http_1_0_upstream_gets_a_505_that_says_what_to_change(
    behind_nginx: Any,
) -> None:
    _sup, nginx = behind_nginx("proxy_http_version", "proxy_set_header Connection")
    headers = [rawhttp.host(nginx.port), rawhttp.bearer(CLIENT_KEY)]
    resp = rawhttp.request(nginx.port, "GET", "/openai/v1/models", headers)
    assert resp.status == 505
    assert b"proxy_http_version 1.1" in resp.body
