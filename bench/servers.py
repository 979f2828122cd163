"""Start and stop everything the benchmark measures, on 127.0.0.1 only, in one temp dir.

- `canned`: nginx returning a canned OpenAI chat completion (the fast upstream);
- `sse`: bench.sse_upstream (timed SSE events, bulk upload/download);
- `ticks`: bench.tick_upstream (thousands of slow SSE streams, every event time-stamped);
- `nginx`: nginx `proxy_pass` with an upstream keep-alive pool, 2 workers;
- `passthrough`: bench.passthrough under uvicorn --workers 2 (uvloop, httptools);
- `fluxgate` (FLUXGATE_LOG=ERROR) and `fluxgate-trace` (TRACE, stderr to /dev/null), 2 workers.

`Stack` starts them all, so that every scenario can interleave the systems,
and always stops them (context manager, plus atexit for a killed run).
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLIENT_KEY = "bench-client-key"
# A client key with a limits policy (never reached): what counting costs.
LIMITS_KEY = "bench-limited-key"
BENCH_POLICY = {"requests_per_minute": 10**12, "tokens_per_minute": 10**12,
                "concurrent_requests": 10**6, "tokens_per_day": 10**14}  # fmt: skip
UPSTREAM_KEY = "sk-bench-upstream"
JSON_PATH = "/v1/chat/completions"
CANNED = {
    "id": "chatcmpl-bench0001",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    "system_fingerprint": "fp_bench",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc/<pid>/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue  # exited meanwhile
    return pids


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: pages shared after fork count once over the processes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int | None:
    """Open descriptors of `pid` (None where /proc does not let us look)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class System:
    """One thing clients talk to, and the process tree that serves it."""

    name: str
    port: int  # where the canned JSON is reached
    json_path: str
    sse_port: int  # where the SSE upstream's paths are reached
    sse_prefix: str
    proc: subprocess.Popen[bytes]
    config_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    key: str = CLIENT_KEY  # the client key the load generators send
    ticks_port: int = 0  # where the tick upstream's paths are reached (bench.streams)
    ticks_prefix: str = ""

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def rss_mib(self) -> float:
        return sum(rss_kib(p) for p in self.pids()) / 1024

    def pss_kib(self) -> int:
        return sum(pss_kib(p) for p in self.pids())

    def worker_rss_mib(self) -> list[float]:
        return [rss_kib(p) / 1024 for p in self.pids()[1:]]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())


def _nginx_conf(
    tmp: Path, name: str, workers: int, http_block: str, connections: int = 8192
) -> Path:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / f"{name}-{sub}").mkdir(exist_ok=True)
    conf = tmp / f"{name}.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes {workers};\npid {tmp}/{name}.pid;\n"
        f"error_log {tmp}/{name}-error.log warn;\n"
        + (f"worker_rlimit_nofile {_nofile(connections)};\n" if connections > 8192 else "")
        + f"events {{ worker_connections {connections}; }}\n"
        "http {\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 75s;\n"
        f"  client_body_temp_path {tmp}/{name}-body;\n  proxy_temp_path {tmp}/{name}-proxy;\n"
        f"  fastcgi_temp_path {tmp}/{name}-fastcgi;\n  uwsgi_temp_path {tmp}/{name}-uwsgi;\n"
        f"  scgi_temp_path {tmp}/{name}-scgi;\n{http_block}}}\n"
    )
    return conf


# The long-streams scenario's 10,000 streams are 20,000 connections in nginx (the
# client's and the upstream's), and nothing makes its 2 workers share them
# evenly: room for all of them in either worker. Only in the Stack that
# bench.streams starts: each worker allocates its connection table up front
# (about 5 MB more RSS than 8192), which the idle memory of the main run would show.
STREAMS_NGINX_CONNECTIONS = 20480


def _nofile(connections: int) -> int:
    """A worker's descriptor limit for `connections`, within the hard limit unless
    nginx runs as root (which may raise it; anyone else would only get an alert)."""
    want = connections + 64  # listeners, logs, the channel to the master
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if os.geteuid() == 0 or hard == resource.RLIM_INFINITY:
        return want
    return min(want, hard)


