"""Trials of several pods on the real control plane (trialTemplate.replicas; docs/operator.md, "Trials across pods"):
an Indexed Job and a headless Service per run, a rendezvous over the node agent's loopback, metrics from index 0,
all pods deleted with a pruned trial, and one failed pod failing the trial, named."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer
from speechtune.backend import format_value
from tests.speechtune.k8s.helpers import get_json, operator_running, small_study, study_status, wait_for_study_end, wait_until

pytestmark = pytest.mark.cluster
LR = [{"name": "lr", "float": {"low": 1e-4, "high": 1e-3, "log": True}}]

# Each pod meets the others through torch.distributed (gloo, over MASTER_ADDR:MASTER_PORT as the pod was told), sums
# its rank + 1 with theirs, then runs the fake trainer; the other ranks with --lr=0.5 appended, so that values read
# from any log but index 0's would show.
RENDEZVOUS = """
import os, sys
import torch
import torch.distributed as dist
rank, size = int(os.environ["NODE_RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=size)
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
print(f"rendezvous: rank {rank} of {size}, sum {total.item():g}", flush=True)
dist.destroy_process_group()
extra = [] if rank == 0 else ["--lr=0.5"]
os.execvp(sys.executable, [sys.executable, "-m", "speechtune.fake_trainer", *sys.argv[1:], *extra])
"""


def two_pods(name: str, command, args: list[str], **spec) -> dict:
    body = small_study(name, args, command=command, **{"searchSpace": LR, **spec})
    body["spec"]["trialTemplate"].update(replicas=2, resources={"limits": {"nvidia.com/gpu": 1, "cpu": "500m"}})
    return body


def pods_of(cluster, namespace: str, study: str, trial: int) -> list[dict]:
    return get_json(cluster, "pods", "-n", namespace, "-l", f"speechtune.io/study={study},speechtune.io/trial={trial}")["items"]


def running(cluster, namespace: str, study: str, trial: int) -> list[dict]:
    pods = [pod for pod in pods_of(cluster, namespace, study, trial) if pod["status"].get("phase") == "Running"]
    return pods if len(pods) == 2 else []


def index(pod: dict) -> int:
    return int(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def test_a_two_pod_trial_meets_over_its_rendezvous_and_succeeds_with_index_0s_metrics(crds, kube_namespace, postgres_url,
                                                                                     monkeypatch):
    cluster = crds
    body = two_pods("pair", ("python", "-c", RENDEZVOUS), ["--epochs", "3"])
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(cluster, kube_namespace, "pair", timeout=180)
        job = get_json(cluster, "job", "pair-0", "-n", kube_namespace)
        service = get_json(cluster, "service", "pair-0", "-n", kube_namespace)
        pods = sorted(pods_of(cluster, kube_namespace, "pair", 0), key=index)
        logs = [cluster.kubectl("logs", "-n", kube_namespace, pod["metadata"]["name"]).stdout for pod in pods]
    assert status["state"] == "Succeeded", status
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["kind"] == "SpeechTuningTrial"
    assert [index(pod) for pod in pods] == [0, 1] and [pod["spec"]["hostname"] for pod in pods] == ["pair-0-0", "pair-0-1"]
    assert "rendezvous: rank 0 of 2, sum 3" in logs[0] and "rendezvous: rank 1 of 2, sum 3" in logs[1], logs
    trial = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url).trials[0]
    assert trial.state == TrialState.COMPLETE
    params = {"lr": format_value(trial.params["lr"])}
    assert trial.intermediate_values == pytest.approx({step: fake_trainer.wer(params, step) for step in (1, 2, 3)})
    other = {"lr": "0.5"}
    assert trial.intermediate_values[1] != pytest.approx(fake_trainer.wer(other, 1))


# Trial 0 runs at the optimum and completes; trial 1, far from it and slow, is pruned by the median rule at its first step.
PRUNED_SECOND = """case "$SPEECHTUNE_TRIAL" in
  0) exec python -m speechtune.fake_trainer "$@" --epochs 3 --lr=0.0003 ;;
  *) exec python -m speechtune.fake_trainer "$@" --epochs 60 --sleep 3 --lr=0.5 ;;
