"""Reading a running server's /metrics (Prometheus text format) with the standard library alone.

The names read here are the server's (serve/metrics.py): the load generator, `lstmgen bench` and
the tests read them through this one module.
"""
from __future__ import annotations

import re
import time
import urllib.request

# Gauges read from the server's /metrics -> keys of the load generator's report.
SERVER_GAUGES = {"process_resident_memory_bytes": "rss_bytes", "lstmgen_active_rows": "active_rows",
                 "lstmgen_queued_streams": "queued", "lstmgen_streams_in_system": "in_system",
                 "lstmgen_open_streams": "open_streams"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)")


def scrape_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (stdlib only)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def scrape_or_none(url: str) -> dict[str, float] | None:
    """scrape_metrics, or None if the server did not answer."""
    try:
        return scrape_metrics(url)
    except OSError:
        return None


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each counter, histogram sum and histogram count grew by between two scrapes."""
    return {k: after[k] - before[k] for k in after
            if k in before and k.split("{", 1)[0].endswith(("_total", "_sum", "_count"))}


def server_state(url: str) -> dict[str, float]:
    m = scrape_metrics(url)
    return {key: m.get(name) for name, key in SERVER_GAUGES.items()}


def wait_for(url: str, done, timeout: float = 15.0, every: float = 0.05) -> dict:
    """Poll the server's metrics until done(metrics) holds (or the time runs out); the last read."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape_metrics(url)
        if done(m) or time.monotonic() > deadline:
            return m
        time.sleep(every)


def settle(url: str, timeout: float = 10.0) -> tuple[dict, float]:
    """Poll until the server holds no rows and no streams (cancellations land between steps)."""
    t0 = time.perf_counter()
    while True:
        state = server_state(url)
        idle = not state["active_rows"] and not state["in_system"] and not state["open_streams"]
        if idle or time.perf_counter() - t0 > timeout:
            return state, time.perf_counter() - t0
        time.sleep(0.05)
