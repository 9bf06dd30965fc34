"""The node agent reports a pod that ends while kube-apiserver is down once it is back, as a kubelet does
(issue 14, item 6): its status updates are retried, not lost.

The test runs its own node agent, from this working tree, for a node of its own: the cluster's agent may be
older than the code under test. That node is cordoned, so the scheduler never puts another test's pod there;
the test's pod names it (spec.nodeName).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.cluster.plugin import CLUSTER_DIR

pytestmark = pytest.mark.cluster


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def own_node(kube_cluster, tmp_path):
    """(node name, agent log): a cordoned node served by a node agent started from this working tree."""
    state = kube_cluster.state_dir
    if state is None:
        pytest.skip("needs the tests/cluster/up cluster (its PKI)")
    prefix = f"outage-{uuid.uuid4().hex[:6]}"
    node = f"{prefix}-0"
    kube_cluster.kubectl("create", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"speechtune.dev/node-agent": "true"}},
         "spec": {"unschedulable": True}}))
    log = tmp_path / "node-agent.log"
    agent = subprocess.Popen(
        [sys.executable, CLUSTER_DIR / "node_agent.py", "--kubeconfig", state / "node-agent.kubeconfig",
         "--state-dir", tmp_path / "agent", "--port", str(free_port()), "--cert", state / "pki" / "node-agent.crt",
         "--key", state / "pki" / "node-agent.key", "--client-ca", state / "pki" / "ca.crt", "--nodes", "1",
         "--node-prefix", prefix, "--gpus", "1", "--repo", CLUSTER_DIR.parents[1]],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        kube_cluster.kubectl("wait", "--for=condition=Ready", f"node/{node}", "--timeout=60s")
        yield node, log
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
        kube_cluster.kubectl("delete", "pods", "--all-namespaces", "--field-selector", f"spec.nodeName={node}",
                             "--grace-period=0", "--force", check=False)  # left by a failure: nobody runs them now
        kube_cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def phase(cluster, namespace: str, name: str) -> str:
    return cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout


def test_a_pod_that_ends_while_the_apiserver_is_down_is_reported_once_it_is_back(kube_cluster, kube_namespace,
                                                                                 own_node, apiserver_outage, tmp_path):
    node, agent_log = own_node
    gate = tmp_path / "gate"
    code = f"import os, time\nprint('waiting', flush=True)\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ends-in-outage"},
           "spec": {"nodeName": node, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": "python:3.11", "command": ["python", "-c", code]}]}}
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(pod))
    try:
        kube_cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/ends-in-outage", "-n",
                             kube_namespace, "--timeout=60s")
        status = json.loads(kube_cluster.kubectl("get", "pod", "ends-in-outage", "-n", kube_namespace, "-o",
                                                 "json").stdout)["status"]["containerStatuses"][0]
        pid = int(status["containerID"].removeprefix("speechtune://"))
        with apiserver_outage():
            gate.touch()  # the container exits now, while nobody can hear of it
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.5)  # the agent's report, and a retry or two, fail
        back = time.monotonic()
        deadline = back + 30
        while phase(kube_cluster, kube_namespace, "ends-in-outage") != "Succeeded":
            assert time.monotonic() < deadline, (
                "the pod's end, during the outage, never reached the API server:\n" + agent_log.read_text()[-3000:])
            time.sleep(0.2)
        reported = time.monotonic() - back
        pod = json.loads(kube_cluster.kubectl("get", "pod", "ends-in-outage", "-n", kube_namespace, "-o", "json").stdout)
    finally:
        kube_cluster.kubectl("delete", "pod", "ends-in-outage", "-n", kube_namespace, "--wait=true", "--timeout=30s",
                             check=False)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert "will retry" in agent_log.read_text()  # the report did fail while the API server was down
    print(f"the pod's end reached the API server {reported:.1f} s after it was back")
