"""Run the real `fluxgate-supervisor start` as a child process for tests.

The process is started on a YAML file in a temporary directory, on a free
loopback port; its log lines are read by a thread so tests can wait for a
line (an event) instead of sleeping, and every line is kept for the secret
scan. All waits are bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

SUPERVISOR = str(Path(sys.executable).parent / "fluxgate-supervisor")
# The master's "workers serve" event, in the text or the JSON log format.
SERVING = r'^\S+\s+\S+ serving address=|"message": "serving"'
# Every log line any supervisor printed in this test process, for the secret scan.
ALL_LOG_LINES: list[str] = []


DEFAULT_PORT = 8080  # fluxgate.config.DEFAULT_BIND_ADDRESS: where the safe defaults listen


@contextlib.contextmanager
def default_port_lock(timeout: float = 120) -> Iterator[None]:
    """Held by a test whose supervisor serves the safe defaults (0.0.0.0:8080), so
    that two such tests (parallel xdist workers) do not race for the port."""
    with open(Path(tempfile.gettempdir()) / "fluxgate-tests-port-8080.lock", "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("port 8080 lock held too long") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Supervisor:
    def __init__(
        self,
        config_dir: Path,
        config: dict[str, Any] | str,
        *,
        workers: int | None = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.config_path = config_dir / "fluxgate.yaml"
        # None: no --workers flag, the YAML decides; tests then set `workers` to expect.
        self.workers_flag = workers
        self.workers = workers or 1
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._env = {**os.environ, "FLUXGATE_LOG_STYLE": "never", **(env or {})}
        self._args = args or []
        if isinstance(config, dict):
            config = self.with_bind(config)
        self.write_config(config)
        self.proc: subprocess.Popen[str] | None = None

    # Config file

    def with_bind(self, config: dict[str, Any]) -> dict[str, Any]:
        server = dict(config.get("server") or {})
        server.setdefault("bind_address", f"127.0.0.1:{self.port}")
        return {**config, "server": server}

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the file atomically, as an operator's tooling would."""
        text = config if isinstance(config, str) else yaml.safe_dump(self.with_bind(config))
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # Process

    def start(self, wait: bool = True) -> Supervisor:
        cmd = [SUPERVISOR, "start", "--config", str(self.config_path), *self._args]
        if self.workers_flag is not None:
            cmd += ["--workers", str(self.workers_flag)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._env,
            cwd=self.config_path.parent,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_for_log(SERVING, timeout=15)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                ALL_LOG_LINES.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = 5.0, start: int = 0) -> str:
        """The first line (from index `start`) matching `pattern`; fails after `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                exited = self.proc is not None and self.proc.poll() is not None
                if remaining <= 0 or exited:
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no log line matching {pattern!r}; last lines:\n{tail}")
                self._cond.wait(min(remaining, 0.5))

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def worker_generations(self) -> dict[int, int]:
        """Each worker's config generation, read from its title `fluxgate: worker N [gen G]`."""
        gens = {}
        for pid in self.worker_pids():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "[gen " in title:
                gens[pid] = int(title.split("[gen ", 1)[1].split("]", 1)[0])
        return gens

    def wait_for_generation(self, generation: int, timeout: float = 5.0) -> None:
        """Until every worker (and only `self.workers` of them) runs `generation`."""

        def converged() -> bool:
            gens = self.worker_generations()
            return len(gens) == self.workers and set(gens.values()) == {generation}

        assert wait_until(converged, timeout=timeout, interval=0.002), self.worker_generations()

    # HTTP helpers

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_fluxgate/health", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()


def signals_taken(pid: int) -> bool:
    """No signal is pending for process `pid`: any signal sent to it so far has been
    delivered (handled, ignored, or fatal). Gone counts as taken."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["SigPnd"], 16) == 0 and int(fields["ShdPnd"], 16) == 0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout`; for state with no event to wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
