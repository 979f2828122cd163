"""`make bench`: measure Fluxgate against direct calls, nginx and a minimal pass-through.

Starts every server once (bench.servers), then runs each scenario over all
systems interleaved, round after round with the order rotated, so machine
drift hits all alike. Raw results go to bench/results/<timestamp>.json (and
latest.json); bench.report turns them into BENCHMARKS.md and bench/latency.png.

    python -m bench.run [--repeats 5] [--duration 5] [--latency-duration 3]
    python -m bench.run --observability   # only the cost of metrics and token usage
    python -m bench.run --streams         # only many long streams (bench.streams)
    python -m bench.run --limits          # only keys under limits (local, Redis), printed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from . import clients, observability, report, streams
from .servers import ROOT, Stack, System, cpu_seconds, http_get, rss_kib, write_fluxgate_config

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ["direct", "nginx", "passthrough", "fluxgate", "fluxgate-trace", "fluxgate-pool",
       "fluxgate-limits", "fluxgate-redis"]  # fmt: skip
PROXIES = ["nginx", "passthrough", "fluxgate"]
# The paired limits phase: a cost of a few percent against a per-round spread of
# about ±10%, so many short rounds (pairs close in time) rather than a few long ones.
LIMITS_ROUNDS = 15
LIMITS_DURATION = 3.0  # s per run
GIB = 1 << 30


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def _cmd_output(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not found"
    return (out.stdout + out.stderr).strip().splitlines()[0]


def _busy_fraction(seconds: float) -> float:
    """Share of all CPU time spent busy machine-wide over `seconds` (other users' load)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    b0, t0 = read()
    time.sleep(seconds)
    b1, t1 = read()
    return (b1 - b0) / max(1, t1 - t0)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    os_name = platform.platform()
    if Path("/etc/os-release").exists():
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "os": os_name,
        "kernel": platform.release(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        "busy_before": round(_busy_fraction(2.0), 3),
    }


def versions() -> dict[str, str]:
    v = {"python": platform.python_version()}
    for pkg in ("fluxgate-gateway", "uvicorn", "aiohttp", "gunicorn", "uvloop", "httptools"):
        v[pkg] = version(pkg)
    v["nginx"] = _cmd_output([shutil.which("nginx") or "/usr/sbin/nginx", "-v"])
    v["wrk"] = _cmd_output(["wrk", "-v"]).split(" Copyright")[0]
    v["git"] = _cmd_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return v


def memory(systems: dict[str, System]) -> dict[str, float]:
    return {name: round(s.rss_mib(), 1) for name, s in systems.items()}


def latency_phase(systems: dict[str, System], repeats: int, duration: float) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in ALL}
    for name in ALL:  # warm-up, not recorded
        clients.wrk(systems[name], 1, 1, systems[name].key)
    for r in range(repeats):
        for name in rotated(ALL, r):
            out[name].append(clients.wrk(systems[name], 1, duration, systems[name].key))
        log(f"1 connection, round {r + 1}/{repeats}: " + ", ".join(
            f"{n} p50 {out[n][-1]['p50']:.0f} µs" for n in ALL))  # fmt: skip
    return out


def throughput_phase(systems: dict[str, System], repeats: int, duration: float) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in ALL}
    for name in ALL:
        clients.wrk(systems[name], 64, 2, systems[name].key)
    for r in range(repeats):
        for name in rotated(ALL, r):
            cpu0 = systems[name].cpu_seconds()
            result = clients.wrk(systems[name], 64, duration, systems[name].key)
            result["cpu_us_per_req"] = (
                (systems[name].cpu_seconds() - cpu0) / max(1, result["requests"]) * 1e6
            )
            out[name].append(result)
        log(f"64 connections, round {r + 1}/{repeats}: " + ", ".join(
            f"{n} {out[n][-1]['rps']:.0f}/s" for n in ALL))  # fmt: skip
    return out


def sse_phase(systems: dict[str, System], repeats: int) -> dict[str, Any]:
    names = ["direct", *PROXIES]
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotated(names, r):
            out[name].append(clients.sse_run(systems[name], requests=20, events=6, interval_ms=10))
    log("SSE: " + ", ".join(f"{n} TTFB {out[n][-1]['ttfb_p50_ms']:.2f} ms" for n in names))
    return out


def streams_phase(systems: dict[str, System]) -> dict[str, Any]:
    out = {}
    # The pass-through first: its streams outlive their clients by a few seconds.
    for name in ("passthrough", "nginx", "fluxgate"):
        out[name] = clients.hold_streams(systems[name], 1000)
        log(f"1,000 streams through {name}: {out[name]['rss_mib']:.0f} MiB, "
            f"{out[name]['errors']} errors")  # fmt: skip
    return out


