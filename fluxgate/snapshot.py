"""The published config generation: how the master hands a validated config to workers.

The master writes `{"generation": N, "doc": {...}}` as JSON, atomically
(temporary file, fsync, rename, fsync of the directory), then signals the
workers. A worker reads only this file, never the YAML, so it can only ever
apply a document the master accepted, and it applies only a generation
higher than the one it has. The file holds provider keys: it is created
0600 in a directory only the master's user can enter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

SNAPSHOT_NAME = "config.json"


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    doc: dict[str, Any]


def write_snapshot(path: str, generation: int, doc: dict[str, Any]) -> None:
    directory = os.path.dirname(path) or "."
    data = json.dumps({"generation": generation, "doc": doc}).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_snapshot(path: str) -> Snapshot:
    """Raises OSError or ValueError when there is no readable snapshot."""
    with open(path, "rb") as f:
        data = json.loads(f.read())
    generation = data["generation"]
    doc = data["doc"]
    if not isinstance(generation, int) or not isinstance(doc, dict):
        raise ValueError("malformed config snapshot")
    return Snapshot(generation, doc)


def snapshot_mtime(path: str) -> int:
    """A cheap change marker for the periodic safety-net check; 0 when absent."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0
