"""Losing no request it could have served (hardening): a worker SIGKILLed under load,
the config file flapping between valid and invalid under load, fuzzed config files
written under a running supervisor, and a config file caught half-written.

Already proven elsewhere and not repeated here:
- test_supervisor_processes.py: a SIGKILLed worker is replaced on the current
  generation and sequential requests after the kill all succeed; a burst of
  SIGHUPs kills no worker;
- test_supervisor_reload.py: an invalid file keeps the old config and logs every
  problem; a stream survives ten reloads; deletion keeps serving;
- test_validation.py / test_configfile.py: hypothesis fuzzing of the loader itself
  (arbitrary documents, mutations of the reference config, byte edits, random
  bytes) never fails with anything but a config or ConfigInvalid; alias bombs,
  deep nesting, oversize files, not-UTF-8.

Here the same inputs go through a RUNNING supervisor while clients keep sending
requests, and the claim is end to end: nothing a valid config would serve fails.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.auth import AuthError, authenticate
from fluxgate.config import Config, build_config
from fluxgate.configfile import ConfigInvalid, parse_config_bytes
from fluxgate.routing import match
from fluxgate_supervisor.watcher import ConfigWatcher
from tests import rawhttp
from tests.conftest import CLIENT_KEY, LIMITED_KEY, proxy_config
from tests.supervisor_process import Supervisor, wait_until

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}

# --- a load generator that knows which worker served each request ------------------------


@dataclass(frozen=True)
class Outcome:
    conn: int  # serial number of the client connection
    opened: float  # monotonic time connect() returned
    pid: int | None  # the worker serving that connection (None: not known yet)
    started: float
    ended: float
    error: str | None  # None: a complete, correct response


Request = Callable[[rawhttp.Conn, int], str | None]  # returns an error or None


def models_request(key: str = CLIENT_KEY) -> Request:
    def run(conn: rawhttp.Conn, port: int) -> str | None:
        resp = conn.request("GET", "/openai/v1/models", [rawhttp.host(port), rawhttp.bearer(key)])
        if resp.status != 200:
            return f"status {resp.status}: {resp.body[:200]!r}"
        if not resp.complete or json.loads(resp.body).get("object") != "list":
            return "incomplete"
        return None

    return run


def anthropic_request() -> Request:
    def run(conn: rawhttp.Conn, port: int) -> str | None:
        resp = conn.request(
            "GET", "/anthropic/v1/models", [rawhttp.host(port), ("x-api-key", LIMITED_KEY)]
        )
        if resp.status != 200:
            return f"status {resp.status}: {resp.body[:200]!r}"
        return None if resp.complete else "incomplete"

    return run


def sse_request(events: int = 4, interval_ms: int = 5) -> Request:
    """A short stream, so that requests are in flight most of the time."""

    def run(conn: rawhttp.Conn, port: int) -> str | None:
        target = f"/openai/sse?events={events}&interval_ms={interval_ms}"
        resp = conn.request("GET", target, [rawhttp.host(port), rawhttp.bearer(CLIENT_KEY)])
        if resp.status != 200:
            return f"status {resp.status}: {resp.body[:200]!r}"
        if not resp.complete or resp.body.count(b"data: event") != events:
            return "incomplete"
        return None

    return run


class Load:
    """`threads` clients, each on a keep-alive connection: it first asks
    /_fluxgate/health which worker serves it (when `identify`), then sends up to
    `per_connection` requests (cycling through `requests`), then reconnects. A failed
    request ends its connection; the client reconnects and goes on."""

    def __init__(
        self,
        sup: Supervisor,
        requests: list[Request],
        threads: int = 8,
        per_connection: int = 10,
        identify: bool = True,
    ) -> None:
        self.sup = sup
        self.requests = requests
        self.per_connection = per_connection
        self.identify = identify
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        assert not any(t.is_alive() for t in self._threads), "a load client hung"

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def served_by(self, pid: int) -> int:
        return sum(1 for o in self.snapshot() if o.pid == pid and o.error is None)

    def wait_served(self, count: int, pids: list[int], timeout: float = 10.0) -> None:
        """Until each of `pids` has served `count` requests (bounded)."""
        assert wait_until(
            lambda: all(self.served_by(pid) >= count for pid in pids), timeout=timeout
        ), {pid: self.served_by(pid) for pid in pids}

    def _run(self) -> None:
        port = self.sup.port
        cycle = itertools.cycle(self.requests)
        while not self._stop.is_set():
            opened = time.monotonic()
            try:
                conn = rawhttp.Conn(port, timeout=10)
            except OSError as exc:
                self._record(Outcome(0, opened, None, opened, time.monotonic(), f"connect {exc!r}"))
                self._stop.wait(0.01)
                continue
            cid = next(self._ids)
            opened = time.monotonic()
            pid: int | None = None
            try:
                for i in range(self.per_connection + self.identify):
                    if self._stop.is_set():
                        break
                    started = time.monotonic()
                    error: str | None
                    try:
                        if i == 0 and self.identify:
                            resp = conn.request("GET", "/_fluxgate/health", [rawhttp.host(port)])
                            pid = int(json.loads(resp.body)["pid"])
                            error = None if resp.status == 200 else f"status {resp.status}"
                        else:
                            error = next(cycle)(conn, port)
                    except (OSError, ConnectionError, ValueError, IndexError) as exc:
                        error = f"connection: {exc!r}"
                    self._record(Outcome(cid, opened, pid, started, time.monotonic(), error))
                    if error is not None:
                        break
            finally:
                conn.close()


def is_connection_loss(error: str) -> bool:
    """The connection died under the request (reset, EOF, a cut stream), as opposed to
    an HTTP error status, which would be the proxy answering wrongly."""
    return error.startswith("connection") or error == "incomplete"


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.fixture
def sup(up: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]) -> Supervisor:
    """Two workers of a supervisor of its own for each test (they get killed and reloaded)."""
    proc: Supervisor = make_supervisor(proxy_config(up.url), workers=2)
    proc.wait_for_generation(1)
    return proc


# --- a worker SIGKILLed under concurrent load -----------------------------------------------


def test_worker_sigkill_under_load_fails_only_requests_on_the_killed_workers_connections(
    sup: Supervisor,
) -> None:
    """12 clients on keep-alive connections, each knowing which worker serves it, send
    short SSE streams and plain requests while one of the two workers is SIGKILLed.

    What may fail, honestly: the requests on connections the killed worker had
    accepted (the one in flight at the kill, or the next one sent on that dead
    connection before the client sees it die); at most one per connection, and only
    as a lost connection, never as an error status. What must not fail: anything on
    the other worker's connections, and anything on a connection opened after the
    killed worker was gone (the listening socket is shared: the kernel hands new
    connections only to live workers). The replacement then serves too."""
    victim, survivor = sup.worker_pids()
    with Load(sup, [sse_request(), models_request()], threads=12) as load:
        load.wait_served(20, [victim, survivor])
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: process_gone(victim), timeout=5)
        gone = time.monotonic()
        assert wait_until(lambda: len(sup.worker_pids()) == 2 and victim not in sup.worker_pids(),
                          timeout=10)  # fmt: skip
        sup.wait_for_generation(1, timeout=10)
        (replacement,) = set(sup.worker_pids()) - {survivor}
        load.wait_served(20, [replacement])
        load.wait_served(load.served_by(survivor) + 20, [survivor])
    outcomes = load.snapshot()

    lost = [o for o in outcomes if o.error is not None]
    in_flight = [o for o in lost if o.started <= killed]
    print(f"{len(outcomes)} requests, {len(lost)} lost with the killed worker's connections "
          f"({len(in_flight)} in flight at the kill, {len(lost) - len(in_flight)} sent on a "
          f"connection it had accepted); replaced by {replacement} in "
          f"{(gone - killed) * 1000:.0f} ms + respawn")  # fmt: skip
    for o in lost:
        assert o.pid in (victim, None), f"failure on the surviving worker's connection: {o}"
        assert o.opened < gone, f"failure on a connection opened after the kill: {o}"
        assert o.error is not None and is_connection_loss(o.error), o
        if o.pid is None:  # the health probe itself was lost: it was sent before the death
            assert o.started < gone, o
    assert len({o.conn for o in lost}) == len(lost), "a connection failed twice"
    assert len(lost) <= 12
    after = [o for o in outcomes if o.opened > gone]
    assert after and all(o.error is None for o in after)
    assert {o.pid for o in after} >= {survivor, replacement}
    assert all(o.error is None for o in outcomes if o.pid in (survivor, replacement))


# --- the config file flapping between valid and invalid, under load ------------------------


def _dump(doc: dict[str, Any]) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False).encode()


def without_client_key(doc: dict[str, Any]) -> dict[str, Any]:
    """What a partial application would serve: CLIENT_KEY gone (so requests fail)."""
    doc = json.loads(json.dumps(doc))
    doc["api_keys"]["static"] = [{"id": "intruder", "key": "fg-would-be-applied-key"}]
    return doc


def invalid_variants(valid: dict[str, Any]) -> list[tuple[str, bytes | None]]:
    """Invalid files, each of which would break the load if any part of it were applied.
    None: the file is deleted."""
    broken = without_client_key(valid)
    unreachable = json.loads(json.dumps(valid))
    unreachable["upstreams"]["openai"]["target_url"] = "http://127.0.0.1:9"
    unreachable["upstreams"]["request_timeout_ms"] = 0
    full = json.loads(json.dumps(broken))
    full["server"]["max_connections"] = 0
    ordered = _dump({k: valid[k] for k in ("version", "server", "upstreams", "api_keys")})
    return [
        ("unknown top-level key", _dump({**broken, "upstream": {}})),
        ("YAML syntax error", _dump(broken) + b"upstreams: [unclosed\n"),
        ("target unreachable and timeout 0", _dump(unreachable)),
        ("max_connections 0", _dump(full)),
        ("version 2", _dump({**broken, "version": 2})),
        ("duplicate api_keys (YAML would keep the last)",
         ordered + b"api_keys:\n  static:\n  - {id: x, key: fg-duplicate-key-1}\n"),
        ("truncated mid-key", ordered[: ordered.index(b"target_url") + 6]),
        ("not UTF-8", b"# \xff\xfe\n" + _dump(broken)),
        ("empty", b""),
        ("deleted", None),
        ("a list, not a mapping", b"- version: 1\n"),
        ("alias bomb", b'version: 1\na: &a ["x","x","x","x","x","x","x","x","x"]\n'
         + b"".join(b"%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n"
                    % ((c + 1, c + 1) + (c,) * 9) for c in range(ord("a"), ord("j")))),
    ]  # fmt: skip


def write(path: Path, data: bytes | None, in_place: bool) -> None:
    if data is None:
        path.unlink()
    elif in_place:  # truncate and write: the file is briefly empty, then whole
        with open(path, "wb") as f:
            f.write(data)
    else:  # what deployment tools do: a temporary file renamed over it
        tmp = path.with_name(".fluxgate.yaml.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


@pytest.mark.slow
def test_config_flapping_100_times_under_load_fails_no_request(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """100 cycles of a valid file (a new generation each time) then an invalid one
    (twelve kinds, each harmful if partly applied), alternately written in place and
    by rename, while clients send requests that every valid version serves. Each write
    is awaited in the log (applied / rejected / unavailable) before the next."""
    workers = sorted(sup.worker_pids())
    base = sup.with_bind(proxy_config(up.url))
    for _, data in invalid_variants(base):
        if data is not None:
            with pytest.raises(ConfigInvalid):
                parse_config_bytes(data)
    generation = 1
    with Load(sup, [models_request(), anthropic_request()], threads=6, identify=False) as load:
        for i in range(100):
            valid = json.loads(json.dumps(base))
            valid["api_keys"]["static"].append({"id": f"flap{i}", "key": f"fg-flap-key-{i:03d}"})
            mark = sup.mark()
            write(sup.config_path, _dump(valid), in_place=i % 2 == 0)
            generation += 1
            sup.wait_for_log(rf"config applied .*generation={generation}\b", start=mark)
            _, data = invalid_variants(valid)[i % 12]
            mark = sup.mark()
            write(sup.config_path, data, in_place=i % 2 == 1)
            verdict = "config file unavailable" if data is None else "config rejected"
            sup.wait_for_log(verdict, start=mark)
        sup.wait_for_generation(generation)
        mark = sup.mark()
        sup.signal(signal.SIGHUP)  # a last barrier: the invalid file is still rejected
        sup.wait_for_log(r"config rejected", start=mark)
    outcomes = load.snapshot()
    failed = [o for o in outcomes if o.error is not None]
    print(f"{len(outcomes)} requests during 100 valid/invalid flaps: {len(failed)} failed")
    assert failed == []
    assert len(outcomes) >= 1000
    assert sorted(sup.worker_pids()) == workers  # reloads in place: no worker restarted
    auth = {"Authorization": "Bearer fg-flap-key-099"}
    assert sup.request("GET", "/openai/v1/models", auth)[0] == 200
    intruder = {"Authorization": "Bearer fg-would-be-applied-key"}
    assert sup.request("GET", "/openai/v1/models", intruder)[0] == 401


# --- fuzzed files written under a running supervisor ---------------------------------------


def serves_like(config: Config, base: Config) -> bool:
    """Whether `config` still serves the load exactly as `base` does (CLIENT_KEY to the
    same openai upstream, same deadline, same listener and limits)."""
    if config.server != base.server or config.request_timeout_ms != base.request_timeout_ms:
        return False
    try:
        principal = authenticate(config, [(b"authorization", b"Bearer " + CLIENT_KEY.encode())])
    except AuthError:
        return False
    (expected,) = [u for u in base.upstreams if u.name == "openai"]
    got = match(principal.routes, b"/openai/v1/models")
    return got is not None and (got.origin, got.base_path, got.credential, got.prefix) == (
        expected.origin, expected.base_path, expected.credential, expected.prefix
    )  # fmt: skip


text = st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.floats() | text
KEYS = [
    "version", "server", "upstreams", "api_keys", "static", "jwt", "id", "key",
    "request_path", "target_url", "api_key", "auth_header", "request_timeout_ms",
    "max_connections",
]  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | text, inner, max_size=4)
    ),
    max_leaves=12,
)
# Valid pieces, so that a fair share of the mutated documents is valid and applied.
good_upstreams = st.fixed_dictionaries(
    {
        "request_path": st.sampled_from(["/new", "/other/v1", "/"]),
        "target_url": st.sampled_from(["http://127.0.0.1:9", "https://h.invalid/base"]),
    },
    optional={
        "api_key": st.sampled_from(["k", "ok-key"]),
        "auth_header": st.sampled_from(["x-api-key", "api-key"]),
    },
)
good_keys = st.fixed_dictionaries(
    {"key": st.sampled_from(["fg-another-key-1", "fg-another-key-2"])},
    optional={"id": st.sampled_from(["another", "more"]), "upstreams": st.just(["openai"])},
)
upstream_specs = good_upstreams | st.fixed_dictionaries(
    {},
    optional={
        "request_path": st.sampled_from(["/new", "/openai", "/", "rel", "/p?q", "", "/a:1"]) | text,
        "target_url": st.sampled_from(
            ["http://127.0.0.1:9", "https://h.invalid/b", "ftp://x", "no url"]
        )
        | values,
        "api_key": st.sampled_from(["k", "", " ", "ok-key"]) | values,
        "auth_header": st.sampled_from(["x-api-key", "connection", "host", "bad name"]) | values,
        "typo": values,
    },
)
key_entries = good_keys | st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["ci", "limited", "new", ""]) | values,
        "key": st.sampled_from([CLIENT_KEY, "short", "a-secret-of-at-least-32-bytes!!!!", ""])
        | values,
        "upstreams": st.sampled_from([["openai"], ["nope"], [], "openai"]) | values,
    },
)


SECTIONS = ("server", "upstreams", "api_keys")  # kept: they hold CLIENT_KEY's route
GOOD_CHANGES = ["add an upstream", "add a key", "add a jwt key", "rotate a provider key"]
ANY_CHANGES = ["top", "version", "anthropic", "anthropic.field", "upstream", "static",
               "limited", "jwt"]  # fmt: skip


@st.composite
def mutated_documents(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """The base document changed in 1–3 places that leave CLIENT_KEY's route alone, plus a
    fresh probe key: if the whole document is valid the probe must work, else it must not
    (a partially applied document would let it in)."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([*GOOD_CHANGES, *GOOD_CHANGES, *ANY_CHANGES]))
        upstreams, keys = doc["upstreams"], doc["api_keys"]
        if where == "add an upstream":
            upstreams[draw(st.sampled_from(["new", "other"]))] = draw(good_upstreams)
        elif where == "add a key":
            keys["static"].append(draw(good_keys))  # `static` itself is never replaced
        elif where == "add a jwt key" and isinstance(keys["jwt"], list):
            keys["jwt"].append({"id": draw(st.sampled_from(["ops", "ci2"])),
                                "key": "another-jwt-secret-of-32-bytes-or-more"})  # fmt: skip
        elif where == "rotate a provider key" and isinstance(upstreams["anthropic"], dict):
            upstreams["anthropic"]["api_key"] = draw(st.sampled_from(["sk-ant-2", "sk-ant-3"]))
        elif where == "top":  # an unknown or misplaced key, or `version` replaced
            name = draw((st.sampled_from(KEYS) | text).filter(lambda k: k not in SECTIONS))
            doc[name] = draw(values)
        elif where == "version":
            doc["version"] = draw(st.sampled_from([1, 2, "1", 1.0, None]) | values)
        elif where == "anthropic":
            upstreams["anthropic"] = draw(upstream_specs | values)
        elif where == "anthropic.field" and isinstance(upstreams["anthropic"], dict):
            upstreams["anthropic"][draw(st.sampled_from(KEYS) | text)] = draw(values)
        elif where == "upstream":
            upstreams[draw(st.sampled_from(["new", "other", "request_timeout"]) | text)] = draw(
                upstream_specs | values
            )
        elif where == "static":
            keys["static"].append(draw(key_entries | values))
        elif where == "limited":
            keys["static"][1] = draw(key_entries | values)
        elif where == "jwt":
            keys["jwt"] = draw(st.lists(key_entries | values, max_size=2) | values)
    doc["api_keys"]["static"].append({"id": "probe", "key": PROBE})
    return doc


