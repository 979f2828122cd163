"""Turn the raw results of bench.run into BENCHMARKS.md and its charts.

bench/latency.png for the main run, bench/streams.png for the long streams
(bench.streams), whose section comes from the newer of the main run's
"long_streams" and the latest `bench.run --streams` run, and is also spliced
into the page on its own after a `--streams` run.

python -m bench.report [bench/results/latest.json]   # re-render without re-running
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MARKDOWN = HERE.parent / "BENCHMARKS.md"
CHART = HERE / "latency.png"
DESIGN = HERE / "design.md"  # the figures behind design choices, kept by hand
STREAMS_CHART = HERE / "streams.png"
STREAMS_LATEST = HERE / "results" / "streams-latest.json"
STREAMS_BEGIN, STREAMS_END = "<!-- long-streams -->", "<!-- /long-streams -->"
SYSTEMS = ["direct", "nginx", "passthrough", "fluxgate", "fluxgate-trace", "fluxgate-pool",
           "fluxgate-limits", "fluxgate-redis"]  # fmt: skip
LABELS = {
    "direct": "direct",
    "nginx": "nginx proxy_pass",
    "passthrough": "pass-through",
    "fluxgate": "Fluxgate",
    "fluxgate-trace": "Fluxgate, TRACE log",
    "fluxgate-pool": "Fluxgate, 3-key pool",
    "fluxgate-limits": "Fluxgate, key with local limits",
    "fluxgate-redis": "Fluxgate, key with Redis limits",
}
SHORT = {
    "direct": "direct",
    "nginx": "nginx",
    "passthrough": "pass-\nthrough",
    "fluxgate": "Fluxgate",
    "fluxgate-trace": "Fluxgate\nTRACE",
    "fluxgate-pool": "Fluxgate\n3-key pool",
    "fluxgate-limits": "Fluxgate\nlocal limits",
    "fluxgate-redis": "Fluxgate\nRedis limits",
}
PERCENTILES = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")]

Stat = tuple[float, float, float]  # median, min, max


def stat(values: Sequence[float]) -> Stat:
    return statistics.median(values), min(values), max(values)


def stat_or_none(values: Sequence[float | None]) -> Stat | None:
    """Over the rounds that have the figure (a run that failed has none)."""
    present = [v for v in values if v is not None]
    return stat(present) if present else None


def per_round(runs: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[float]:
    return [float(r[key]) for r in runs[name]]


def paired(
    runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str,
    op: Callable[[float, float], float],
) -> Stat:  # fmt: skip
    """`op(a, b)` round by round (the systems of one round ran back to back), summarised."""
    return stat([op(x[key], y[key]) for x, y in zip(runs[a], runs[b], strict=True)])


def fmt(s: Stat | None, digits: int = 3, scale: float = 1.0) -> str:
    if s is None:
        return "—"
    med, lo, hi = (v * scale for v in s)
    return f"**{med:.{digits}f}** ({lo:.{digits}f}–{hi:.{digits}f})"


def derive(raw: dict[str, Any]) -> dict[str, Any]:
    lat, thr, sse = raw["latency_1c"], raw["throughput_64c"], raw["sse"]
    d: dict[str, Any] = {"lat": {}, "thr": {}, "sse": {}, "ratios": {}}
    diff = lambda x, y: (x - y) / 1000  # noqa: E731 (µs to ms)
    for name in SYSTEMS:
        d["lat"][name] = {p: stat(per_round(lat, name, p)) for p, _ in PERCENTILES}
        if name != "direct":
            d["lat"][name]["added_p50"] = paired(lat, name, "direct", "p50", diff)
            d["lat"][name]["added_p99"] = paired(lat, name, "direct", "p99", diff)
        d["thr"][name] = {
            k: stat(per_round(thr, name, k)) for k in ("rps", "p50", "p99", "cpu_us_per_req")
        }
        d["thr"][name]["errors"] = sum(r["errors"] for r in thr[name])
    for name in sse:
        d["sse"][name] = {
            "ttfb": stat(per_round(sse, name, "ttfb_p50_ms")),
            "own_read": all(r["max_events_per_read"] == 1 for r in sse[name]),
            "complete": sum(r["streams_complete"] for r in sse[name]),
            "streams": sum(r["streams"] for r in sse[name]),
        }
        if name != "direct":
            d["sse"][name]["added"] = paired(sse, name, "direct", "ttfb_p50_ms", lambda x, y: x - y)
    ratio = lambda x, y: x / y  # noqa: E731
    for label, a, b in (
        ("Fluxgate / nginx", "fluxgate", "nginx"),
        ("Fluxgate / pass-through", "fluxgate", "passthrough"),
        ("pass-through / nginx", "passthrough", "nginx"),
        ("Fluxgate TRACE / Fluxgate (logging cost)", "fluxgate-trace", "fluxgate"),
        ("Fluxgate 3-key pool / Fluxgate (pool cost)", "fluxgate-pool", "fluxgate"),
        ("Fluxgate local limits / Fluxgate (limits cost)", "fluxgate-limits", "fluxgate"),
        ("Fluxgate Redis limits / Fluxgate (limits cost)", "fluxgate-redis", "fluxgate"),
    ):
        d["ratios"][label] = paired(thr, a, b, "rps", ratio)
    d["trace_added_p50"] = paired(lat, "fluxgate-trace", "fluxgate", "p50", diff)
    rl = raw["reload"]
    d["reload"] = {
        "failed": rl["wrk"]["errors"] + len(rl["poll_unexpected_statuses"]),
        "requests": rl["wrk"]["requests"],
    }
    for phase in ("idle", "load"):
        done = [x for x in rl[f"{phase}_s"] if x is not None]
        every = [x[-1] * 1000 for x in done]
        d["reload"][phase] = stat(every) if every else None
        d["reload"][f"{phase}_first"] = stat([x[0] * 1000 for x in done]) if done else None
        d["reload"][f"{phase}_p90"] = (
            statistics.quantiles(every, n=10)[-1] if len(every) > 1 else None
        )
        d["reload"][f"{phase}_timeouts"] = len(rl[f"{phase}_s"]) - len(done)
    return d


LIMITS_TARGETS = {"fluxgate-limits": 0.95, "fluxgate-redis": 0.85}  # of the key without


def limits_section(raw: dict[str, Any]) -> list[str]:
    """The paired limits phase (bench.run.limits_pairs), if the run has one."""
    runs = raw.get("limits_paired")
    if not runs:
        return []
    base = runs["fluxgate"]
    lines = [
        "### Cost of limits, paired",
        "",
        "The limits rows above come from rounds of all eight systems, where the two runs of a",
        "pair are half a minute apart; a cost of a few percent is lost in that spread. So",
        f"limits are measured again in {len(base)} rounds of only the key without limits and",
        "the two keys under a policy (never reached), rotated, back to back on the same",
        "processes; median of the per-round ratios with (min–max):",
        "",
        "|  | throughput / same key without | extra CPU per request, µs | redis-server CPU per"
        " request, µs | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, target in LIMITS_TARGETS.items():
        ratio = paired(runs, name, "fluxgate", "rps", lambda x, y: x / y)
        extra = paired(runs, name, "fluxgate", "cpu_us_per_req", lambda x, y: x - y)
        redis = (
            fmt(stat(per_round(runs, name, "redis_cpu_us_per_req")), 1)
            if name == "fluxgate-redis"
            else "—"
        )
        met = "yes" if ratio[0] >= target else "**no**"
        lines.append(
            f"| {LABELS[name]} | {fmt(ratio)} | {fmt(extra, 1)} | {redis} | ≥ {target} | {met} |"
        )
    errors = sum(r["errors"] for name in runs for r in runs[name])
    cpu = stat(per_round(runs, "fluxgate", "cpu_us_per_req"))
    lines += [
        "",
        f"The key without limits: {fmt(cpu, 0)} µs CPU per request; errors and non-2xx in"
        f" this phase: {errors}.",
    ]
    return lines


def _row(title: str, cells: list[str]) -> str:
    return f"| {title} | " + " | ".join(cells) + " |"


def _targets(d: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    fg = d["lat"]["fluxgate"]
    fgt = d["lat"]["fluxgate-trace"]
    checks = [
        ("added p50 at 1 connection ≤ 0.5 ms", fg["added_p50"][0] <= 0.5,
         f"{fg['added_p50'][0]:.3f} ms"),
        ("added p99 at 1 connection ≤ 1 ms", fg["added_p99"][0] <= 1.0,
         f"{fg['added_p99'][0]:.3f} ms"),
        ("throughput ≥ 90% of the pass-through", d["ratios"]["Fluxgate / pass-through"][0] >= 0.9,
         f"{d['ratios']['Fluxgate / pass-through'][0]:.0%}"),
        ("added p50 with TRACE on ≤ 0.5 ms (goal 0.35 ms)", fgt["added_p50"][0] <= 0.5,
         f"{fgt['added_p50'][0]:.3f} ms"),
        ("TRACE on within 10% of logging off (throughput)",
         d["ratios"]["Fluxgate TRACE / Fluxgate (logging cost)"][0] >= 0.9,
         f"{d['ratios']['Fluxgate TRACE / Fluxgate (logging cost)'][0]:.0%}"),
        ("SSE: every event its own read", d["sse"]["fluxgate"]["own_read"],
         "yes" if d["sse"]["fluxgate"]["own_read"] else "no"),
        ("SSE: added time to first byte ≤ 1 ms", d["sse"]["fluxgate"]["added"][0] <= 1.0,
         f"{d['sse']['fluxgate']['added'][0]:.3f} ms"),
        ("reload live in every worker ≤ 100 ms (idle)",
         d["reload"]["idle"] is not None and d["reload"]["idle"][2] <= 100
         and not d["reload"]["idle_timeouts"],
         "—" if d["reload"]["idle"] is None else f"max {d['reload']['idle'][2]:.0f} ms"),
        ("0 failed requests during reloads under load", d["reload"]["failed"] == 0,
         f"{d['reload']['failed']} of {d['reload']['requests']}"),
        ("1,000 concurrent streams held",
         raw["memory"]["streams_1000"]["fluxgate"]["held_to_end"] == 1000,
         f"{raw['memory']['streams_1000']['fluxgate']['held_to_end']}"),
    ]  # fmt: skip
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, ok, v in checks]
    return lines


def markdown(raw: dict[str, Any], d: dict[str, Any]) -> str:
    m, v, mem = raw["machine"], raw["versions"], raw["memory"]
    s = raw["settings"]
    head = [LABELS[n] for n in SYSTEMS]
    sep = "|---" * (len(SYSTEMS) + 1) + "|"
    lat, thr = d["lat"], d["thr"]

    def cells(fn: Callable[[str], str]) -> list[str]:
        return [fn(n) for n in SYSTEMS]

    def sse_cell(n: str, key: str) -> str:
        return fmt(d["sse"][n].get(key)) if n in d["sse"] else "—"

    def mem_cell(n: str, get: Callable[[dict[str, Any]], Any], section: str) -> str:
        src = mem[section]
        return f"{get(src[n]):.0f}" if n in src else "—"

    bulk = mem["bulk_1gib"]
    streams = mem["streams_1000"]
    table = [
        _row("", head), sep,
        _row("**1 connection**: p50 latency, ms", cells(lambda n: fmt(lat[n]["p50"], scale=1e-3))),
        _row("p99 latency, ms", cells(lambda n: fmt(lat[n]["p99"], scale=1e-3))),
        _row("*added* p50 over direct, ms",
             cells(lambda n: fmt(lat[n].get("added_p50")))),
        _row("*added* p99 over direct, ms",
             cells(lambda n: fmt(lat[n].get("added_p99")))),
        _row("**64 connections**: requests/s", cells(lambda n: fmt(thr[n]["rps"], 0))),
        _row("p50 latency, ms", cells(lambda n: fmt(thr[n]["p50"], 2, 1e-3))),
        _row("p99 latency, ms", cells(lambda n: fmt(thr[n]["p99"], 2, 1e-3))),
        _row("server CPU per request, µs", cells(lambda n: fmt(thr[n]["cpu_us_per_req"], 0))),
        _row("errors and non-2xx (all rounds)", cells(lambda n: str(thr[n]["errors"]))),
        _row("**SSE**: time to first event, ms", cells(lambda n: sse_cell(n, "ttfb"))),
        _row("*added* time to first event, ms", cells(lambda n: sse_cell(n, "added"))),
        _row("every event its own read", cells(
            lambda n: ("yes" if d["sse"][n]["own_read"] else "**no**")
            + f" ({d['sse'][n]['complete']}/{d['sse'][n]['streams']} streams whole)"
            if n in d["sse"] else "—")),
        _row("**RSS, MiB** (all processes): idle",
             cells(lambda n: f"{mem['idle'][n]:.0f}")),
        _row("after the load", cells(lambda n: f"{mem['after_load'][n]:.0f}")),
        _row("holding 1,000 open streams",
             cells(lambda n: mem_cell(n, lambda x: x["rss_mib"], "streams_1000"))),
        _row("after those streams closed",
             cells(lambda n: mem_cell(n, lambda x: x["rss_after_close_mib"], "streams_1000"))),
        _row("peak during 1 GiB upload",
             cells(lambda n: mem_cell(n, lambda x: x["upload"]["peak_rss_mib"], "bulk_1gib"))),
        _row("peak during 1 GiB download",
             cells(lambda n: mem_cell(n, lambda x: x["download"]["peak_rss_mib"], "bulk_1gib"))),
        _row("peak of one worker, upload / download", cells(
            lambda n: f"{bulk[n]['upload']['peak_worker_rss_mib']:.0f} / "
            f"{bulk[n]['download']['peak_worker_rss_mib']:.0f}" if n in bulk else "—")),
        _row("at the end of the run", cells(lambda n: f"{mem['after_all'][n]:.0f}")),
        _row("**1 GiB** upload / download, MiB/s", cells(
            lambda n: f"{bulk[n]['upload']['mib_s']:.0f} / {bulk[n]['download']['mib_s']:.0f}"
            if n in bulk else "—")),
    ]  # fmt: skip
    ratios = ["| throughput at 64 connections | median | min | max |", "|---|---|---|---|"]
    ratios += [
        f"| {label} | **{r[0]:.3f}** | {r[1]:.3f} | {r[2]:.3f} |"
        for label, r in d["ratios"].items()
    ]
    rl = d["reload"]
    n_idle, n_load = len(raw["reload"]["idle_s"]), len(raw["reload"]["load_s"])

    def reload_row(title: str, value: Stat | None) -> str:
        cells = " | ".join(f"{x:.1f}" for x in value) if value else "— | — | —"
        return f"| {title} | {cells} |"

    reload_rows = [
        "| reload: from writing the file, ms | median | min | max |", "|---|---|---|---|",
        reload_row(f"first request with the new key served, idle ({n_idle} reloads)",
                   rl["idle_first"]),
        reload_row("new key served by every worker, idle", rl["idle"]),
        reload_row(f"first request with the new key served, under load ({n_load} reloads)",
                   rl["load_first"]),
        reload_row("new key served by every worker, under load", rl["load"]),
    ]  # fmt: skip
    fs = streams["fluxgate"]
    logs = raw.get("logs", {})
    fg_log = logs.get("fluxgate", {})
    log_note = (
        "none" if not fg_log.get("warnings_or_errors")
        else f"{fg_log['warnings_or_errors']}, e.g. `{fg_log['sample'][0][:160]}`"
    )  # fmt: skip
    return "\n".join([
        "# Benchmarks",
        "",
        "Fluxgate against the same requests sent directly to the upstream, through nginx",
        "`proxy_pass` and through a minimal uvicorn + aiohttp pass-through",
        "([bench/passthrough.py](bench/passthrough.py), the yardstick). Everything runs",
        "on 127.0.0.1 on one machine; every scenario interleaves the systems round by round (the",
        "order rotated each round) so drift hits all alike, and each figure is the **median** of",
        f"{s['repeats']} rounds with (min–max). Reproduce with:",
        "",
        "```sh",
        "make bench   # installs Debian's nginx and wrk if missing, then python -m bench.run",
        "```",
        "",
        f"It took {raw['seconds'] / 60:.1f} minutes for this run. Raw numbers land in",
        "`bench/results/` (not committed); `python -m bench.report` re-renders this page from",
        "`bench/results/latest.json`.",
        "",
        f"## Results ({raw['started'][:10]}, commit `{v['git']}`)",
        "",
        *(
            [
                f"> The machine was {m['busy_before']:.0%} busy with other work just before this"
                " run; the tails (p99) and the min–max ranges show it. Medians of interleaved",
                "> rounds and the ratios are the figures to compare.",
                "",
            ]
            if m["busy_before"] > 0.1
            else []
        ),
        *table,
        "",
        *ratios,
        "",
        *([*lim, ""] if (lim := limits_section(raw)) else []),
        f"Logging: the TRACE line per request (stderr to /dev/null) adds "
        f"{fmt(d['trace_added_p50'])} ms to the p50 at one connection.",
        "",
        *reload_rows,
        "",
        f"During the {len(raw['reload']['load_s'])} reloads under load: "
        f"**{rl['failed']} failed requests** of {rl['requests']} (wrk: connect/read/write errors,"
        f" timeouts and non-2xx; plus any status other than 200/401 on the polling connections);"
        f" {raw['reload']['generations']} config generations applied in all;"
        f" {rl['load_timeouts']} reloads not seen within 5 s"
        + (f"; 90th percentile to every worker {rl['load_p90']:.1f} ms." if rl["load_p90"]
           else ".")
        + " Under load the polling requests themselves queue behind wrk's 64 connections"
        " (see the 64-connection p50), which is part of these figures.",
        "",
        f"1,000 concurrent streams through Fluxgate: {fs['opened']} opened in"
        f" {fs['open_all_s']} s, {fs['held_to_end']} held to the end, {fs['errors']} errors;"
        f" workers at {' and '.join(f'{x:.0f}' for x in fs['worker_rss_mib'])} MiB."
        f" WARNING/ERROR lines in Fluxgate's log (level ERROR) over the run: {log_note}.",
        "",
        "Idle RSS per process, MiB (parent first): "
        + "; ".join(
            f"{LABELS[n]} {' + '.join(f'{x:.0f}' for x in mem['idle_processes'][n])}"
            for n in SYSTEMS
            if n in mem.get("idle_processes", {})
        )
        + ".",
        "",
        *_targets(d, raw),
        "",
        *observability_section(),
        f"![Latency percentiles at one connection and throughput at 64]({CHART.relative_to(HERE.parent)})",  # noqa: E501
        "",
        *streams_section(streams_source(raw)),
        "## Machine and versions",
        "",
        f"- {m['nproc']} cores, {m['cpu']}, {m['memory_gib']} GiB; {m['os']}, Linux {m['kernel']}",
        f"- load average before / after the run: {' '.join(m['loadavg_before'])} / "
        f"{' '.join(m.get('loadavg_after', []))}; CPU busy in the 2 s before it: "
        f"{m['busy_before']:.0%}",
        f"- Python {v['python']}, fluxgate-gateway {v['fluxgate-gateway']}, "
        f"uvicorn {v['uvicorn']}, aiohttp {v['aiohttp']}, gunicorn {v['gunicorn']}, "
        f"uvloop {v['uvloop']}, httptools {v['httptools']}; {v['nginx']}; {v['wrk']}",
        "",
        "## What is measured, and how",
        "",
        "- **Upstreams.** A canned OpenAI chat completion (≈500 bytes of JSON) from nginx",
        "  (2 workers, `return 200`, keep-alive, no access log) is the fast upstream that is never",
        "  the bottleneck; [bench/sse_upstream.py](bench/sse_upstream.py) (asyncio + uvloop) emits",
        "  timed SSE events (each its own chunk and write) and sinks or sources the 1 GiB bodies.",
        "- **Systems**, each with 2 workers: *direct* (the upstream itself); *nginx* `proxy_pass`",
        "  with an upstream keep-alive pool (`keepalive 128`, HTTP/1.1, Bearer swap, access log",
        "  off, buffering off for SSE and bulk bodies); *pass-through*: `uvicorn --workers 2` with",
        "  uvloop and httptools serving bench/passthrough.py; *Fluxgate*: `fluxgate-supervisor",
        "  start --workers 2` with one static key, Prometheus metrics on (the default), token",
        "  usage read from every response (`usage: openai`) and `FLUXGATE_LOG=ERROR`; *Fluxgate,",
        "  TRACE log*: a second instance with the default TRACE level, its stderr sent to",
        "  /dev/null. The cost of metrics and usage alone is in its own section below.",
        "- **Request.** `POST /v1/chat/completions` (through the proxies",
        "  `/openai/v1/chat/completions`) with a 74-byte JSON body and `Authorization: Bearer`.",
        f"- **1 connection**: `wrk -t1 -c1 -d{s['latency_duration_s']:g}s` with",
        "  [bench/wrk_report.lua](bench/wrk_report.lua), whose `done()` prints wrk's per-request",
        "  latency histogram (1 µs resolution) as JSON. *Added* latency is the system's",
        "  percentile minus direct's in the same round.",
        f"- **64 connections**: `wrk -t2 -c64 -d{s['duration_s']:g}s`, after a 2 s warm-up per",
        "  system. Server CPU per request: utime+stime of the system's process tree over the run",
        "  divided by its requests. The machine has 2 cores and nothing is pinned: wrk and the",
        "  servers share them, as do the upstream and the proxy, so absolute numbers are lower",
        "  than on separate machines; the ratios are the point.",
        "- **SSE**: 20 streams of 6 events 10 ms apart per round on one keep-alive connection;",
        "  time to first byte is from sending the request to the first read holding event bytes",
        "  (headers alone do not count; p50 per round),",
        "  and whether any single `recv()` ever held more than one event.",
        "- **Memory**: VmRSS from /proc summed over the process tree (supervisor or master plus",
        "  workers; for the pass-through also uvicorn's parent). Pages shared after fork are",
        "  counted in every process, so sums overstate real use. *Idle* is just after start,",
        "  *after the load* follows all latency and throughput rounds. 1,000 open streams: an",
        "  asyncio client opens 1,000 connections to a stream that sends an event every 0.5 s",
        "  (24 in all), waits for each first event and holds them all 4 s while RSS is sampled;",
        "  Fluxgate and nginx close the upstream side as soon as the client leaves, the minimal",
        "  pass-through does not (its streams run on until the upstream ends them). 1 GiB bodies:",
        "  a Content-Length upload from a generator and a download into a sink, RSS sampled",
        "  every 20 ms; the figure is the peak.",
        "- **Reload**: the config file is replaced (write a sibling, rename) with one more static",
        "  key; one keep-alive connection pinned to each worker (told apart by",
        "  `/_fluxgate/health`'s pid) polls with that key, the workers in turn, every 0.5 ms",
        "  until both answer 200 (no pause between reloads under load). 10",
        f"  reloads idle, then {s['reloads']} back to back while wrk keeps 64 connections busy.",
        "",
        *design_section(),
    ])  # fmt: skip


def chart(raw: dict[str, Any], d: dict[str, Any], path: Path = CHART) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(SYSTEMS)
    colours = [
        "#7f7f7f",
        "#2ca02c",
        "#1f77b4",
        "#d62728",
        "#ff7f0e",
        "#9467bd",
        "#8c564b",
        "#e377c2",
    ]
    for i, name in enumerate(SYSTEMS):
        meds = [d["lat"][name][p][0] / 1000 for p, _ in PERCENTILES]
        lo = [meds[j] - d["lat"][name][p][1] / 1000 for j, (p, _) in enumerate(PERCENTILES)]
        hi = [d["lat"][name][p][2] / 1000 - meds[j] for j, (p, _) in enumerate(PERCENTILES)]
        xs = [j + (i - (len(SYSTEMS) - 1) / 2) * width for j in range(len(PERCENTILES))]
        ax1.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=LABELS[name], color=colours[i])
    ax1.set_xticks(range(len(PERCENTILES)), [label for _, label in PERCENTILES])
    ax1.set_yscale("log")
    ax1.set_ylabel("latency, ms (log scale)")
    ax1.set_title("One connection: latency percentiles")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", which="both", alpha=0.3)
    rps = [d["thr"][n]["rps"] for n in SYSTEMS]
    ax2.bar(
        range(len(SYSTEMS)),
        [r[0] for r in rps],
        yerr=[[r[0] - r[1] for r in rps], [r[2] - r[0] for r in rps]],
        capsize=3,
        color=colours,
    )
    for i, r in enumerate(rps):
        ax2.text(i, r[0], f"{r[0]:,.0f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(SYSTEMS)), [SHORT[n] for n in SYSTEMS], fontsize=8)
    ax2.set_ylabel("requests/s")
    ax2.set_title("64 connections: throughput")
    ax2.grid(axis="y", alpha=0.3)
    m = raw["machine"]
    title = (
        f"Fluxgate benchmark, {raw['started'][:10]}: {m['nproc']} cores ({m['cpu']}), "
        f"median of {raw['settings']['repeats']} rounds, bars min–max"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Many long streams (bench.streams)

STREAM_PERCENTILES = [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")]


def streams_source(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The long-streams results to show: the newer of this run's and the latest
    `bench.run --streams` run's (None if neither exists, as in older results)."""
    found = [raw["long_streams"]] if raw.get("long_streams") else []
    if STREAMS_LATEST.exists():
        other = json.loads(STREAMS_LATEST.read_text()).get("long_streams")
        if other:
            found.append(other)
    return max(found, key=lambda b: str(b.get("started", ""))) if found else None


