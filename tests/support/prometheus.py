"""A throwaway Prometheus server on loopback, from Debian's prometheus package.

Tests use it to show that what the dashboard asks of Prometheus is answered by a real
server scraping the real operator, not by reading the exposition text.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.postgres import _free_port

PROMETHEUS = "/usr/bin/prometheus"


class PrometheusError(RuntimeError):
    """Prometheus answered a request with an error (a PromQL syntax error, for example)."""


class PrometheusServer:
    def __init__(self, url: str):
        self.url = url

    def _get(self, path: str, **params: str | list[str]) -> object:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400/422 carry Prometheus' own message
            body = json.load(error)
        if body["status"] != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query now: the series, each ``{"metric": labels, "value": [time, "text"]}``."""
        data = self._get("/api/v1/query", query=promql)
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """The values of ``label`` on series matching ``match``, as Grafana's label_values(match, label) asks."""
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": [match]})


@contextmanager
def prometheus_server(targets: list[str], job: str, scrape_interval: str = "1s"):
    """Yield a ready PrometheusServer scraping ``targets`` (host:port) as ``job``; delete it all afterwards."""
    if not Path(PROMETHEUS).exists():
        raise RuntimeError(f"{PROMETHEUS} not found: run bin/setup (apt-get install prometheus)")
    root = Path(tempfile.mkdtemp(prefix="speechtune-prom-"))
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    log = open(root / "log", "wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address={address}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(f"http://{address}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if urllib.request.urlopen(f"{server.url}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not get ready:\n{(root / 'log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def lag_buckets(metrics_url: str, study: str | None = None) -> dict[float, float]:
    """speechtune_metric_lag_seconds scraped from a /metrics URL, as cumulative counts per upper bound:
    one study's, or (``study`` None) summed over every study."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "speechtune_metric_lag_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket") and study in (None, sample.labels.get("study")):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the rank."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0
    if not total:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower
