"""sd_notify client: exact datagrams on a real AF_UNIX socket, silence without one."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxgate_supervisor import sdnotify


@pytest.fixture(autouse=True)
def _no_claimed_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test starts from "address comes from the environment".
    monkeypatch.setattr(sdnotify, "_claimed", None)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_sends_ready(listener: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert listener.recv(4096) == b"READY=1"


def test_stopping_sends_stopping(listener: socket.socket) -> None:
    assert sdnotify.stopping() is True
    assert listener.recv(4096) == b"STOPPING=1"


def test_status_sends_one_line(listener: socket.socket) -> None:
    assert sdnotify.status("generation 3\nserving") is True
    assert listener.recv(4096) == b"STATUS=generation 3 serving"


def test_mainpid_sends_pid(listener: socket.socket) -> None:
    assert sdnotify.mainpid(4242) is True
    assert listener.recv(4096) == b"MAINPID=4242"


def test_reloading_sends_monotonic_timestamp(listener: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    datagram = listener.recv(4096)
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", datagram)
    assert match is not None, datagram
    assert before <= int(match.group(1)) <= after


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fluxgate-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_unset_socket_is_a_silent_no_op() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.reloading() is False


def test_unreachable_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.ready() is False


def test_claimed_socket_leaves_environment_but_still_works(listener: socket.socket) -> None:
    address = os.environ["NOTIFY_SOCKET"]
    assert sdnotify.claim_socket() == address
    # gunicorn's Arbiter and the workers must no longer see it.
    assert "NOTIFY_SOCKET" not in os.environ
    assert sdnotify.ready() is True
    assert listener.recv(4096) == b"READY=1"
