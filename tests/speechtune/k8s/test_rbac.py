"""The operator runs with only the permissions examples/k8s/operator.yaml grants it, its storage URL
from a Secret (spec.storage.secretRef), and its trial pods admitted by PodSecurity "restricted"."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys

import pytest
import yaml

from tests.speechtune.k8s.helpers import (
    REPO, delete_studies, free_port, get_json, small_study, wait_for_study_end,
)

pytestmark = pytest.mark.cluster


def operator_kubeconfig(cluster, path) -> str:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a TokenRequest token)."""
    manifests = [doc for doc in yaml.safe_load_all((REPO / "examples" / "k8s" / "operator.yaml").read_text())
                 if doc["kind"] != "Deployment"]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(doc) for doc in manifests))
    token = cluster.kubectl("create", "token", "speechtune-operator", "-n", "speechtune-system", "--duration=1h").stdout.strip()
    admin = yaml.safe_load(open(cluster.kubeconfig))
    admin["users"] = [{"name": "operator", "user": {"token": token}}]
    admin["contexts"] = [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"], "user": "operator"}}]
    admin["current-context"] = "operator"
    path.write_text(yaml.safe_dump(admin))
    return str(path)


def test_operator_with_its_own_rbac_runs_a_study_from_a_secret_url_under_restricted(crds, kube_namespace, postgres_url,
                                                                                     tmp_path):
    cluster = crds
    cluster.kubectl("label", "namespace", kube_namespace, "pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("create", "secret", "generic", "study-db", "-n", kube_namespace, f"--from-literal=url={postgres_url}")
    body = small_study("secretive", ["--epochs", "3"], maxTrials=3, parallelism=3)
    body["spec"]["storage"] = {"secretRef": {"name": "study-db", "key": "url"}}
    cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    env = dict(cluster.env, KUBECONFIG=operator_kubeconfig(cluster, tmp_path / "operator.kubeconfig"))
    env.pop("SPEECHTUNE_STORAGE_URL", None)
    log = tmp_path / "operator.log"
    operator = subprocess.Popen([sys.executable, "-m", "speechtune.k8s", "-n", kube_namespace,
                                 f"--liveness=http://127.0.0.1:{free_port()}/healthz"],
                                env=dict(env, SPEECHTUNE_METRICS_PORT=str(free_port())), cwd=REPO,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        status = wait_for_study_end(cluster, kube_namespace, "secretive", timeout=90)
        pods = get_json(cluster, "pods", "-n", kube_namespace, "-l", "speechtune.io/study=secretive")["items"]
    finally:
        delete_studies(cluster, kube_namespace)
        operator.send_signal(signal.SIGTERM)
        operator.wait(timeout=30)
    assert status["state"] == "Succeeded", (status, log.read_text()[-3000:])
    assert "forbidden" not in log.read_text().lower(), log.read_text()[-3000:]
    assert len(pods) == 3
    for pod in pods:
        env_text = json.dumps(pod["spec"]["containers"][0].get("env", []))
        assert postgres_url not in env_text and base64.b64encode(postgres_url.encode()).decode() not in env_text
        assert pod["spec"]["automountServiceAccountToken"] is False