def _get(run: dict[str, Any], *path: str) -> float | None:
    value: Any = run
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def _pairs(
    runs: dict[str, list[dict[str, Any]]], a: str, b: str, path: tuple[str, ...],
    op: Callable[[float, float], float],
) -> Stat | None:  # fmt: skip
    """`op(a, b)` round by round, over the rounds where both have the figure."""
    if a not in runs or b not in runs:
        return None
    values = []
    for x, y in zip(runs[a], runs[b], strict=True):
        vx, vy = _get(x, *path), _get(y, *path)
        if vx is not None and vy is not None and (op is not _ratio or vy):
            values.append(op(vx, vy))
    return stat(values) if values else None


def _ratio(x: float, y: float) -> float:
    return x / y


def _minus(x: float, y: float) -> float:
    return x - y


def derive_streams(blob: dict[str, Any]) -> dict[str, Any]:
    """Per scenario and system: medians (min–max) over rounds, and the paired figures."""
    out: dict[str, Any] = {}
    for key, sc in blob["scenarios"].items():
        runs: dict[str, list[dict[str, Any]]] = sc["runs"]
        d: dict[str, Any] = {"systems": list(runs), "ratios": {}}
        for name, rs in runs.items():
            figures: dict[str, Any] = {
                k: stat_or_none([_get(r, k) for r in rs])
                for k in ("events_per_s", "cpu_us_per_event", "cpu_us_per_event_run",
                          "pss_kib_per_stream", "pss_kept_mib", "upstream_cpu_us_per_event",
                          "release_s")
            }  # fmt: skip
            for p, _ in STREAM_PERCENTILES:
                figures[p] = stat_or_none([_get(r, "latency_ms", p) for r in rs])
                if name != "direct":
                    figures[f"added_{p}"] = _pairs(runs, name, "direct", ("latency_ms", p), _minus)
            figures["head_p99"] = stat_or_none([_get(r, "head_ms", "p99") for r in rs])
            figures["open_s"] = stat_or_none([_get(r, "open", "open_s") for r in rs])
            kinds: dict[str, int] = {}
            for r in rs:
                for kind, n in r.get("failures", {}).items():
                    kinds[kind] = kinds.get(kind, 0) + n
            figures["failed"] = sum(r.get("failed", 0) for r in rs)
            figures["failure_kinds"] = kinds
            figures["streams"] = sc["streams"] * len(rs)
            figures["held_min"] = min((r.get("held", 0) for r in rs), default=0)
            figures["errors"] = [r["error"] for r in rs if "error" in r]
            figures["unreleased"] = sum(1 for r in rs if r.get("release_s", 0) is None)
            figures["log_lines"] = sum(r.get("log_lines", 0) for r in rs)
            figures["log_sample"] = next((r["log_sample"] for r in rs if r.get("log_sample")), [])
            figures["fds"] = [r.get("fds", []) for r in rs]
            idle = blob.get("pss_idle_kib", {}).get(name)
            figures["pss_idle_mib"] = None if idle is None else idle / 1024
            d[name] = figures
        for label, path in (
            ("CPU per event, window", ("cpu_us_per_event",)),
            ("CPU per event, whole run", ("cpu_us_per_event_run",)),
            ("PSS per open stream", ("pss_kib_per_stream",)),
        ):
            d["ratios"][label] = _pairs(runs, "fluxgate", "nginx", path, _ratio)
        out[key] = d
    return out


