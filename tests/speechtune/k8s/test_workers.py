"""Warm worker pods on the real control plane: studies whose runs share pods, with the operator in
process and as its own process that is SIGKILLed (docs/operator.md, "Warm worker pods")."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import time
import urllib.request

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer
from speechtune.backend import format_value
from tests.speechtune.k8s.helpers import (
    REPO, events, free_port, get_json, operator_running, small_study, study_status, survive_kills, wait_for_study_end, wait_until,
)

pytestmark = pytest.mark.cluster
WARM_EXAMPLE = REPO / "examples" / "k8s" / "fake-warm.yaml"


def dispatch_env() -> dict[str, str]:
    port = free_port()
    return {"SPEECHTUNE_DISPATCH_PORT": str(port), "SPEECHTUNE_DISPATCH_URL": f"http://127.0.0.1:{port}"}


def warm(body: dict, **workers) -> dict:
    body["spec"]["trialTemplate"]["workers"] = {"mode": "warm", "stopGraceSeconds": 5, **workers}
    return body


def pods(cluster, namespace: str, study: str) -> list[dict]:
    return get_json(cluster, "pods", "-n", namespace, "-l", f"speechtune.io/study={study}")["items"]


def assert_values_are_the_printed_ones(trials) -> None:
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            printed = {step: fake_trainer.wer({name: format_value(value) for name, value in trial.params.items()}, step)
                       for step in range(1, (trial.last_step or 0) + 1)}
            assert trial.intermediate_values == pytest.approx(printed), trial.number


def test_warm_example_runs_every_trial_in_worker_pods_and_looks_like_one_job_per_trial(crds, kube_namespace, postgres_url,
                                                                                     monkeypatch):
    cluster = crds
    metrics_port = free_port()
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch,
                          {"SPEECHTUNE_METRICS_PORT": str(metrics_port), **dispatch_env()}):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", str(WARM_EXAMPLE))
        status = wait_for_study_end(cluster, kube_namespace, "fake-warm", timeout=180)
        jobs = get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=fake-warm")["items"]
        table = cluster.kubectl("get", "strial", "-n", kube_namespace).stdout
        trial_objects = get_json(cluster, "strial", "-n", kube_namespace)["items"]
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        wait_until(lambda: not pods(cluster, kube_namespace, "fake-warm"), timeout=30, what="worker pods to go after the study ended")
    assert status["state"] == "Succeeded", status
    assert status["trials"]["total"] == 20
    assert not [job for job in jobs if "speechtune.io/trial" in job["metadata"]["labels"]], "a trial got a Job of its own"
    assert len(trial_objects) == 20 and all(t["status"]["state"] in ("Complete", "Pruned") for t in trial_objects)
    assert "fake-warm-0" in table
    reasons = events(cluster, kube_namespace, "fake-warm")
    assert {"TrialStarted", "TrialCompleted", "StudySucceeded"} <= set(reasons)
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    assert_values_are_the_printed_ones(study.get_trials())
    idle = [line for line in scraped.splitlines() if line.startswith("speechtune_worker_idle_seconds_total{")]
    assert idle and float(idle[0].split()[-1]) >= 0


def test_warm_study_survives_three_operator_kills_with_no_run_twice_and_no_value_lost(crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    ledger = tmp_path / "ledger"
    body = warm(small_study("warm-survivor", ["--epochs", "9", "--sleep", "0.3", f"--ledger={ledger}"], maxTrials=24,
                            parallelism=4, maxFailedTrials=3, pruner={"type": "median", "startupTrials": 4, "warmupSteps": 3}))
    cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    log_path = tmp_path / "operator.log"
    status, jobs = survive_kills(cluster, kube_namespace, "warm-survivor", postgres_url, log_path, random.Random(11),
                                 timeout=240, extra_env=dispatch_env())
    left = wait_until(lambda: not pods(cluster, kube_namespace, "warm-survivor") or None, timeout=60,
                      what="no pod of the study left after it was deleted") if pods(cluster, kube_namespace, "warm-survivor") else True
    assert left
    assert status["state"] == "Succeeded", (status, log_path.read_text()[-3000:])
    assert not [job for job in jobs if "speechtune.io/trial" in job["metadata"]["labels"]]
    trials = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url).get_trials()
    assert len(trials) == 24
    runs = collections.Counter(int(line) for line in ledger.read_text().split())
    assert not [number for number, count in runs.items() if count > 1], f"trial numbers that ran twice: {runs}"
    assert set(runs) == {t.number for t in trials if t.state != TrialState.FAIL}
    assert_values_are_the_printed_ones(trials)


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_worker_cannot_report_for_another_workers_run(crds, kube_namespace, postgres_url, monkeypatch):
    """Trial 0's worker prints WER 0 for trial 1's run (in worker 2) and untagged: both are ignored and counted."""
    cluster = crds
    port = free_port()
    body = warm(small_study("forger", ["--epochs", "4", "--sleep", "0.4", "--forge", "trial-1@forger-worker-2#1"],
                            maxTrials=2, parallelism=2))
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch, {"SPEECHTUNE_METRICS_PORT": str(port), **dispatch_env()}):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(cluster, kube_namespace, "forger", timeout=120)
        ignored = scrape(port, "speechtune_worker_ignored_lines_total")
    assert status["state"] == "Succeeded", status
    trials = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url).get_trials()
    assert {t.number for t in trials} == {0, 1}
    assert all(t.value != 0.0 for t in trials), "a forged WER 0 reached a trial"
    assert_values_are_the_printed_ones(trials)
    assert ignored >= 3 * 4, f"4 epochs x (2 untagged + 1 forged) lines should be counted, got {ignored}"


def test_a_worker_killed_mid_run_fails_its_trial_with_the_reason_and_the_study_goes_on(crds, kube_namespace, postgres_url,
                                                                                    monkeypatch, tmp_path):
    cluster = crds
    mark = f"worker-under-test-{kube_namespace}"
    body = warm(small_study("killed", ["--epochs", "6", "--sleep", "0.5"], maxTrials=3, parallelism=1, maxFailedTrials=2))
    body["spec"]["trialTemplate"]["env"] = [{"name": "KILL_MARK", "value": mark}]
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch, dispatch_env()):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        def trainers() -> list[int]:
            return [pid for pid in marked_processes(mark) if "speechtune.fake_trainer" in command_line(pid)
                    and "speechtune.podworker" not in command_line(pid)]

        wait_until(lambda: study_status(cluster, kube_namespace, "killed").get("trials", {}).get("running"), 60, "a running trial")
        found = wait_until(trainers, 60, "the worker pod's trainer process")
        time.sleep(2)  # mid-run: 6 epochs of 0.5 s
        assert len(found) == 1, found
        os.kill(found[0], signal.SIGKILL)
        status = wait_for_study_end(cluster, kube_namespace, "killed", timeout=120)
        failed = get_json(cluster, "strial", "killed-0", "-n", kube_namespace)["status"]
    assert status["state"] == "Succeeded", status
    assert status["trials"]["failed"] == 1 and status["trials"]["complete"] == 2, status
    assert failed["state"] == "Failed" and failed["reason"] == "WorkerDied", failed
    assert "killed-worker-1" in failed["message"] and "137" in failed["message"], failed
    wait_until(lambda: not marked_processes(mark), 30, "no worker process left once the study ended (retired, then deleted)")


def marked_processes(mark: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read()
            except OSError:
                continue
            if f"KILL_MARK={mark}".encode() in environ.split(b"\0"):
                found.append(int(entry))
    return found


def command_line(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_trainer_that_is_no_worker_runs_every_trial_as_its_own_job(crds, kube_namespace, postgres_url, monkeypatch, tmp_path):
    cluster = crds
    script = tmp_path / "cold_only.py"
    script.write_text("import sys\nfrom speechtune import report\nfor step in (1, 2):\n    report(step=step, wer=0.5 / step)\n")
    body = warm(small_study("cold-only", [], command=("python", str(script)), maxTrials=2, parallelism=1))
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch, dispatch_env()):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(cluster, kube_namespace, "cold-only", timeout=120)
        jobs = get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=cold-only")["items"]
    assert status["state"] == "Succeeded" and status["trials"]["complete"] == 2, status
    assert {"cold-only-0", "cold-only-1"} <= {job["metadata"]["name"] for job in jobs}
