"""Prometheus metrics for the long-running roles (`prometheus-client`).

Roles keep plain counters on their hot paths; a collector turns a snapshot of
them into metric families only when Prometheus scrapes, so metrics cost nothing
between scrapes. Enable with a `[metrics]` table: `port = 9108` (and `host`).
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["MetricsConfig", "Snapshot", "SnapshotCollector", "serve", "scrape"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    port: int = 0            # 0: no metrics endpoint
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One metric: name, help, type ("counter" or "gauge"), label names, {labels: value}."""
    name: str
    help: str
    kind: str
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float]


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Iterable[Snapshot]]):
        self.snapshot = snapshot

    def collect(self):
        for s in self.snapshot():
            family = (CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily)(
                s.name, s.help, labels=list(s.labels))
            for labels, value in s.values.items():
                family.add_metric(list(labels), value)
            yield family


def serve(cfg: MetricsConfig, snapshot: Callable[[], Iterable[Snapshot]]):
    """Start the /metrics endpoint in a background thread; returns the server (or None)."""
    if not cfg.port:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    server, _thread = start_http_server(cfg.port, cfg.host, registry=registry)
    return server


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5) -> dict[str, float]:
    """A role's /metrics read back as {'name{labels}': value} (tests, benches)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}
