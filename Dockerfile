# Fluxgate as a container image: the supervisor (gunicorn's master) runs in the
# foreground as PID 1 and forks the workers; the YAML is mounted read-only.
#
#   docker build -t fluxgate:latest .
#   docker run -d -p 8080:8080 -v "$(pwd)/config:/etc/fluxgate:ro" fluxgate:latest
#
# Mount the directory, not the file: see "Container" in README.md.

# The same image from a registry mirror: --build-arg BASE=mirror.example/debian:bookworm-slim
ARG BASE=docker.io/library/debian:bookworm-slim

# Debian's python3 is 3.11 on bookworm, the version the project supports and is
# tested with; ca-certificates lets aiohttp verify the providers' TLS certificates.
FROM ${BASE} AS python
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Build stage: wheels for the project and every dependency, then a venv made of them.
FROM python AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# Wheels come from one of two places:
# - wheels/ in the build context, when it holds them (the project's own wheel
#   included): made beforehand with `pip wheel . -c constraints.txt -w wheels`
#   on a Debian bookworm / Python 3.11 host. The build then needs no access to
#   PyPI, which suits air-gapped builds and builders whose pip cannot reach the
#   index; `make image-test` builds this way.
# - otherwise pip builds them here from PyPI, pinned to constraints.txt (the
#   versions the test suite last passed with), as for any ordinary build.
COPY wheels/ /wheels/
COPY pyproject.toml constraints.txt README.md LICENSE /src/
COPY fluxgate/ /src/fluxgate/
COPY supervisor/ /src/supervisor/
# pip lives in a throwaway venv and installs into /opt/fluxgate through
# --python, so the image's venv carries no pip of its own.
RUN python3 -m venv /tmp/pip \
    && if ! ls /wheels/*.whl >/dev/null 2>&1; then \
           /tmp/pip/bin/pip wheel --no-cache-dir -c /src/constraints.txt -w /wheels /src; \
       fi \
    && python3 -m venv --without-pip /opt/fluxgate \
    && /tmp/pip/bin/pip --python /opt/fluxgate/bin/python install --no-cache-dir \
           --no-index --find-links /wheels fluxgate-gateway \
    && /opt/fluxgate/bin/fluxgate-supervisor --version

# Runtime: Python, the venv, an unprivileged user; no compiler, no pip.
FROM python
COPY --from=build /opt/fluxgate /opt/fluxgate
# A fixed numeric uid, so a mounted config can be made readable to it
# (chown/chgrp 10001) and Kubernetes' runAsNonRoot can verify it.
RUN useradd --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin fluxgate \
    && install -d -m 0755 /etc/fluxgate
ENV PATH=/opt/fluxgate/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
# The master reads an optional gunicorn.conf.py from its working directory:
# here that is the mounted config directory.
WORKDIR /etc/fluxgate
EXPOSE 8080
# Assumes the default bind_address port (8080); with another port, override it
# (docker run --health-cmd, or the orchestrator's own probe).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/fluxgate/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/_fluxgate/health', timeout=4)"]
# Exec form: the supervisor itself is PID 1 and gets SIGTERM (docker stop) and
# SIGHUP (docker kill -s HUP) directly; it installs handlers for both and
# reaps its children, so no init shim is needed. The command is split so that
# other subcommands run the same way:
#   docker run --rm -v ...:/etc/fluxgate:ro fluxgate check --config /etc/fluxgate/fluxgate.yaml
ENTRYPOINT ["/opt/fluxgate/bin/fluxgate-supervisor"]
CMD ["start", "--config", "/etc/fluxgate/fluxgate.yaml"]
