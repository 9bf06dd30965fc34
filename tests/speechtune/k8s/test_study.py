"""A real study on the test cluster: the operator runs examples/k8s/fake-study.yaml to Succeeded."""

from __future__ import annotations

import json
import urllib.request

import optuna
import pytest
from optuna.trial import TrialState

from tests.speechtune.k8s.helpers import (
    EXAMPLE, events, free_port, get_json, operator_running, small_study, study_status, wait_for_study_end, wait_until,
)

pytestmark = pytest.mark.cluster


def test_fake_study_reaches_succeeded_with_every_value_in_optuna(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    port = free_port()
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch, {"SPEECHTUNE_METRICS_PORT": str(port)}):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", str(EXAMPLE))
        status = wait_for_study_end(cluster, kube_namespace, "fake-digits", timeout=180)
        trials_table = cluster.kubectl("get", "speechtuningtrials", "-n", kube_namespace,
                                       "-l", "speechtune.io/study=fake-digits").stdout
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "speechtune_reconcile_seconds_count" in exposition
    assert f'speechtune_trials{{namespace="{kube_namespace}",state="COMPLETE",study="{status["optunaStudy"]}"}}' in exposition
    reasons = events(cluster, kube_namespace, "fake-digits")
    assert {"TrialStarted", "TrialPruned", "TrialCompleted", "StudySucceeded"} <= set(reasons), reasons
    assert status["state"] == "Succeeded", status
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 20
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    assert len(by_state[TrialState.COMPLETE]) + len(by_state[TrialState.PRUNED]) == 20, [t.user_attrs for t in trials]
    assert by_state[TrialState.PRUNED], "hyperband pruned nothing"
    for trial in by_state[TrialState.COMPLETE]:
        assert sorted(trial.intermediate_values) == list(range(1, 10))
    for trial in by_state[TrialState.PRUNED]:
        assert sorted(trial.intermediate_values) == list(range(1, trial.last_step + 1))
    best = study.best_trial
    assert status["bestTrial"]["number"] == best.number
    assert status["bestTrial"]["value"] == pytest.approx(best.value)
    assert status["bestTrial"]["params"] == pytest.approx(best.params)
    assert status["trials"] == {"total": 20, "running": 0, "complete": len(by_state[TrialState.COMPLETE]),
                                "pruned": len(by_state[TrialState.PRUNED]), "failed": 0, "waiting": 0}
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "False", "Succeeded": "True", "Failed": "False"}
    header, *rows = trials_table.splitlines()
    assert header.split()[:6] == ["NAME", "TRIAL", "STATE", "STEP", "VALUE", "BEST"]
    assert len(rows) == 20
    best_row = next(row.split() for row in rows if row.split()[1] == str(best.number))
    assert best_row[2:5] == ["Complete", "9", f"{best.value:g}"]


def test_deleting_a_running_study_cascades_to_trials_jobs_and_pods_and_keeps_optuna(crds, kube_namespace, postgres_url,
                                                                                     monkeypatch):
    cluster = crds
    body = small_study("doomed", ["--epochs", "9", "--sleep", "5"], maxTrials=6, parallelism=3)
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        wait_until(lambda: len([p for p in get_json(cluster, "pods", "-n", kube_namespace)["items"]
                                if p["status"].get("phase") == "Running"]) == 3, timeout=60, what="3 running trial pods")
        optuna_name = study_status(cluster, kube_namespace, "doomed")["optunaStudy"]
        cluster.kubectl("delete", "stune", "doomed", "-n", kube_namespace, "--timeout=60s")
        for kind in ("speechtuningtrials", "jobs", "pods"):
            wait_until(lambda: not get_json(cluster, kind, "-n", kube_namespace)["items"], timeout=60,
                       what=f"the garbage collector to delete the study's {kind}")
    study = optuna.load_study(study_name=optuna_name, storage=postgres_url)
    assert len(study.trials) == 3