def bulk_phase(systems: dict[str, System]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PROXIES:
        out[name] = {}
        for way, fn in (("upload", clients.upload), ("download", clients.download)):
            system = systems[name]
            with clients.RssSampler(system) as sampler:
                result = fn(system, GIB)
            result["peak_rss_mib"] = sampler.peak_total
            result["peak_worker_rss_mib"] = sampler.peak_worker
            out[name][way] = result
            log(f"1 GiB {way} through {name}: {result['mib_s']:.0f} MiB/s, "
                f"peak worker RSS {sampler.peak_worker:.0f} MiB, ok={result['ok']}")  # fmt: skip
    return out


def _generation(system: System) -> int:
    return int(json.loads(http_get(system.port, "/_fluxgate/health")[1])["generation"])


def reload_phase(system: System, idle_reloads: int, load_reloads: int) -> dict[str, Any]:
    conns = clients.WorkerConns(system)
    try:
        gen0 = _generation(system)
        idle: list[list[float] | None] = []
        for i in range(idle_reloads):
            key = f"reload-idle-{i}"
            t0 = time.perf_counter()
            write_fluxgate_config(system, [key])
            idle.append(conns.wait_key(key, t0))
            time.sleep(0.05)
        log(f"reload (idle), ms to every worker: {[round(x[-1] * 1000, 1) for x in idle if x]}")
        wrk = clients.wrk_start(system, 64, 300)
        time.sleep(1.0)
        loaded: list[list[float] | None] = []
        for i in range(load_reloads):
            key = f"reload-load-{i}"
            t0 = time.perf_counter()
            write_fluxgate_config(system, [key])
            loaded.append(conns.wait_key(key, t0))
        time.sleep(0.5)
        wrk_result = clients.wrk_stop(wrk)
        gen1 = _generation(system)
    finally:
        conns.close()
    log(f"reload under load: {load_reloads} reloads, wrk errors {wrk_result['errors']}")
    return {
        "idle_s": idle,
        "load_s": loaded,
        "generations": gen1 - gen0,
        "wrk": wrk_result,
        "poll_unexpected_statuses": conns.unexpected,
    }


def long_streams(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    # Its own date, commit and load: the report may show it beside an older full run.
    busy = round(_busy_fraction(2.0), 3)
    if busy > 0.1:
        log(f"warning: the machine was {busy:.0%} busy before the long streams")
    out = streams.long_streams_phase(
        rounds=args.streams_rounds,
        window=args.streams_window,
        names=args.streams_systems.split(","),
        scenarios=args.streams_scenarios.split(","),
    )
    out["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    out["git"] = _cmd_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    out["busy_before"] = busy
    out["seconds"] = round(time.time() - started, 1)
    return out


def streams_only(args: argparse.Namespace) -> int:
    """`--streams`: only the long-streams scenarios (on servers of their own), save, report."""
    started = time.time()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(),
        "versions": versions(),
    }
    results["long_streams"] = long_streams(args)
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    # A run kept out of the report (--no-report, an experiment) is not the one a
    # later `python -m bench.report` should show either.
    paths = [RESULTS / f"streams-{stamp}.json"]
    if not args.no_report:
        paths.append(report.STREAMS_LATEST)
    for path in paths:
        path.write_text(json.dumps(results, indent=1))
    log(f"raw results: {RESULTS / f'streams-{stamp}.json'} ({results['seconds']:.0f} s)")
    if not args.no_report:
        report.write_streams(results["long_streams"])
        log("wrote the long-streams section of BENCHMARKS.md and bench/streams.png")
    return 0


LIMITS = ["fluxgate", "fluxgate-limits", "fluxgate-redis"]


def limits_pairs(
    stack: Stack, systems: dict[str, System], repeats: int, duration: float
) -> dict[str, list[dict[str, float]]]:
    """The cost of per-key limits: the key under a policy against the same key without,
    at 64 connections, in rounds of only these three (rotated), so that each pair runs
    back to back on the same process: a difference of a few percent is lost in the
    spread of the all-systems rounds. Per run: requests/s, CPU µs per request of the
    Fluxgate processes and of the redis-server the Redis limits use."""
    redis_pid = stack.pid_of("redis-server")
    for name in LIMITS:
        clients.wrk(systems[name], 64, 2, systems[name].key)
    out: dict[str, list[dict[str, float]]] = {n: [] for n in LIMITS}
    for r in range(repeats):
        for name in rotated(LIMITS, r):
            system = systems[name]
            cpu0, redis0 = system.cpu_seconds(), cpu_seconds(redis_pid)
            result = clients.wrk(system, 64, duration, system.key)
            count = max(1, result["requests"])
            out[name].append({
                "rps": result["rps"],
                "cpu_us_per_req": (system.cpu_seconds() - cpu0) / count * 1e6,
                "redis_cpu_us_per_req": (cpu_seconds(redis_pid) - redis0) / count * 1e6,
                "errors": result["errors"],
            })  # fmt: skip
        log(f"limits, round {r + 1}/{repeats}: " + ", ".join(
            f"{n} {out[n][-1]['rps']:.0f}/s {out[n][-1]['cpu_us_per_req']:.0f} µs"
            for n in LIMITS))  # fmt: skip
    return out


def limits_phase(repeats: int, duration: float) -> None:
    """`--limits`: only `limits_pairs`, printed as BENCHMARKS.md would show it."""
    stack = Stack()
    try:
        out = limits_pairs(stack, stack.start(), repeats, duration)
    finally:
        stack.close()
    print("\n".join(report.limits_section({"limits_paired": out})), flush=True)


def log_scan(text: str) -> dict[str, Any]:
    lines = [x for x in text.splitlines() if x.strip()]
    bad = [x for x in lines if x.startswith(("WARN", "ERROR", "CRITICAL", "Traceback"))]
    return {"lines": len(lines), "warnings_or_errors": len(bad), "sample": bad[:10]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="s per 64-connection run")
    parser.add_argument("--latency-duration", type=float, default=3.0, help="s per 1-conn run")
    parser.add_argument("--reloads", type=int, default=100, help="reloads under load")
    parser.add_argument("--no-report", action="store_true", help="only write the JSON")
    parser.add_argument(
        "--observability",
        action="store_true",
        help="only compare Fluxgate with metrics and token usage on and off",
    )
    parser.add_argument("--streams", action="store_true", help="only the long-streams scenarios")
    parser.add_argument("--streams-rounds", type=int, default=3)
    parser.add_argument("--streams-window", type=float, default=10.0, help="s of steady state")
    parser.add_argument("--streams-systems", default=",".join(streams.SYSTEMS),
                        help="comma-separated; passthrough may be added, but it does not close "
                        "a stream's upstream side when the client leaves, so its runs overlap "
                        "the next for up to 30 s")  # fmt: skip
    parser.add_argument("--streams-scenarios", default=",".join(streams.SCENARIOS),
                        help="A (1,000 × 10/s), B (10,000 × 1 per 2 s)")  # fmt: skip
    parser.add_argument(
        "--limits",
        action="store_true",
        help="only keys under limits (local, Redis) against the same key without, printed",
    )
    args = parser.parse_args(argv)
    for tool in ("wrk", "nginx"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            sys.exit(f"{tool} is missing: run bench/setup.sh (or `make bench`)")
    # Children inherit it: the long-streams client holds 10,000 sockets, and a proxy
    # worker up to 20,000 (each stream's client and upstream side, were one worker
    # to take them all).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))

    # A SIGTERM to the benchmark still stops every server it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.limits:
        limits_phase(args.repeats, args.duration)
        return 0
    if args.observability:
        observability.main(args.repeats, args.duration, args.latency_duration)
        latest = RESULTS / "latest.json"
        if not args.no_report and latest.exists():
            report.write(json.loads(latest.read_text()))
            log("wrote BENCHMARKS.md")
        return 0
    if args.streams:
        return streams_only(args)
    started = time.time()
    log("machine and versions")
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "settings": {"repeats": args.repeats, "duration_s": args.duration,
                     "latency_duration_s": args.latency_duration, "reloads": args.reloads,
                     "streams_rounds": args.streams_rounds,
                     "streams_window_s": args.streams_window},
        "machine": machine(),
        "versions": versions(),
    }  # fmt: skip
    if results["machine"]["busy_before"] > 0.1:
        log(f"warning: the machine was {results['machine']['busy_before']:.0%} busy before the "
            "run: other load will disturb the numbers")  # fmt: skip
    stack = Stack()
    try:
        log("starting servers")
        systems = stack.start()
        time.sleep(1.0)
        mem: dict[str, Any] = {"idle": memory(systems)}
        mem["idle_processes"] = {
            n: [round(rss_kib(p) / 1024, 1) for p in s.pids()] for n, s in systems.items()
        }
        results["memory"] = mem
        log(f"idle RSS (MiB): {mem['idle']}")
        results["latency_1c"] = latency_phase(systems, args.repeats, args.latency_duration)
        results["throughput_64c"] = throughput_phase(systems, args.repeats, args.duration)
        results["limits_paired"] = limits_pairs(stack, systems, LIMITS_ROUNDS, LIMITS_DURATION)
        time.sleep(1.0)
        mem["after_load"] = memory(systems)
        results["sse"] = sse_phase(systems, args.repeats)
        mem["streams_1000"] = streams_phase(systems)
        results["long_streams"] = long_streams(args)
        mem["bulk_1gib"] = bulk_phase(systems)
        time.sleep(1.0)
        mem["after_all"] = memory(systems)
        results["reload"] = reload_phase(systems["fluxgate"], 10, args.reloads)
        results["logs"] = {n: log_scan(stack.stderr_text(n)) for n in ("fluxgate", "passthrough")}
    except BaseException:
        log(f"failed; servers that had exited: {stack.dead() or 'none'}")
        stack.close(keep=True)
        raise
    stack.close()
    results["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    for path in (RESULTS / f"{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(results, indent=1))
    log(f"raw results: {RESULTS / f'{stamp}.json'} ({results['seconds']:.0f} s)")
    if not args.no_report:
        report.write(results)
        log("wrote BENCHMARKS.md and bench/latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
