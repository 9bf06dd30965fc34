"""Helpers for the operator's cluster tests: the operator in-process, study manifests, polling."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "k8s" / "fake-study.yaml"
# The tests' operator lets studies name the test databases (a real PostgreSQL on loopback) in spec.storage.url and
# spec.warmStart.storage.url, as the chart's storage.allowStudyUrls would; the operator's own default allows none.
STUDY_URL_ALLOW_LIST = {"SPEECHTUNE_STUDY_URL_SCHEMES": "postgresql,postgresql+psycopg,postgresql+psycopg2",
                        "SPEECHTUNE_STUDY_URL_HOSTS": "127.0.0.1"}


@contextlib.contextmanager
def operator_running(cluster, namespace: str, storage_url: str, monkeypatch, extra_env: dict | None = None):
    """The operator in this process (kopf's KopfRunner), watching one namespace."""
    from kopf.testing import KopfRunner

    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    monkeypatch.setenv("SPEECHTUNE_STORAGE_URL", storage_url)
    for name, value in {**STUDY_URL_ALLOW_LIST, **(extra_env or {})}.items():
        monkeypatch.setenv(name, value)
    with KopfRunner(["run", "--standalone", "-n", namespace, "-m", "speechtune.k8s.handlers"], timeout=60) as runner:
        try:
            yield runner
        finally:
            delete_studies(cluster, namespace)
    assert runner.exception is None, runner.output


def start_operator(cluster, namespace: str, storage_url: str, log_path, liveness_port: int,
                   extra_env: dict | None = None) -> subprocess.Popen:
    """The operator as its own process (`python -m speechtune.k8s`), for tests that SIGKILL it."""
    env = dict(cluster.env, **STUDY_URL_ALLOW_LIST, SPEECHTUNE_STORAGE_URL=storage_url, SPEECHTUNE_METRICS_PORT=str(free_port()),
               **(extra_env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "speechtune.k8s", "-n", namespace, f"--liveness=http://127.0.0.1:{liveness_port}/healthz"],
        env=env, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def stop_operator(process: subprocess.Popen) -> None:
    """SIGTERM, as a kubelet would; SIGKILL if it has not stopped within 20 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def healthy(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def delete_studies(cluster, namespace: str) -> None:
    """Delete the namespace's studies while the operator runs: it holds their finalizer, and without
    it running the namespace could never be deleted."""
    cluster.kubectl("delete", "speechtuningstudies", "--all", "-n", namespace, "--timeout=60s")


def small_study(name: str, args: list[str], *, command=("python", "-m", "speechtune.fake_trainer"), **spec) -> dict:
    """The example study, renamed, one trial at a time unless ``spec`` says otherwise."""
    body = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["metadata"] = {"name": name}
    body["spec"].update({"maxTrials": 1, "parallelism": 1, "maxFailedTrials": 1, "pruner": {"type": "none"}, **spec})
    body["spec"]["trialTemplate"].update(command=list(command), args=args)
    return body


def get_json(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def study_status(cluster, namespace: str, name: str) -> dict:
    return get_json(cluster, "speechtuningstudy", name, "-n", namespace).get("status") or {}


def events(cluster, namespace: str, name: str) -> list[str]:
    listing = get_json(cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return [event["reason"] for event in listing["items"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_study_end(cluster, namespace: str, name: str, timeout: float) -> dict:
    """The study's status once it is Succeeded or Failed."""
    def ended() -> dict:
        status = study_status(cluster, namespace, name)
        return status if status.get("state") in ("Succeeded", "Failed") else {}

    return wait_until(ended, timeout=timeout, what=f"study {name} to finish")


def survive_kills(cluster, namespace: str, study: str, storage_url: str, log_path, rng, timeout: float,
                  extra_env: dict | None = None) -> tuple[dict, list[dict]]:
    """Run the operator as its own process, SIGKILL it three times while ``study``'s trials run (a
    fresh one each time), and let the last one finish the study; its final status and Jobs."""
    port = free_port()
    operator = start_operator(cluster, namespace, storage_url, log_path, port, extra_env)
    try:
        wait_until(lambda: healthy(port), timeout=30, what="the operator's liveness endpoint")
        for _ in range(3):
            time.sleep(rng.uniform(2, 6))
            wait_until(lambda: study_status(cluster, namespace, study).get("trials", {}).get("running"),
                       timeout=30, what="trials running when the operator is killed")
            os.kill(operator.pid, signal.SIGKILL)
            operator.wait()
            operator = start_operator(cluster, namespace, storage_url, log_path, port, extra_env)
        status = wait_for_study_end(cluster, namespace, study, timeout=timeout)
        jobs = get_json(cluster, "jobs", "-n", namespace, "-l", f"speechtune.io/study={study}")["items"]
    finally:
        delete_studies(cluster, namespace)
        stop_operator(operator)
    return status, jobs


@contextlib.contextmanager
def bound_claim(cluster, namespace: str, name: str, host_dir: Path):
    """A PersistentVolumeClaim ``name`` bound to a hostPath PV on ``host_dir``, statically (storageClassName "",
    the PV's claimRef and the claim's volumeName name each other; the controller-manager's PV controller marks
    both Bound, which the scheduler's VolumeBinding plugin requires; the node agent gives pods the claim by
    rewriting its mount path, tests/cluster/node_agent.py). Yields the PV's name; deletes the PV on exit (the
    claim goes with its namespace)."""
    volume = f"{namespace}-{name}"[:63].rstrip("-")
    size = {"storage": "1Gi"}
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
          "spec": {"capacity": size, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(host_dir), "type": "DirectoryOrCreate"},
                   "claimRef": {"namespace": namespace, "name": name}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                    "resources": {"requests": size}}}
    host_dir.mkdir(parents=True, exist_ok=True)
    cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, pvc]}))
    try:
        cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", f"pvc/{name}", "-n", namespace, "--timeout=60s")
        yield volume
    finally:
        cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)
