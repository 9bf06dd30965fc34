"""Fixtures for the operator's cluster tests: the CRDs installed, a real PostgreSQL, the operator in-process."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from tests.support.postgres import postgres_server

REPO = Path(__file__).resolve().parents[3]
CRDS = REPO / "crds"


@pytest.fixture(scope="session")
def crds(kube_cluster):
    """The two CRDs, applied server-side (as `kubectl apply` would) and established."""
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    for name in ("speechtuningstudies.speechtune.io", "speechtuningtrials.speechtune.io"):
        kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
    return kube_cluster


@pytest.fixture(scope="session")
def postgres_url():
    with postgres_server() as server:
        yield server.url


@contextlib.contextmanager
def operator_running(cluster, namespace: str, storage_url: str, monkeypatch, extra_env: dict | None = None):
    """The operator in this process (kopf's KopfRunner), watching one namespace."""
    from kopf.testing import KopfRunner

    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    monkeypatch.setenv("SPEECHTUNE_STORAGE_URL", storage_url)
    for name, value in (extra_env or {}).items():
        monkeypatch.setenv(name, value)
    with KopfRunner(["run", "--standalone", "-n", namespace, "-m", "speechtune.k8s.handlers"], timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output


def get_json(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