def _at(key: str, figures: dict[str, Any], _: str) -> str:
    return fmt(figures.get(key))


def _streams_table(sc: dict[str, Any], d: dict[str, Any]) -> list[str]:
    names = [n for n in SYSTEMS if n in d["systems"]]
    ramp = sc["streams"] / sc["rate"]

    def cells(fn: Callable[[dict[str, Any], str], str]) -> list[str]:
        return [fn(d[n], n) for n in names]

    def failed(f: dict[str, Any], _: str) -> str:
        text = f"{f['failed']:,} of {f['streams']:,}"
        if f["failure_kinds"]:
            text += " (" + ", ".join(f"{k}: {v:,}" for k, v in f["failure_kinds"].items()) + ")"
        if f["errors"]:
            text += f"; **{len(f['errors'])} run(s) did not finish**"
        return f"**{text}**" if f["failed"] and not f["errors"] else text

    rows = [
        _row("", [LABELS[n] for n in names]), "|---" * (len(names) + 1) + "|",
        _row("events relayed per s (window)", cells(lambda f, _: fmt(f["events_per_s"], 0))),
        _row("proxy CPU per event, µs (window)",
             cells(lambda f, _: fmt(f["cpu_us_per_event"], 1))),
        _row("proxy CPU per event, µs (whole run)",
             cells(lambda f, _: fmt(f["cpu_us_per_event_run"], 1))),
        _row("PSS per open stream, KiB", cells(lambda f, _: fmt(f["pss_kib_per_stream"], 1))),
        _row("PSS idle before the first run (warmed up), MiB", cells(
            lambda f, _: "—" if f["pss_idle_mib"] is None else f"{f['pss_idle_mib']:.1f}")),
        _row("PSS kept after the streams closed, MiB over idle",
             cells(lambda f, _: fmt(f["pss_kept_mib"], 1))),
    ]  # fmt: skip
    for p, label in STREAM_PERCENTILES:
        rows.append(_row(f"event latency {label}, ms", cells(functools.partial(_at, p))))
    for p, label in STREAM_PERCENTILES:
        rows.append(
            _row(f"*added* {label} over direct, ms", cells(functools.partial(_at, f"added_{p}")))
        )
    rows += [
        _row("response head p99, ms (during the ramp)", cells(lambda f, _: fmt(f["head_p99"], 2))),
        _row(f"every head in, s after the first connect (the ramp: {ramp:g} s)",
             cells(lambda f, _: fmt(f["open_s"], 1))),
        _row("streams failed (all rounds)", cells(failed)),
    ]  # fmt: skip
    ratios = ["| Fluxgate / nginx | median | min | max |", "|---|---|---|---|"]
    for label, r in d["ratios"].items():
        ratios.append(
            f"| {label} | **{r[0]:.2f}** | {r[1]:.2f} | {r[2]:.2f} |"
            if r
            else f"| {label} | — | — | — |"
        )
    return [*rows, "", *ratios]


