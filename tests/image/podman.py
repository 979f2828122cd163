"""Podman plumbing for the container image test: base image, wheels, build, one container.

There is no Docker daemon and no registry access where this runs, so the
standard Dockerfile is built with podman, and its base image
(debian:bookworm-slim) is made locally with debootstrap from the Debian mirror
apt already uses, then imported under its usual name; that is done once and
kept. Every command here is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/fluxgate:test"
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"


def podman_command() -> list[str]:
    """`podman` with the global options this kind of machine needs.

    runc, not crun: the sandbox refuses crun's cgroup setup. cgroupfs: there is
    no systemd to manage the container's cgroups.
    """
    cmd = ["podman"]
    if shutil.which("runc"):
        cmd += ["--runtime", "runc"]
    return [*cmd, "--cgroup-manager", "cgroupfs"]


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*podman_command(), *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:3])}… exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def unavailable_reason() -> str | None:
    """Why podman cannot run here at all, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/image-tools installs it on Debian)"
    try:
        info = podman("info", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer within 60 s"
    if info.returncode != 0:
        return f"`podman info` fails: {info.stderr.strip()[-500:]}"
    return None


def apt_mirror() -> str:
    """The Debian mirror apt is configured with for `bookworm`, for debootstrap."""
    sources = Path("/etc/apt/sources.list.d")
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        for uri, suite in _one_line_entries(path):
            if suite == SUITE:
                return uri
    for path in sorted(sources.glob("*.sources")):
        for uri, suite in _deb822_entries(path):
            if suite == SUITE:
                return uri
    return DEFAULT_MIRROR


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _one_line_entries(path: Path) -> list[tuple[str, str]]:
    entries = []
    for line in _read(path).splitlines():
        # "deb [arch=amd64 signed-by=…] URI SUITE COMPONENT…"
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            entries.append((parts[1], parts[2]))
    return entries


def _deb822_entries(path: Path) -> list[tuple[str, str]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", _read(path)):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        uris, suites = fields.get("uris", "").split(), fields.get("suites", "").split()
        entries += [(uri, suite) for uri in uris for suite in suites]
    return entries


def ensure_base_image(log: Callable[[str], None]) -> None:
    """Make debian:bookworm-slim locally unless podman already has it.

    Without debootstrap (or root) nothing is done here and `podman build`
    pulls the base from the registry as usual.
    """
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        log(f"{BASE_IMAGE} not present and no debootstrap as root: podman build will pull it")
        return
    mirror = apt_mirror()
    log(f"making {BASE_IMAGE} with debootstrap from {mirror}")
    with tempfile.TemporaryDirectory(prefix="fluxgate-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}")
        # What the real slim image leaves out too: downloaded packages and lists.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [*podman_command(), "import", "-", BASE_IMAGE],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"podman import failed: {imported.stderr}")


def build_image(log: Callable[[str], None]) -> None:
    """Build the Dockerfile at the top of the repository from wheels made on this host.

    pip inside a podman build cannot verify the package index's certificate
    here, so the wheels are made on the host (Debian bookworm, Python 3.11:
    the image's interpreter) into wheels/, which the Dockerfile prefers to
    PyPI. They are removed afterwards so that a later build from this tree
    does not install stale ones.
    """
    wheels = ROOT / "wheels"
    for wheel in wheels.glob("*.whl"):
        wheel.unlink()
    try:
        started = time.monotonic()
        result = subprocess.run(
            # async-timeout too: redis-py needs it below Python 3.11.3, which
            # bookworm's python3 (the image's) is, and this host's may not be.
            [sys.executable, "-m", "pip", "wheel", "--quiet", ".", "async-timeout",
             "-c", "constraints.txt", "-w", str(wheels)],
            cwd=ROOT,
            # A fixed time stamp inside the project's wheel: the same sources
            # give the same bytes, so podman's layer cache holds and an
            # unchanged tree rebuilds nothing (nor leaves new layers behind).
            env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            output = result.stdout[-3000:] + result.stderr[-3000:]
            raise AssertionError(f"pip wheel failed:\n{output}")
        log(f"wheels built in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        # --format docker: the OCI image format has no HEALTHCHECK.
        podman(
            "build", "--isolation", "chroot", "--network", "host", "--format", "docker",
            "-t", IMAGE, str(ROOT),
            timeout=1200,
        )  # fmt: skip
        log(f"image built in {time.monotonic() - started:.1f} s")
    finally:
        for wheel in wheels.glob("*.whl"):
            wheel.unlink()


def image_config() -> dict[str, object]:
    """The built image's config (User, Entrypoint, …), with its Healthcheck."""
    config: dict[str, object] = json.loads(
        podman("image", "inspect", IMAGE, "--format", "{{json .Config}}").stdout
    )
    # The OCI view that .Config shows has no health check; podman keeps it apart.
    config["Healthcheck"] = json.loads(
        podman("image", "inspect", IMAGE, "--format", "{{json .HealthCheck}}").stdout
    )
    return config
