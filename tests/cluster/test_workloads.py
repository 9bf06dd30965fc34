"""The test cluster runs real workloads: the real scheduler, Job controller and garbage
collector act on pods that the process-based GPU node agent runs and reports on."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from tests.speechtune.k8s.helpers import bound_claim

pytestmark = pytest.mark.cluster


def job_manifest(name: str, code: str, gpus: int = 1) -> str:
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python:3.11", "command": ["python", "-c", code],
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}},
    })


def pod_manifest(name: str, code: str, grace_seconds: int = 30, **container) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace_seconds, "containers": [
            {"name": "main", "image": "python:3.11", "command": ["python", "-c", code], **container}]},
    })


def pod_json(cluster, namespace: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def wait_for_phase(cluster, namespace: str, name: str, phase: str) -> None:
    cluster.kubectl("wait", f"--for=jsonpath={{.status.phase}}={phase}", f"pod/{name}", "-n", namespace,
                    "--timeout=60s")


def test_gpu_job_completes_and_kubectl_logs_returns_its_output(kube_cluster, kube_namespace):
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=job_manifest("hello", "print('hello')"))
    kube_cluster.kubectl("wait", "--for=condition=Complete", "job/hello", "-n", kube_namespace, "--timeout=60s")
    logs = kube_cluster.kubectl("logs", "job/hello", "-n", kube_namespace)
    assert logs.stdout == "hello\n"


def test_deleting_job_in_background_makes_garbage_collector_delete_its_pod(kube_cluster, kube_namespace):
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=job_manifest("gc", "print('done')"))
    kube_cluster.kubectl("wait", "--for=condition=Complete", "job/gc", "-n", kube_namespace, "--timeout=60s")
    pods = kube_cluster.kubectl("get", "pods", "-n", kube_namespace, "-l", "batch.kubernetes.io/job-name=gc",
                                "-o", "name").stdout.split()
    assert len(pods) == 1
    kube_cluster.kubectl("delete", "job", "gc", "-n", kube_namespace, "--cascade=background")
    kube_cluster.kubectl("wait", "--for=delete", pods[0], "-n", kube_namespace, "--timeout=60s")


def test_failing_job_is_marked_failed_with_the_exit_code(kube_cluster, kube_namespace):
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                         input=job_manifest("fails", "import sys; sys.exit(3)"))
    kube_cluster.kubectl("wait", "--for=condition=Failed", "job/fails", "-n", kube_namespace, "--timeout=60s")
    pod = json.loads(kube_cluster.kubectl("get", "pods", "-n", kube_namespace, "-l",
                                          "batch.kubernetes.io/job-name=fails", "-o", "json").stdout)["items"][0]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (pod["status"]["phase"], terminated["exitCode"], terminated["reason"]) == ("Failed", 3, "Error")


def test_pod_asking_for_nine_gpus_stays_pending_unschedulable(kube_cluster, kube_namespace):
    pod = json.loads(pod_manifest("greedy", "print('never runs')", resources={"limits": {"nvidia.com/gpu": "9"}}))
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(pod))
    kube_cluster.kubectl("wait", "--for=condition=PodScheduled=false", "pod/greedy", "-n", kube_namespace,
                         "--timeout=60s")
    status = pod_json(kube_cluster, kube_namespace, "greedy")["status"]
    scheduled = next(c for c in status["conditions"] if c["type"] == "PodScheduled")
    assert status["phase"] == "Pending"
    assert scheduled["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]


def test_container_env_resolves_values_and_pod_field_refs(kube_cluster, kube_namespace):
    env = [{"name": "GREETING", "value": "hi"},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    code = "import os, sys; print(os.environ['GREETING'], os.environ['POD'], os.environ['NS'], sys.prefix)"
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=pod_manifest("env", code, env=env))
    wait_for_phase(kube_cluster, kube_namespace, "env", "Succeeded")
    greeting, pod, namespace, prefix = kube_cluster.kubectl("logs", "env", "-n", kube_namespace).stdout.split()
    assert (greeting, pod, namespace) == ("hi", "env", kube_namespace)
    assert prefix.endswith(".venv"), "the repo's virtualenv must come first on the pod's PATH"


def test_kubectl_logs_follow_streams_lines_while_the_process_prints_them(kube_cluster, kube_namespace):
    code = "import time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n    time.sleep(1)"
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=pod_manifest("talker", code))
    wait_for_phase(kube_cluster, kube_namespace, "talker", "Running")
    kubectl = shutil.which("kubectl", path=kube_cluster.env["PATH"])
    follow = subprocess.Popen([kubectl, "logs", "-f", "talker", "-n", kube_namespace], env=kube_cluster.env,
                              stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, follow.kill)  # a stream that never ends must fail the test, not hang it
    watchdog.start()
    arrivals = {}
    try:
        for line in follow.stdout:
            arrivals[line.strip()] = time.monotonic()
        assert follow.wait() == 0, "kubectl logs -f did not end when the container ended"
    finally:
        watchdog.cancel()
        follow.kill()
    assert list(arrivals) == [f"line {i}" for i in range(5)]
    # Buffered or non-streaming output would arrive in one burst when the process ends.
    assert arrivals["line 4"] - arrivals["line 0"] > 2.5


def test_kubectl_logs_tail_since_time_and_limit_bytes_filter_output(kube_cluster, kube_namespace):
    code = "import time; print('early', flush=True); time.sleep(2.2); print('late')"
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=pod_manifest("twolines", code))
    wait_for_phase(kube_cluster, kube_namespace, "twolines", "Succeeded")
    logs = lambda *flags: kube_cluster.kubectl("logs", "twolines", "-n", kube_namespace, *flags).stdout  # noqa: E731
    assert logs() == "early\nlate\n"
    assert logs("--tail=1") == "late\n"
    assert logs("--limit-bytes=3") == "ear"
    stamped = logs("--timestamps").splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["early", "late"]
    late_second = stamped[1].split(" ", 1)[0][:19] + "Z"  # the API passes sinceTime with second precision
    assert logs(f"--since-time={late_second}") == "late\n"


def test_sigkilled_container_process_is_reported_oomkilled_with_exit_code_137(kube_cluster, kube_namespace):
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                         input=pod_manifest("victim", "import time; time.sleep(600)"))
    wait_for_phase(kube_cluster, kube_namespace, "victim", "Running")
    status = pod_json(kube_cluster, kube_namespace, "victim")["status"]["containerStatuses"][0]
    assert status["state"]["running"]["startedAt"]
    os.kill(int(status["containerID"].removeprefix("speechtune://")), signal.SIGKILL)
    wait_for_phase(kube_cluster, kube_namespace, "victim", "Failed")
    terminated = pod_json(kube_cluster, kube_namespace, "victim")["status"]["containerStatuses"][0]["state"]
    assert terminated["terminated"]["reason"] == "OOMKilled"
    assert terminated["terminated"]["exitCode"] == 137


def test_deleting_running_pod_sends_sigterm_and_completes_the_deletion(kube_cluster, kube_namespace):
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)")
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-",
                         input=pod_manifest("graceful", code, grace_seconds=60))
    wait_for_phase(kube_cluster, kube_namespace, "graceful", "Running")
    start = time.monotonic()
    kube_cluster.kubectl("delete", "pod", "graceful", "-n", kube_namespace, "--wait=true", "--timeout=50s")
    # Had SIGTERM not reached the process, deletion would take the full 60 s grace period.
    assert time.monotonic() - start < 30


def test_an_indexed_jobs_pods_meet_on_loopback_with_their_jobs_own_port(kube_cluster, kube_namespace):
    """A pod with a subdomain (a headless Service's) reads a variable naming a pod of that subdomain as 127.0.0.1,
    and MASTER_PORT as a free port of its Job's own, the same in each of its pods (docs/cluster.md)."""
    code = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            "('MASTER_ADDR', 'MASTER_PORT', 'PET_MASTER_ADDR', 'NODE_RANK', 'HOSTNAME', 'OTHER')}))")
    rank = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    env = [{"name": "MASTER_ADDR", "value": "pair-0.pair"}, {"name": "MASTER_PORT", "value": "29500"},
           {"name": "PET_MASTER_ADDR", "value": f"pair-0.pair.{kube_namespace}.svc.cluster.local"},
           {"name": "NODE_RANK", "valueFrom": rank}, {"name": "OTHER", "value": "pair-0.elsewhere"}]
    jobs = [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
        "completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "subdomain": name,
            "containers": [{"name": "main", "image": "python:3.11", "command": ["python", "-c", code], "env": env}]}}}}
        for name in ("pair", "other")]
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input="\n---\n".join(map(json.dumps, jobs)))
    seen = {}
    for name in ("pair", "other"):
        kube_cluster.kubectl("wait", "--for=condition=Complete", f"job/{name}", "-n", kube_namespace, "--timeout=60s")
        for index in (0, 1):
            pod = kube_cluster.kubectl("get", "pods", "-n", kube_namespace, "-o", "name", "-l",
                                       f"batch.kubernetes.io/job-name={name},batch.kubernetes.io/job-completion-index={index}")
            seen[name, index] = json.loads(kube_cluster.kubectl("logs", pod.stdout.strip(), "-n", kube_namespace).stdout)
    pair = seen["pair", 0]
    assert (pair["MASTER_ADDR"], pair["PET_MASTER_ADDR"], pair["OTHER"]) == ("127.0.0.1", "127.0.0.1", "pair-0.elsewhere")
    assert [seen["pair", i]["NODE_RANK"] for i in (0, 1)] == ["0", "1"]
    assert [seen["pair", i]["HOSTNAME"] for i in (0, 1)] == ["pair-0", "pair-1"]
    assert seen["pair", 0]["MASTER_PORT"] == seen["pair", 1]["MASTER_PORT"] != "29500"
    assert seen["other", 0]["MASTER_PORT"] == seen["other", 1]["MASTER_PORT"] != seen["pair", 0]["MASTER_PORT"]