def _streams_targets(d: dict[str, Any]) -> list[str]:
    checks: list[tuple[str, bool, str]] = []

    # Digits enough that a value just over its limit does not show as the limit itself.
    def at_most(target: str, s: Stat | None, limit: float, unit: str, digits: int) -> None:
        value = None if s is None else s[0]
        shown = "—" if value is None else f"{value:.{digits}f}{unit}"
        checks.append((target, value is not None and value <= limit, shown))

    has = {k for k in ("A", "B") if k in d and "fluxgate" in d[k]}
    for key, title in (("A", "1,000 × 10/s"), ("B", "10,000 × 1 per 2 s")):
        if key in has:
            cpu = d[key]["ratios"]["CPU per event, window"]
            at_most(f"CPU per relayed event ≤ 1.3× nginx's ({title})", cpu, 1.3, "×", 3)
    if "A" in has:
        fg = d["A"]["fluxgate"]
        at_most("added latency per event p99 ≤ 0.5 ms at 1,000 × 10/s", fg["added_p99"], 0.5,
                " ms", 3)  # fmt: skip
        at_most("added latency per event p99.9 ≤ 1.5 ms at 1,000 × 10/s", fg["added_p999"], 1.5,
                " ms", 3)  # fmt: skip
    for key, title in (("A", "1,000 streams"), ("B", "10,000 streams")):
        if key in has:
            pss = d[key]["ratios"]["PSS per open stream"]
            at_most(f"memory per open stream ≤ nginx's ({title})", pss, 1.0, "×", 3)
    if "B" in has:
        fg = d["B"]["fluxgate"]
        shown = f"{fg['held_min']:,} held at least, {fg['failed']:,} failed"
        if fg["errors"]:
            shown += f", {len(fg['errors'])} run(s) did not finish"
        ok = not fg["failed"] and not fg["errors"] and fg["held_min"] == 10000
        checks.append(("10,000 streams held, none failed", ok, shown))
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, ok, v in checks]
    return lines