def canned_conf(tmp: Path, port: int) -> Path:
    body = json.dumps(CANNED).replace("\\", "\\\\").replace("'", "\\'")
    return _nginx_conf(
        tmp,
        "canned",
        2,
        f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n"
        f"    location / {{ default_type application/json; return 200 '{body}'; }}\n  }}\n",
    )


def proxy_conf(
    tmp: Path, port: int, canned: int, sse: int, ticks: int, connections: int = 8192
) -> Path:
    common = (
        'proxy_http_version 1.1; proxy_set_header Connection ""; '
        f'proxy_set_header Authorization "Bearer {UPSTREAM_KEY}";'
    )
    return _nginx_conf(
        tmp,
        "proxy",
        2,
        f"  upstream canned {{ server 127.0.0.1:{canned}; keepalive 128; "
        "keepalive_requests 10000000; }\n"
        f"  upstream sse {{ server 127.0.0.1:{sse}; keepalive 128; }}\n"
        f"  upstream ticks {{ server 127.0.0.1:{ticks}; keepalive 128; }}\n"
        f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n"
        "    client_max_body_size 0;\n"
        f"    location /openai/ {{ proxy_pass http://canned/; {common} }}\n"
        f"    location /sse/ {{ proxy_pass http://sse/; {common} proxy_buffering off; "
        "proxy_buffer_size 64k; proxy_buffers 8 64k; proxy_request_buffering off; "
        "proxy_read_timeout 600s; }\n"
        # SSE as a deployment would proxy it, buffering off; nginx's default one-page
        # buffer, since /sse's 64k would be 640 MB held by 10,000 open streams.
        f"    location /ticks/ {{ proxy_pass http://ticks/; {common} proxy_buffering off; "
        "proxy_read_timeout 600s; }\n  }\n",
        connections,
    )


def fluxgate_doc(
    port: int,
    canned: int,
    sse: int,
    extra_keys: list[str],
    *,
    ticks: int | None = None,
    metrics: bool = True,
    usage: str = "openai",
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Every feature on by default: Prometheus metrics and token usage of the
    canned completion (bench.observability compares them with off); LIMITS_KEY
    is counted under a policy, locally or in Redis at `redis_url`; the tick
    upstream at port `ticks` (bench.streams) under /ticks."""
    keys: list[dict[str, Any]] = [
        {"id": "bench", "key": CLIENT_KEY},
        {"id": "limited", "key": LIMITS_KEY, "limits": "bench"},
    ]
    keys += [{"id": f"extra{i}", "key": k} for i, k in enumerate(extra_keys)]
    return {
        "version": 1,
        "server": {
            "bind_address": f"127.0.0.1:{port}",
            # 10,000 open streams in the long-streams scenario, and room to spare.
            "max_connections": 20000,
            "workers": 2,
            "metrics": metrics,
        },
        "upstreams": {
            "request_timeout_ms": 600000,
            "openai": {
                "request_path": "/openai",
                "target_url": f"http://127.0.0.1:{canned}",
                "api_key": UPSTREAM_KEY,
                "usage": usage,
            },
            "sse": {
                "request_path": "/sse",
                "target_url": f"http://127.0.0.1:{sse}",
                "api_key": UPSTREAM_KEY,
                "usage": usage,
            },
            # The same canned upstream through a pool of three keys (the
            # fluxgate-pool system): what choosing a key costs per request.
            "pooled": {
                "request_path": "/pooled",
                "target_url": f"http://127.0.0.1:{canned}",
                "api_keys": [{"id": f"k{i}", "key": f"{UPSTREAM_KEY}-{i}"} for i in range(3)],
                "usage": usage,
            },
            **(
                {
                    "ticks": {
                        "request_path": "/ticks",
                        "target_url": f"http://127.0.0.1:{ticks}",
                        "api_key": UPSTREAM_KEY,
                        "usage": usage,
                    }
                }
                if ticks
                else {}
            ),
        },
        "api_keys": {"static": keys},
        "limits": {"policies": {"bench": BENCH_POLICY}}
        | ({"backend": "redis", "redis_url": redis_url} if redis_url else {}),
    }


def write_fluxgate_config(system: System, extra_keys: list[str]) -> None:
    """Replace the config file atomically (write a sibling, rename), as deploy tools do."""
    assert system.config_path is not None
    ports = system.ports
    doc = fluxgate_doc(
        system.port, ports["canned"], ports["sse"], extra_keys, ticks=ports.get("ticks")
    )
    tmp = system.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, system.config_path)


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if http_get(port, path, headers)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)  # nothing to wait on but the port opening
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready within {timeout:.0f} s")


def _wait_port(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # nothing to wait on but the port opening
    raise RuntimeError(f"127.0.0.1:{port} not listening within {timeout:.0f} s")


def wait_workers(system: System, workers: int = 2, timeout: float = 30.0) -> None:
    """Until the health endpoint has answered from `workers` distinct worker pids."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system.name}: only {len(seen)} workers answered")
        try:
            status, body = http_get(system.port, "/_fluxgate/health")
            if status == 200:
                seen.add(json.loads(body)["pid"])
        except OSError:
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group, made by start_new_session
            proc.wait()


