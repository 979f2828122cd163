"""Optional process-level tuning for `fluxgate-supervisor start`.

The supervisor reads a `gunicorn.conf.py` from its working directory, as
gunicorn does, after its own defaults (shown here). Only process management
belongs here; `bind` and `workers` come from the YAML (`server.bind_address`,
`server.workers`) and are ignored if set in this file. The graceful shutdown
bound follows `upstreams.request_timeout_ms`; setting `graceful_timeout` here
overrides it until the next config change.
"""

# Seconds a worker may go without a heartbeat before the master replaces it.
# Workers beat once a second from their event loop, draining included.
timeout = 30

# Seconds an idle client keep-alive connection is kept open.
keepalive = 15

# Listen backlog of the shared socket.
backlog = 2048

# gunicorn's control socket (a thread and a unix socket in the master) is
# not used by Fluxgate.
control_socket_disable = True