def streams_section(blob: dict[str, Any] | None) -> list[str]:
    """The BENCHMARKS.md section, between markers so that a `--streams` run can
    replace it alone; nothing for results that have none."""
    if blob is None:
        return []
    d = derive_streams(blob)
    st = blob["settings"]
    busy = blob.get("busy_before", 0.0)
    chart_path = STREAMS_CHART.relative_to(HERE.parent)
    lines = [
        STREAMS_BEGIN,
        "## Many long streams",
        "",
        f"From {blob.get('started', '?')[:10]}, commit `{blob.get('git', '?')}`"
        f" ({blob.get('seconds', 0) / 60:.1f} minutes; `python -m bench.run --streams` runs only"
        f" this). Median of {st['rounds']} interleaved rounds with (min–max); the *added* rows"
        " and the ratios pair each round with direct's or nginx's run of the same round.",
        "",
        *(
            [f"> The machine was {busy:.0%} busy with other work just before these rounds: the"
             " tails and the min–max ranges show it.", ""]
            if busy > 0.1 else []
        ),
    ]  # fmt: skip
    for key, sc in blob["scenarios"].items():
        lines += [
            f"### {key}: {sc['title']}",
            "",
            f"{sc['streams']:,} streams opened at {sc['rate']:,.0f} a second, each an event every"
            f" {sc['interval_ms']} ms; a {st['window_s']:g} s window starts {st['settle_s']:g} s"
            " after the last response head.",
            "",
            *_streams_table(sc, d[key]),
            "",
        ]
        notes = []
        for name in d[key]["systems"]:
            f = d[key][name]
            if f["errors"]:
                notes.append(f"{LABELS[name]}: runs that did not finish: " + "; ".join(f["errors"]))
            if f["unreleased"]:
                notes.append(f"{LABELS[name]}: in {f['unreleased']} run(s) the upstream still had"
                             " streams open 30 s after the client closed them all (the run"
                             " after it overlapped with them)")  # fmt: skip
            if f["log_lines"] and name != "direct":
                notes.append(f"{LABELS[name]}: {f['log_lines']} log lines during these runs, e.g. "
                             f"`{f['log_sample'][0][:200]}`")  # fmt: skip
        up = d[key]["direct"]["upstream_cpu_us_per_event"] if "direct" in d[key] else None
        if up is not None:
            notes.append(f"the tick upstream's own CPU per event: {fmt(up, 1)} µs")
        for name in ("nginx", "fluxgate"):
            fds = d[key][name]["fds"] if name in d[key] else []
            if fds and fds[0]:
                split = " / ".join(str(x) for x in fds[0])
                notes.append(f"{LABELS[name]}: open descriptors per process in the window of"
                             f" round 1 (parent first): {split}")  # fmt: skip
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += [
        "Targets:",
        "",
        *_streams_targets(d),
        "",
        *([f"![Added latency per event at 1,000 × 10/s]({chart_path})", ""] if "A" in d else []),
        "How: [bench/tick_upstream.py](bench/tick_upstream.py) (raw asyncio Protocol, uvloop; one",
        "1 ms timer wheel for all streams) writes every event as its own chunk and write, stamped",
        "with `time.monotonic_ns()` just before the write; [bench/streams.py](bench/streams.py),",
        "a uvloop client in its own process, opens the streams (`POST …/ticks`, the same prefix",
        "per system as the SSE rows above) with one raw Protocol each that de-chunks the body as",
        "it arrives and takes, for every event, the time of its read minus its stamp. **Event",
        "latency** is over the events received in the window only (steady state; the ramp is",
        "in the *response head* row: request written to status line received). **Proxy CPU**",
        "is utime+stime of the system's process tree (master and workers) over the window,",
        "divided by the events the client received in it; *whole run* is from before the",
        "first connect to after the upstream saw the last stream closed, over every event",
        "received. **PSS per open stream**: the tree's PSS (smaps_rollup, so pages shared",
        "after fork count once) in the window, the mean of its start and end, less its PSS",
        "idle before the first run, over the streams held; that idle PSS is taken after 50",
        "short streams, so the one-time costs of a system's first traffic (pages shared with",
        "the master copied on their first write, caches) are not counted as the streams'.",
        "These scenarios run on servers",
        "started for them, and the baseline is not taken anew before each run: a Python",
        "process keeps what it freed and reuses it, so a per-run baseline would show almost",
        "nothing from the second round on (the *kept* row is that memory, taken as the",
        "streams close: a worker gives the C library's free part back at its next",
        "heartbeat look, up to a minute later, fluxgate/heaptrim.py; Python's own arenas",
        "stay). Direct has no",
        "process on the path, so no CPU or memory figures. A stream **failed** if its head",
        "was not 200 or did not come within 30 s, if it closed before the end, or if it ended",
        "more than max(2 s, 2 intervals) behind its schedule; the client closes every stream",
        "after the window.",
        "nginx: `proxy_buffering off`, its default buffer size, `worker_connections 20480`;",
        "Fluxgate: `server.max_connections: 20000`; both 2 workers. Client, upstream and",
        "proxy share the machine's cores.",
        "",
        STREAMS_END,
        "",
    ]  # fmt: skip
    return lines