# Replaced by a fresh key in every file written: hypothesis may replay an example, and
# a probe key must only ever work through the one document that carries it.
PROBE = "fg-probe-placeholder"


@pytest.mark.slow
def test_fuzzed_config_files_under_a_running_supervisor_apply_whole_or_not_at_all(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """Hypothesis writes 40 files (mutated documents carrying a probe key, random
    documents, random bytes, byte edits of a valid file) under a supervisor with two
    workers while clients keep sending requests with CLIENT_KEY.

    For each: the generation advances exactly when the in-process loader accepts the
    bytes, and then on every worker; an invalid file changes nothing (same generation
    everywhere, its probe key refused); the master never crashes; the load never sees
    a failure. Valid documents that would change how CLIENT_KEY is served (another
    listener, another deadline...) are skipped: they are not what this test is about."""
    base_doc = sup.with_bind(proxy_config(up.url))
    base_bytes = _dump(base_doc)
    mutated = mutated_documents(base_doc).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True).encode()
    )
    files = st.one_of(
        mutated,
        mutated,
        mutated,
        values.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
        st.binary(max_size=400),
        st.tuples(st.integers(0, len(base_bytes)), st.integers(0, 6), st.binary(max_size=6)).map(
            lambda e: base_bytes[: e[0]] + e[2] + base_bytes[e[0] + e[1] :]
        ),
    )
    workers = sorted(sup.worker_pids())
    base = build_config(base_doc)
    state = {"generation": 1, "valid": 0, "invalid": 0}
    last = [sup.config_path.read_bytes()]  # what the file holds
    applied = [last[0]]  # what the serving generation was read from
    probes: list[str] = []
    serial = itertools.count(1)

    # No shrinking: every example changes the running supervisor, so a replay is not
    # the same experiment; the failing file is printed as it was.
    @settings(
        max_examples=40,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(files)  # fmt: skip
    def write_one(data: bytes) -> None:
        probe = f"fg-probe-{next(serial):06d}"
        data = data.replace(PROBE.encode(), probe.encode())
        # The same bytes as the file holds, or as the serving generation came from,
        # are no change: nothing is logged, nothing to wait for.
        assume(data not in (last[0], applied[0]))
        try:
            config: Config | None = parse_config_bytes(data).config
        except ConfigInvalid:
            config = None
        assume(config is None or serves_like(config, base))
        carries_probe = any(e.get("key") == probe for e in _static_entries(data))
        mark = sup.mark()
        write(sup.config_path, data, in_place=False)
        last[0] = data
        if config is not None:
            applied[0] = data
            state["generation"] += 1
            state["valid"] += 1
            sup.wait_for_log(rf"config applied .*generation={state['generation']}\b", start=mark)
        else:
            state["invalid"] += 1
            sup.wait_for_log(r"config rejected", start=mark)
        sup.wait_for_generation(state["generation"])
        if carries_probe:
            probes.append(probe)
            status = sup.request("GET", "/openai/v1/models", {"x-api-key": probe})[0]
            assert status == (200 if config is not None else 401), (status, data)

    with Load(sup, [models_request()], threads=4, identify=False) as load:
        write_one()
    outcomes = load.snapshot()
    failed = [o for o in outcomes if o.error is not None]
    print(f"fuzz: {state['valid']} valid and {state['invalid']} invalid files, each applied "
          f"whole or not at all; {len(outcomes)} requests, {len(failed)} failed")  # fmt: skip
    assert failed == []
    assert state["invalid"] >= 10
    assert sup.proc is not None and sup.proc.poll() is None
    assert sorted(sup.worker_pids()) == workers
    problems = [line for line in sup.lines if line.startswith("ERROR") or "Traceback" in line]
    assert problems == []
    assert not [p for p in probes if any(p in line for line in sup.lines)], "a key was logged"


def _static_entries(data: bytes) -> list[dict[str, Any]]:
    try:
        doc = yaml.safe_load(data)
        entries = doc["api_keys"]["static"]
    except Exception:
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


# --- a file caught half-written -------------------------------------------------------------


def test_half_written_file_held_open_across_polls_is_never_applied(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """An editor or `cat > fluxgate.yaml` writing in place, pausing half way (the first
    half is itself a valid config: no api_keys at all, so it would refuse everyone).
    The master's 1 s safety-net poll must not apply what it finds while the write is
    open; the close brings the whole file, which is applied."""
    doc = sup.with_bind(proxy_config(up.url))
    doc["api_keys"]["static"].append({"id": "new", "key": "fg-half-written-new-key"})
    text = _dump({k: doc[k] for k in ("version", "server", "upstreams", "api_keys")})
    cut = text.index(b"api_keys:")
    assert parse_config_bytes(text[:cut]).config.static_keys == {}  # valid, and harmful
    statuses: list[int] = []
    mark = sup.mark()
    with open(sup.config_path, "wb") as f:
        f.write(text[:cut])
        f.flush()
        deadline = time.monotonic() + 2.5  # past two safety-net polls
        while time.monotonic() < deadline:
            statuses.append(sup.request("GET", "/openai/v1/models", AUTH)[0])
        f.write(text[cut:])
    sup.wait_for_log(r"config applied .*generation=2\b", start=mark)
    sup.wait_for_generation(2)
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert not [line for line in sup.lines[mark:] if "config rejected" in line]
    new_key = {"Authorization": "Bearer fg-half-written-new-key"}
    assert sup.request("GET", "/openai/v1/models", new_key)[0] == 200


def test_watcher_poll_holds_back_while_the_file_is_being_written(tmp_path: Path) -> None:
    """The same at the watcher's level, with a 50 ms poll: no call reads the file while
    an in-place write is open; the close brings one call that sees it whole."""
    path = tmp_path / "fluxgate.yaml"
    path.write_bytes(b"version: 1\n")
    seen: list[bytes] = []
    cond = threading.Condition()

    def on_change() -> None:
        with cond:
            seen.append(path.read_bytes())
            cond.notify_all()

    # A control watcher on a file of its own, polling as often: its calls count the polls.
    control = tmp_path / "control.yaml"
    control.write_bytes(b"version: 1\n")
    polls: list[float] = []

    def on_poll() -> None:
        with cond:
            polls.append(time.monotonic())
            cond.notify_all()

    watcher = ConfigWatcher(path, on_change, poll_interval=0.05)
    clock = ConfigWatcher(control, on_poll, poll_interval=0.05)
    watcher.start()
    clock.start()
    try:
        with cond:
            assert cond.wait_for(lambda: len(seen) >= 2, timeout=5)  # the poll runs
            before = len(seen)
        with open(path, "wb") as f:
            f.write(b"version: 1\n# half")
            f.flush()
            began = time.monotonic()
            with cond:  # ten polls' worth of holding the file open mid-write
                assert cond.wait_for(lambda: sum(t > began for t in polls) >= 10, timeout=5)
                during = seen[before:]
            f.write(b" written\n")
        with cond:
            assert cond.wait_for(lambda: b"version: 1\n# half written\n" in seen, timeout=5)
        # Only a poll that ran before the write began may have seen the old content.
        assert set(during) <= {b"version: 1\n"}, during
    finally:
        clock.stop()
        watcher.stop()