FAILURES = [  # (study, args, command, extra spec, the Trial's reason, words of its message)
    ("crash", ["--fail-at", "2"], None, {}, "Error", "simulated crash at epoch 2"),
    ("nan", ["--nan-at", "2"], None, {}, "NaN", "objective wer is nan at step 2"),
    ("silent", ["--no-metrics"], None, {}, "NoMetrics", "printed no protocol line"),
    ("oom", [], ("python", "-c", "import os; print('allocating', flush=True); os.kill(os.getpid(), 9)"), {},
     "OOMKilled", "ran out of memory"),
    ("greedy", [], None, {"pendingTimeoutSeconds": 3}, "Unschedulable", "Insufficient nvidia.com/gpu"),
]


def test_failures_are_classified_in_the_trial_status_and_fail_the_study(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    for name, args, command, extra, _, _ in FAILURES:
        body = small_study(name, args, **({"command": command} if command else {}), **extra)
        if name == "greedy":
            body["spec"]["trialTemplate"]["resources"] = {"limits": {"nvidia.com/gpu": 9}}
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        for name, *_ in FAILURES:
            wait_until(lambda: study_status(cluster, kube_namespace, name).get("state") in ("Succeeded", "Failed"),
                       timeout=60, what=f"study {name} to end")
        statuses = {name: study_status(cluster, kube_namespace, name) for name, *_ in FAILURES}
        trials = {name: get_json(cluster, "strial", f"{name}-0", "-n", kube_namespace)["status"] for name, *_ in FAILURES}
    for name, _, _, _, reason, words in FAILURES:
        status, trial = statuses[name], trials[name]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert (status["state"], failed["reason"]) == ("Failed", "TooManyFailures"), (name, status)
        assert trial["state"] == "Failed" and trial["reason"] == reason, (name, trial)
        assert words in trial["message"], (name, trial)
        assert "TrialFailed" in events(cluster, kube_namespace, name)


def test_budget_changes_apply_to_a_running_and_to_a_finished_study(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    body = small_study("growing", ["--epochs", "3", "--sleep", "0.5"], maxTrials=3, parallelism=1)
    body["spec"]["retention"] = {"keepTrials": 2}

    def patch(**fields):
        cluster.kubectl("patch", "stune", "growing", "-n", kube_namespace, "--type=merge", "-p",
                        json.dumps({"spec": fields}))

    def finished(total):
        status = study_status(cluster, kube_namespace, "growing")
        return status.get("state") == "Succeeded" and status["trials"]["total"] == total and status

    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        wait_until(lambda: study_status(cluster, kube_namespace, "growing").get("state") == "Running", 30, "Running")
        patch(maxTrials=5, parallelism=2)
        wait_until(lambda: study_status(cluster, kube_namespace, "growing").get("trials", {}).get("running") == 2,
                   30, "two trials at once")
        wait_until(lambda: finished(5), 60, "5 trials")
        patch(maxTrials=6)
        status = wait_until(lambda: finished(6), 60, "a 6th trial after the study had succeeded")
        wait_until(lambda: len(get_json(cluster, "strial", "-n", kube_namespace)["items"]) == 2, 30,
                   "retention to keep 2 Trial objects")
        kept = get_json(cluster, "strial", "-n", kube_namespace)["items"]
        generation = get_json(cluster, "stune", "growing", "-n", kube_namespace)["metadata"]["generation"]
    assert status["observedGeneration"] == generation
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    assert len(study.trials) == 6
    best_two = sorted(study.trials, key=lambda t: t.value)[:2]
    assert sorted(t["spec"]["number"] for t in kept) == sorted(t.number for t in best_two)


def test_delete_on_study_deletion_removes_the_optuna_study(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    body = small_study("tidy", ["--epochs", "2"])
    body["spec"]["storage"] = {"deleteOnStudyDeletion": True}
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_until(lambda: (s := study_status(cluster, kube_namespace, "tidy")).get("state") == "Succeeded" and s,
                            timeout=60, what="the study to succeed")
        optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
        cluster.kubectl("delete", "stune", "tidy", "-n", kube_namespace, "--timeout=60s")
    with pytest.raises(KeyError):
        optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