def streams_chart(blob: dict[str, Any], d: dict[str, Any], path: Path = STREAMS_CHART) -> None:
    """Added latency percentiles per proxy in scenario A (nothing without it)."""
    if "A" not in d:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SYSTEMS if n in d["A"]["systems"] and n != "direct"]
    colours = {"nginx": "#2ca02c", "passthrough": "#1f77b4", "fluxgate": "#d62728"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        stats = [d["A"][name].get(f"added_{p}") or (0.0, 0.0, 0.0) for p, _ in STREAM_PERCENTILES]
        meds = [s[0] for s in stats]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(STREAM_PERCENTILES))]
        ax.bar(xs, meds, width, yerr=[[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]],
               capsize=3, label=LABELS[name], color=colours.get(name, "#7f7f7f"))  # fmt: skip
        for x, st in zip(xs, stats, strict=True):  # above the whisker, not on it
            ax.text(x, max(st), f"{st[0]:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(STREAM_PERCENTILES)), [label for _, label in STREAM_PERCENTILES])
    # Medians of differences can be a little below zero at p50: a linear zone around 0.
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(top=ax.get_ylim()[1] * 2)  # room for the labels over the whiskers
    ax.set_ylabel("added latency per event over direct, ms (symlog)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    sc = blob["scenarios"]["A"]
    ax.set_title(
        f"{sc['title']}: added latency per event, {blob.get('started', '?')[:10]}, median of "
        f"{blob['settings']['rounds']} rounds, bars min–max",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_streams(blob: dict[str, Any]) -> None:
    """After `bench.run --streams`: the chart, and the section replaced (or inserted
    before "## Machine and versions") in the BENCHMARKS.md there is."""
    streams_chart(blob, derive_streams(blob))
    section = "\n".join(streams_section(blob))
    text = MARKDOWN.read_text() if MARKDOWN.exists() else "# Benchmarks\n\n"
    if STREAMS_BEGIN in text and STREAMS_END in text:
        before, _, rest = text.partition(STREAMS_BEGIN)
        after = rest.partition(STREAMS_END)[2].lstrip("\n")
        text = before + section + after
    elif "## Machine and versions" in text:
        before, _, after = text.partition("## Machine and versions")
        text = before + section + "## Machine and versions" + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    MARKDOWN.write_text(text)


def design_section() -> list[str]:
    """The figures behind design choices (bench/design.md, kept by hand): code
    comments point at this section, so every generated page carries it."""
    return [DESIGN.read_text().rstrip("\n"), ""]


def observability_section() -> list[str]:
    from .observability import section  # it imports this module's helpers

    return section()


def write(raw: dict[str, Any]) -> None:
    d = derive(raw)
    chart(raw, d)
    blob = streams_source(raw)
    if blob is not None:
        streams_chart(blob, derive_streams(blob))
    MARKDOWN.write_text(markdown(raw, d))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else HERE / "results" / "latest.json"
    write(json.loads(path.read_text()))
    print(f"wrote {MARKDOWN} and {CHART}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
