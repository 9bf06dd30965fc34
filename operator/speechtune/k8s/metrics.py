"""The operator's own Prometheus metrics, next to the engine's (speechtune.metrics), on one endpoint."""

from __future__ import annotations

from prometheus_client import Histogram, start_http_server

RECONCILE_SECONDS = Histogram(
    "speechtune_reconcile_seconds", "Time to mirror a study's engine state into its status and Trials",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")),
)


def serve(port: int, address: str) -> None:
    """Serve /metrics (all of speechtune's metrics) from a background thread, as prometheus_client does."""
    start_http_server(port, addr=address)