esac"""


def test_pruning_a_two_pod_trial_deletes_both_its_pods(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    body = two_pods("pruned", ("sh", "-c", PRUNED_SECOND, "trainer"), [], maxTrials=2,
                    pruner={"type": "median", "startupTrials": 1, "warmupSteps": 0})
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        both = wait_until(lambda: running(cluster, kube_namespace, "pruned", 1), timeout=90, what="trial 1's two pods running")
        status = wait_for_study_end(cluster, kube_namespace, "pruned", timeout=90)
        wait_until(lambda: not pods_of(cluster, kube_namespace, "pruned", 1), timeout=60, what="both pods of the pruned trial gone")
        trial = get_json(cluster, "strial", "pruned-1", "-n", kube_namespace)["status"]
        jobs = get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=pruned,speechtune.io/trial=1")["items"]
    assert sorted(map(index, both)) == [0, 1]
    assert status["state"] == "Succeeded" and trial["state"] == "Pruned", (status, trial)
    assert not jobs


def test_killing_one_pod_of_a_running_two_pod_trial_fails_the_trial_naming_that_pod(crds, kube_namespace, postgres_url,
                                                                                   monkeypatch):
    cluster = crds
    body = two_pods("killed", ("python", "-m", "speechtune.fake_trainer"), ["--epochs", "60", "--sleep", "2"])
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        both = wait_until(lambda: running(cluster, kube_namespace, "killed", 0), timeout=90, what="the trial's two pods running")
        victim = next(pod["metadata"]["name"] for pod in both if index(pod) == 1)
        cluster.kubectl("delete", "pod", victim, "-n", kube_namespace, "--wait=false")
        wait_until(lambda: study_status(cluster, kube_namespace, "killed").get("state") in ("Succeeded", "Failed"),
                   timeout=90, what="the study to end")
        trial = get_json(cluster, "strial", "killed-0", "-n", kube_namespace)["status"]
        wait_until(lambda: all(pod["status"].get("phase") in ("Succeeded", "Failed") for pod in pods_of(cluster, kube_namespace,
                   "killed", 0)), timeout=60, what="index 0 to be stopped too")
    assert (trial["state"], trial["reason"]) == ("Failed", "Error") and victim in trial["message"], trial
    assert "exited with code 143" in trial["message"], trial  # SIGTERM: deleted


@pytest.mark.slow
@pytest.mark.trainer
def test_a_two_pod_nemo_trial_trains_one_model_ddp_over_gloo_and_succeeds(crds, kube_namespace, postgres_url, monkeypatch,
                                                                         tmp_path):
    """The NeMo trainer on CPU, one process per pod, 2 pods: --num-nodes comes from WORLD_SIZE, the ranks meet at
    MASTER_ADDR:MASTER_PORT (the node agent's loopback), and only global rank 0 (index 0) prints protocol lines."""
    cluster = crds
    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "speechtune_trainer.cli", "make-data", "--out", str(data), "--hours", "0.03",
                    "--seed", "1", "--workers", "2"], check=True, capture_output=True)
    body = two_pods("nemo-pair", ("speechtune-trainer", "asr"),
                    ["--data", str(data), "--epochs", "1", "--accelerator", "cpu", "--devices", "1", "--threads", "1",
                     "--num-layers", "1", "--n-mels", "40", "--d-model", "48"],
                    searchSpace=[{"name": "lr", "float": {"low": 1e-3, "high": 6e-3, "log": True}}])
    body["spec"]["trialTemplate"]["resources"] = {"limits": {"cpu": "1"}}
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(cluster, kube_namespace, "nemo-pair", timeout=420)
        pods = sorted(pods_of(cluster, kube_namespace, "nemo-pair", 0), key=index)
        logs = [cluster.kubectl("logs", "-n", kube_namespace, pod["metadata"]["name"]).stdout for pod in pods]
    assert status["state"] == "Succeeded", (status, [log[-3000:] for log in logs])
    trial = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url).trials[0]
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == [1], trial.user_attrs
    assert 0 <= trial.value <= 1.5 and {"wer", "cer"} <= set(trial.user_attrs["metrics"])
    assert '{"speechtune"' in logs[0] and '{"speechtune"' not in logs[1], logs[1][-3000:]
