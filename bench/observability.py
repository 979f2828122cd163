"""`python -m bench.run --observability`: what Prometheus metrics and token usage cost.

Three Fluxgate instances (2 workers each, log level ERROR so that only these
features differ) in front of the same canned OpenAI completion, which carries
a usage block: *off* (`server.metrics: false`, `usage: off`), *metrics*
(metrics on, usage off) and *metrics + usage* (metrics on, `usage: openai`:
every response is parsed for its tokens). Rounds interleave the three with
the order rotated, as in the main run. Results go to
bench/results/observability-<timestamp>.json and -latest.json, and
`section()` renders them into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from . import clients
from .servers import (
    JSON_PATH,
    ROOT,
    Stack,
    System,
    _wait,
    canned_conf,
    fluxgate_doc,
    free_port,
    wait_workers,
)

RESULTS = Path(__file__).resolve().parent / "results"
LATEST = RESULTS / "observability-latest.json"
VARIANTS = {"off": (False, "off"), "metrics": (True, "off"), "metrics+usage": (True, "openai")}
LABELS = {"off": "off", "metrics": "metrics", "metrics+usage": "metrics + usage"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start(stack: Stack) -> dict[str, System]:
    c, s = free_port(), free_port()
    nginx_args = [stack.nginx, "-e", str(stack.tmp / "nginx-startup.log"), "-g", "daemon off;"]
    canned = stack._spawn(
        [*nginx_args, "-c", str(canned_conf(stack.tmp, c))],
        stack._log("canned"),
        stop_signal=signal.SIGQUIT,
    )
    sse = stack._spawn(
        [sys.executable, "-m", "bench.sse_upstream", "--port", str(s)],
        stack._log("sse"),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _wait(canned, c, JSON_PATH)
    _wait(sse, s, "/stream?events=1")
    supervisor = str(Path(sys.executable).parent / "fluxgate-supervisor")
    systems: dict[str, System] = {}
    for name, (metrics, usage) in VARIANTS.items():
        port = free_port()
        config = stack.tmp / f"{name}.yaml"
        doc = fluxgate_doc(port, c, s, [], metrics=metrics, usage=usage)
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        env = {**os.environ, "FLUXGATE_LOG": "ERROR", "FLUXGATE_LOG_STYLE": "never"}
        env.pop("RUNTIME_DIRECTORY", None)
        proc = stack._spawn(
            [supervisor, "start", "--config", str(config), "--workers", "2"],
            stack._log(name),
            env=env,
        )
        systems[name] = System(
            name, port, "/openai" + JSON_PATH, port, "/sse", proc, config, {"canned": c, "sse": s}
        )
    for system in systems.values():
        _wait(system.proc, system.port, system.json_path)
        wait_workers(system)
    return systems


def _scrape(system: System) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{system.port}/_fluxgate/metrics") as resp:
        body: bytes = resp.read()
    return (time.perf_counter() - t0) * 1000, body


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def run(repeats: int, duration: float, latency_duration: float) -> dict[str, Any]:
    names = list(VARIANTS)
    out: dict[str, Any] = {
        "throughput_64c": {n: [] for n in names},
        "latency_1c": {n: [] for n in names},
        "sse": {n: [] for n in names},
    }
    stack = Stack()
    try:
        systems = start(stack)
        for name in names:  # warm-up
            clients.wrk(systems[name], 64, 2)
            clients.wrk(systems[name], 1, 1)
        for r in range(repeats):
            order = names[r % 3 :] + names[: r % 3]
            for name in order:
                cpu0 = systems[name].cpu_seconds()
                result = clients.wrk(systems[name], 64, duration)
                cpu = systems[name].cpu_seconds() - cpu0
                result["cpu_us_per_req"] = cpu / max(1, result["requests"]) * 1e6
                out["throughput_64c"][name].append(result)
            for name in order:
                out["latency_1c"][name].append(clients.wrk(systems[name], 1, latency_duration))
            for name in order:
                out["sse"][name].append(clients.sse_run(systems[name], 20, 6, 10))
            log(
                f"round {r + 1}/{repeats}: "
                + ", ".join(
                    f"{n} {out['throughput_64c'][n][-1]['rps']:.0f}/s "
                    f"{out['throughput_64c'][n][-1]['cpu_us_per_req']:.0f} µs"
                    for n in names
                )
            )
        scrapes: dict[str, Any] = {}
        for name in ("metrics", "metrics+usage"):
            times = []
            for _ in range(20):
                ms, body = _scrape(systems[name])
                times.append(ms)
            text = body.decode()
            requests = _sample(
                text,
                "fluxgate_requests_total",
                upstream="openai",
                key_id="bench",
                status_class="2xx",
            )
            scrapes[name] = {
                "ms_p50": statistics.median(times),
                "bytes": len(body),
                "requests": requests,
                "input_tokens": _sample(
                    text, "fluxgate_tokens_total", upstream="openai", key_id="bench", type="input"
                ),
            }
        out["scrape"] = scrapes
        out["logs"] = {n: stack.stderr_text(n).count("\n") for n in names}
    except BaseException:
        stack.close(keep=True)
        raise
    stack.close()
    return out


def main(repeats: int, duration: float, latency_duration: float) -> int:
    """Run and save; a "note" added to the saved JSON by hand is shown under the table."""
    started = time.time()
    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "settings": {
            "repeats": repeats,
            "duration_s": duration,
            "latency_duration_s": latency_duration,
        },
        **run(repeats, duration, latency_duration),
    }
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    for path in (RESULTS / f"observability-{stamp}.json", LATEST):
        path.write_text(json.dumps(results, indent=1))
    log(f"raw results: {RESULTS / f'observability-{stamp}.json'}")
    return 0


def section() -> list[str]:
    """The BENCHMARKS.md section, from the latest observability run (none if never run)."""
    if not LATEST.exists():
        return []
    from .report import fmt, paired, per_round, stat

    raw = json.loads(LATEST.read_text())
    thr, lat, sse = raw["throughput_64c"], raw["latency_1c"], raw["sse"]
    names = list(VARIANTS)
    ratio = lambda x, y: x / y  # noqa: E731
    minus = lambda x, y: x - y  # noqa: E731
    rows = [
        "| | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
        "| **64 connections**: requests/s | "
        + " | ".join(fmt(stat(per_round(thr, n, "rps")), 0) for n in names)
        + " |",
        "| server CPU per request, µs | "
        + " | ".join(fmt(stat(per_round(thr, n, "cpu_us_per_req")), 0) for n in names)
        + " |",
        "| throughput / off | — | "
        + " | ".join(fmt(paired(thr, n, "off", "rps", ratio)) for n in names[1:])
        + " |",
        "| CPU per request over off, µs | — | "
        + " | ".join(fmt(paired(thr, n, "off", "cpu_us_per_req", minus), 1) for n in names[1:])
        + " |",
        "| **1 connection**: p50 latency, ms | "
        + " | ".join(fmt(stat(per_round(lat, n, "p50")), 3, 0.001) for n in names)
        + " |",
        "| p50 over off, ms | — | "
        + " | ".join(fmt(paired(lat, n, "off", "p50", minus), 3, 0.001) for n in names[1:])
        + " |",
        "| p99 latency, ms | "
        + " | ".join(fmt(stat(per_round(lat, n, "p99")), 3, 0.001) for n in names)
        + " |",
        "| **SSE**: time to first event, ms | "
        + " | ".join(fmt(stat(per_round(sse, n, "ttfb_p50_ms"))) for n in names)
        + " |",
        "| every event its own read | "
        + " | ".join(
            "yes" if all(r["max_events_per_read"] == 1 for r in sse[n]) else "**no**" for n in names
        )
        + " |",
        "| errors and non-2xx (all rounds) | "
        + " | ".join(str(sum(r["errors"] for r in thr[n])) for n in names)
        + " |",
    ]
    worst = min(statistics.median(per_round(thr, n, "rps")) for n in names[1:])
    within = worst / statistics.median(per_round(thr, "off", "rps"))
    sc = raw["scrape"]
    usage = sc["metrics+usage"]
    return [
        "## Cost of metrics and token usage",
        "",
        "A dedicated run (`python -m bench.run --observability`, "
        f"{raw['seconds'] / 60:.1f} minutes, {raw['started'][:10]}): three Fluxgate instances, "
        "2 workers each, log level ERROR, in front of the canned completion (which carries a "
        "`usage` block): *off* (`server.metrics: false`, `usage: off`), *metrics* (the "
        "default: metrics on, usage off) and *metrics + usage* (`usage: openai`: every "
        f"response's tokens are read). Median of {raw['settings']['repeats']} interleaved "
        "rounds with (min–max); the *over off* rows pair each round with off's run in the "
        "same round.",
        "",
        *rows,
        "",
        f"Slowest of the two against off: **{within:.1%}** of off's throughput (target: within "
        f"10%). A scrape of `/_fluxgate/metrics` took {sc['metrics']['ms_p50']:.1f} ms "
        f"({sc['metrics']['bytes']} bytes) and {usage['ms_p50']:.1f} ms "
        f"({usage['bytes']} bytes) with usage on. Usage was really read: "
        f"{usage['input_tokens']:.0f} input tokens counted for {usage['requests']:.0f} "
        "requests of the canned completion's 12.",
        "",
        *([raw["note"], ""] if raw.get("note") else []),
    ]
