"""The test cluster's API server behaves like a production one: admission (PodSecurity),
CRD validation rules, the pinned version, and nothing listening beyond loopback."""

import ipaddress
import json
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

PRIVILEGED_POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
    "spec": {"containers": [{"name": "main", "image": "python:3.11", "command": ["true"],
                             "securityContext": {"privileged": True}}]},
}
RESTRICTED_POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "restricted"},
    "spec": {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
             "containers": [{"name": "main", "image": "python:3.11", "command": ["true"],
                             "securityContext": {"allowPrivilegeEscalation": False,
                                                 "capabilities": {"drop": ["ALL"]}}}]},
}


def test_restricted_namespace_rejects_privileged_pod_at_admission(kube_cluster, kube_namespace):
    kube_cluster.kubectl("label", "namespace", kube_namespace, "pod-security.kubernetes.io/enforce=restricted")
    rejected = kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(PRIVILEGED_POD),
                                    check=False)
    assert rejected.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in rejected.stderr
    assert "privileged" in rejected.stderr
    # The same namespace admits a pod that meets the restricted profile.
    kube_cluster.kubectl("apply", "-n", kube_namespace, "--dry-run=server", "-f", "-",
                         input=json.dumps(RESTRICTED_POD))


def test_crd_validation_rule_rejects_bad_object_with_the_rule_message(kube_cluster, kube_namespace):
    group = f"{kube_namespace}.speechtune.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"ranges.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "ranges", "singular": "range", "kind": "Range"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object",
                     "properties": {"spec": {
                         "type": "object",
                         "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                         "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                                                       "message": "min must not exceed max"}]}}}}}]},
    }
    kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    try:
        kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/ranges.{group}", "--timeout=30s")

        def apply(lo: int, hi: int) -> subprocess.CompletedProcess:
            obj = {"apiVersion": f"{group}/v1", "kind": "Range", "metadata": {"name": f"r{lo}-{hi}"},
                   "spec": {"min": lo, "max": hi}}
            return kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(obj),
                                        check=False)

        bad = apply(5, 1)
        assert bad.returncode != 0
        assert "min must not exceed max" in bad.stderr
        good = apply(1, 5)
        assert good.returncode == 0, good.stderr
    finally:
        kube_cluster.kubectl("delete", "crd", f"ranges.{group}", "--wait=false", check=False)


def test_server_runs_the_pinned_kubernetes_version(kube_cluster):
    version = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"] == "v1.37.2"


def test_cluster_processes_listen_only_on_loopback(kube_cluster):
    state = kube_cluster.state_dir
    assert state is not None, "this check needs the cluster started by tests/cluster/up (its pid files)"
    pids = {pidfile.name: int(pidfile.read_text()) for pidfile in (state / "pids").iterdir()}
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent"}
    listening: dict[str, list[str]] = {name: [] for name in pids}
    for line in subprocess.run(["ss", "-Hltnp"], check=True, capture_output=True, text=True).stdout.splitlines():
        local = line.split()[3]
        for name, pid in pids.items():
            if re.search(rf"pid={pid},", line):
                listening[name].append(local)
    for name, addresses in listening.items():
        assert addresses, f"{name} (pid {pids[name]}) listens on nothing: is it running?"
        for address in addresses:
            host = address.rsplit(":", 1)[0].strip("[]")
            assert ipaddress.ip_address(host).is_loopback, f"{name} listens on {address}"


def test_second_up_reuses_the_healthy_cluster(kube_cluster):
    state = kube_cluster.state_dir
    assert state is not None, "this check needs the cluster started by tests/cluster/up"
    pids_before = {p.name: p.read_text() for p in (state / "pids").iterdir()}
    up = subprocess.run([Path(__file__).parent / "up"], env=dict(kube_cluster.env, SPEECHTUNE_CLUSTER_DIR=str(state)),
                        capture_output=True, text=True, timeout=60, check=True)
    assert "reusing healthy cluster" in up.stderr
    assert f"export KUBECONFIG={state / 'admin.kubeconfig'}" in up.stdout.splitlines()
    assert {p.name: p.read_text() for p in (state / "pids").iterdir()} == pids_before