def test_pods_sharing_a_claim_see_each_others_files(kube_cluster, kube_namespace, tmp_path):
    """A persistentVolumeClaim volume: the agent maps its mountPath to the bound PV's hostPath directory in the
    container's args and env (docs/cluster.md), so pods of one claim share files, as on a real volume."""
    host = tmp_path / "shared-claim"
    code = ("import os, sys\n"
            "mine, theirs = sys.argv[1], sys.argv[2]\n"
            "os.makedirs(os.path.dirname(mine), exist_ok=True)\n"
            "open(mine, 'w').write(os.environ['HOSTNAME'])\n"
            "print(open(theirs).read() if os.path.exists(theirs) else '-', os.environ['DATA'], flush=True)")

    def pod(name: str, other: str) -> dict:
        container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code],
                     "args": [f"/data/{name}/note", f"/data/{other}/note"], "env": [{"name": "DATA", "value": "/data"}],
                     "volumeMounts": [{"name": "shared", "mountPath": "/data"}]}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"restartPolicy": "Never", "containers": [container],
                         "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}}]}}

    with bound_claim(kube_cluster, kube_namespace, "shared", host):
        outputs = {}
        for name, other in (("writer", "reader"), ("reader", "writer")):  # one after the other
            kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(pod(name, other)))
            wait_for_phase(kube_cluster, kube_namespace, name, "Succeeded")
            outputs[name] = kube_cluster.kubectl("logs", name, "-n", kube_namespace).stdout.split()
    assert outputs == {"writer": ["-", str(host)], "reader": ["writer", str(host)]}
    assert {path.parent.name: path.read_text() for path in host.glob("*/note")} == {"writer": "writer", "reader": "reader"}
