"""Scraping Fluxgate's Prometheus endpoint in tests: parsed samples and waits."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text: str = resp.read().decode()
        return text


def scrape(base_url: str, path: str = "/_fluxgate/metrics") -> Samples:
    return parse(fetch(base_url + path))


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a counter not yet touched)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def wait_for(
    base_url: str,
    name: str,
    expected: float,
    timeout: float = 5.0,
    path: str = "/_fluxgate/metrics",
    **labels: str,
) -> Samples:
    """Scrape until `name{labels}` equals `expected`: each worker counts what it
    served within 50 ms (fluxgate.metrics.FLUSH_DELAY), and gauges each second."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base_url, path)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def labels_of(samples: Samples, name: str) -> list[dict[str, Any]]:
    return [dict(ls) for (n, ls) in samples if n == name]