class Stack:
    """Every server of the benchmark, started together and always stopped."""

    def __init__(self, nginx_connections: int = 8192) -> None:
        self.nginx_connections = nginx_connections  # the nginx proxy's worker_connections
        self.tmp = Path(tempfile.mkdtemp(prefix="fluxgate-bench-"))
        self.procs: list[tuple[subprocess.Popen[bytes], int]] = []
        self.systems: dict[str, System] = {}
        self.ticks: System | None = None  # set by start()
        self._files: list[TextIO] = []
        self.keep = False
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        atexit.register(self.close)

    def _spawn(self, args: list[str], stderr: Any, env: dict[str, str] | None = None,
               stop_signal: int = signal.SIGTERM) -> subprocess.Popen[bytes]:  # fmt: skip
        proc = subprocess.Popen(
            args, cwd=self.tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        self.procs.append((proc, stop_signal))
        return proc

    def _log(self, name: str) -> TextIO:
        f = open(self.tmp / f"{name}.stderr", "w")  # noqa: SIM115 (closed in close())
        self._files.append(f)
        return f

    def start(self) -> dict[str, System]:
        names = ("canned", "sse", "ticks", "nginx", "passthrough", "fg", "fgt", "fgr", "redis")
        ports = {n: free_port() for n in names}
        c, s, t = ports["canned"], ports["sse"], ports["ticks"]
        nginx_args = [self.nginx, "-e", str(self.tmp / "nginx-startup.log"), "-g", "daemon off;"]
        canned = self._spawn([*nginx_args, "-c", str(canned_conf(self.tmp, c))],
                             self._log("canned"), stop_signal=signal.SIGQUIT)  # fmt: skip
        sse_args = [sys.executable, "-m", "bench.sse_upstream", "--port", str(s)]
        sse = self._spawn(sse_args, self._log("sse"), env={**os.environ, "PYTHONPATH": str(ROOT)})
        ticks_args = [sys.executable, "-m", "bench.tick_upstream", "--port", str(t)]
        ticks = self._spawn(ticks_args, self._log("ticks"),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        proxy = proxy_conf(self.tmp, ports["nginx"], c, s, t, self.nginx_connections)
        nginx = self._spawn(
            [*nginx_args, "-c", str(proxy)],
            self._log("nginx"),
            stop_signal=signal.SIGQUIT,
        )
        pt_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PASSTHROUGH_ROUTES": f"/openai=http://127.0.0.1:{c},/sse=http://127.0.0.1:{s},"
            f"/ticks=http://127.0.0.1:{t}",
            "PASSTHROUGH_KEY": UPSTREAM_KEY,
        }
        passthrough = self._spawn(
            [sys.executable, "-m", "uvicorn", "bench.passthrough:app", "--host", "127.0.0.1",
             "--port", str(ports["passthrough"]), "--workers", "2", "--loop", "uvloop",
             "--http", "httptools", "--no-access-log", "--log-level", "warning",
             "--no-server-header", "--no-date-header"],
            self._log("passthrough"), env=pt_env,
        )  # fmt: skip
        _wait(canned, c, JSON_PATH)
        _wait(sse, s, "/stream?events=1")
        _wait(ticks, t, "/ticks?events=1")
        # Not a system of its own: the upstream whose CPU and sockets bench.streams watches.
        self.ticks = System("ticks", t, "/ticks?events=1", t, "", ticks, ticks_port=t)
        self.systems["direct"] = System("direct", c, JSON_PATH, s, "", canned, ticks_port=t)
        proxied = "/openai" + JSON_PATH
        self.systems["nginx"] = System("nginx", ports["nginx"], proxied, ports["nginx"], "/sse",
                                       nginx, ticks_port=ports["nginx"],
                                       ticks_prefix="/ticks")  # fmt: skip
        self.systems["passthrough"] = System(
            "passthrough", ports["passthrough"], proxied, ports["passthrough"], "/sse", passthrough,
            ticks_port=ports["passthrough"], ticks_prefix="/ticks",
        )  # fmt: skip
        redis = self._spawn(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port",
             str(ports["redis"]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            self._log("redis"),
        )  # fmt: skip
        redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
        _wait_port(redis, ports["redis"])
        for name, key, level in (
            ("fluxgate", "fg", "ERROR"),
            ("fluxgate-trace", "fgt", "TRACE"),
            ("fluxgate-redis", "fgr", "ERROR"),
        ):
            config = self.tmp / f"{name}.yaml"
            url = redis_url if name == "fluxgate-redis" else None
            doc = fluxgate_doc(ports[key], c, s, [], ticks=t, redis_url=url)
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            env = {**os.environ, "FLUXGATE_LOG": level, "FLUXGATE_LOG_STYLE": "never"}
            env.pop("RUNTIME_DIRECTORY", None)
            err: Any = subprocess.DEVNULL if level == "TRACE" else self._log(name)
            supervisor = str(Path(sys.executable).parent / "fluxgate-supervisor")
            proc = self._spawn([supervisor, "start", "--config", str(config), "--workers", "2"],
                               err, env=env)  # fmt: skip
            self.systems[name] = System(
                name, ports[key], proxied, ports[key], "/sse", proc, config,
                {"canned": c, "sse": s, "ticks": t}, ticks_port=ports[key], ticks_prefix="/ticks",
            )  # fmt: skip
        # Limits counted in Redis: that instance, with the key under a policy.
        self.systems["fluxgate-redis"].key = LIMITS_KEY
        # The pool and local limits: the same Fluxgate process, its pooled route or
        # its key under a policy.
        fg = self.systems["fluxgate"]
        self.systems["fluxgate-limits"] = System(
            "fluxgate-limits", fg.port, fg.json_path, fg.sse_port, "/sse", fg.proc,
            fg.config_path, fg.ports, LIMITS_KEY, fg.ticks_port, fg.ticks_prefix,
        )  # fmt: skip
        self.systems["fluxgate-pool"] = System(
            "fluxgate-pool", fg.port, fg.json_path.replace("/openai/", "/pooled/", 1), fg.sse_port,
            "/sse", fg.proc, fg.config_path, fg.ports, CLIENT_KEY, fg.ticks_port, fg.ticks_prefix,
        )  # fmt: skip
        for system in self.systems.values():
            _wait(system.proc, system.port, system.json_path)
        for name in ("fluxgate", "fluxgate-trace", "fluxgate-redis"):
            wait_workers(self.systems[name])
        return self.systems

    def stderr_text(self, name: str) -> str:
        path = self.tmp / f"{name}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid_of(self, program: str) -> int:
        """The pid of the server started from `program` (e.g. "redis-server")."""
        for proc, _ in self.procs:
            args = proc.args
            if isinstance(args, list) and program in str(args[0]):
                return proc.pid
        raise LookupError(program)

    def dead(self) -> list[str]:
        """Servers that have exited, with their exit codes."""
        return [f"{p.args!r} exited {p.returncode}" for p, _ in self.procs if p.poll() is not None]

    def close(self, keep: bool = False) -> None:
        """Stop everything; `keep` leaves the temp dir (configs, logs) for a post-mortem."""
        for proc, sig in reversed(self.procs):
            stop(proc, sig)
        self.procs.clear()
        for f in self._files:
            f.close()
        self._files.clear()
        if keep:
            print(f"configs and logs kept in {self.tmp}", file=sys.stderr)
            self.keep = True
        elif not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
