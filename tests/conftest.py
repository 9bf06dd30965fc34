"""Fixtures shared by the cluster tests: the CRDs installed and a real PostgreSQL."""

from __future__ import annotations

import pytest

from tests.speechtune.k8s.helpers import REPO
from tests.support.postgres import postgres_server

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
