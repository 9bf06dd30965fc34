"""Stages and warm start on the test cluster: examples/k8s/staged-study.yaml runs baseline -> search -> refine
-> validate to Succeeded with each stage's budget, Events and status; an operator SIGKILLed the moment the
first stage ends re-runs no stage and no trial; a study warm-starts from a finished SpeechTuningStudy by
name, and one naming no study fails with InvalidSpec."""

from __future__ import annotations

import collections
import json
import os
import select
import shutil
import signal
import subprocess
import urllib.request

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from speechtune import record
from tests.speechtune.k8s.helpers import (
    REPO, delete_studies, free_port, get_json, healthy, operator_running, small_study, start_operator, stop_operator,
    study_status, wait_for_study_end, wait_until,
)

pytestmark = pytest.mark.cluster
STAGED = REPO / "examples" / "k8s" / "staged-study.yaml"
# (name, kind, trials): the example's budgets; a validate stage reruns the best trial, so it adds none
BUDGETS = [("baseline", "baseline", 2), ("coarse", "search", 8), ("fine", "refine", 8), ("validate", "validate", 0)]


def staged(name: str, args: list[str] = ()) -> dict:
    body = yaml.safe_load(STAGED.read_text())
    body["metadata"] = {"name": name}
    body["spec"]["trialTemplate"]["args"] += list(args)
    return body


def study_events(cluster, namespace: str, name: str) -> list[tuple[str, str]]:
    """(reason, message) of every Event on the study, oldest first, an Event counted as often as it was posted."""
    listing = get_json(cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    items = sorted(listing["items"], key=lambda event: (event.get("firstTimestamp") or "", event["metadata"]["creationTimestamp"]))
    return [(event["reason"], event["message"]) for event in items for _ in range(event.get("count") or 1)]


def check_stages(status: dict) -> None:
    """Every stage Succeeded with exactly its budget of trials; baseline and validate with mean and std."""
    assert [(entry["name"], entry["kind"], entry["state"], entry["trials"]) for entry in status["stages"]] == [
        (name, kind, "Succeeded", trials) for name, kind, trials in BUDGETS], status["stages"]
    by_name = {entry["name"]: entry for entry in status["stages"]}
    assert {"mean", "std", "bestTrial", "bestValue"} <= set(by_name["baseline"])
    assert by_name["validate"]["seeds"] == 3 and {"mean", "std"} <= set(by_name["validate"])
    assert by_name["validate"]["mean"] == pytest.approx(status["validation"]["mean"])
    assert status["validation"]["seeds"] == 3 and status["validation"]["trial"] == status["bestTrial"]["number"]
    assert by_name["fine"]["region"], "a refine stage searches a region: status says which"
    assert "currentStage" not in status


def check_events(events: list[tuple[str, str]]) -> None:
    """StageStarted and StageFinished exactly once per stage ("stage coarse (search) started")."""
    for reason in ("StageStarted", "StageFinished"):
        posted = [message for found, message in events if found == reason]
        assert sorted(message.split()[1] for message in posted) == sorted(name for name, _, _ in BUDGETS), (reason, posted)


def test_a_staged_study_runs_each_stage_with_its_budget_to_succeeded(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    port = free_port()
    seen: set[str] = set()  # status.currentStage while it runs

    def ended() -> dict:
        status = study_status(cluster, kube_namespace, "fake-staged")
        seen.add(status.get("currentStage"))
        return status if status.get("state") in ("Succeeded", "Failed") else {}

    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch, {"SPEECHTUNE_METRICS_PORT": str(port)}):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", str(STAGED))
        status = wait_until(ended, timeout=240, what="the staged study to finish")
        trials = get_json(cluster, "strial", "-n", kube_namespace, "-l", "speechtune.io/study=fake-staged")["items"]
        jobs = get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=fake-staged")["items"]
        wide = cluster.kubectl("get", "stune", "fake-staged", "-n", kube_namespace, "-o", "wide").stdout
        trials_wide = cluster.kubectl("get", "strial", "-n", kube_namespace, "-o", "wide").stdout
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        events = study_events(cluster, kube_namespace, "fake-staged")
    assert status["state"] == "Succeeded", status
    check_stages(status)
    check_events(events)
    assert seen - {None} and seen - {None} <= {name for name, _, _ in BUDGETS}, seen
    # one Trial per trial, its stage in status; one Job per run: each trial (a pruned one's is deleted), the best one's 3 seeds
    assert collections.Counter(trial["status"].get("stage") for trial in trials) == {"baseline": 2, "coarse": 8, "fine": 8}
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    assert collections.Counter(record.stage(trial) for trial in study.trials) == {"baseline": 2, "coarse": 8, "fine": 8}
    best = status["bestTrial"]["number"]
    assert sorted(job["metadata"]["name"] for job in jobs) == sorted(
        [f"fake-staged-{t.number}" for t in study.trials if t.state == TrialState.COMPLETE]
        + [f"fake-staged-{best}-seed{seed}" for seed in (1, 2, 3)])
    assert status["trials"]["total"] == 18 and status["trials"]["failed"] == 0
    assert wide.splitlines()[0].split()[:3] == ["NAME", "STATE", "STAGE"]
    assert "STAGE" in trials_wide.splitlines()[0]
    labels = f'namespace="{kube_namespace}",stage="fine",study="{status["optunaStudy"]}"'
    assert f"speechtune_stage_active{{{labels}}}" in exposition
    assert f'speechtune_stage_best_value{{metric="wer",{labels}}}' in exposition
    assert f'speechtune_trials_finished_total{{namespace="{kube_namespace}",stage="coarse",state="COMPLETE"' in exposition


def watch_for_event(cluster, namespace: str, name: str, reason: str) -> subprocess.Popen:
    """`kubectl get events --watch` for one reason on one object: a line on stdout the moment one is posted."""
    kubectl = shutil.which("kubectl", path=cluster.env["PATH"])
    return subprocess.Popen([kubectl, "get", "events", "-n", namespace, "--watch", "-o", "name",
                             "--field-selector", f"involvedObject.name={name},reason={reason}"],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def killed_at_event(cluster, namespace: str, postgres_url: str, body: dict, reason: str, log_path, *,
                    event_timeout: float, timeout: float, collect) -> tuple[dict, object]:
    """Apply ``body``, SIGKILL the operator the moment the study's first Event of ``reason`` is posted, start it
    again and wait for the study's end: its status and what ``collect()`` gathers then, with the study deleted
    and the operator stopped afterwards."""
    name = body["metadata"]["name"]
    port = free_port()
    watch = watch_for_event(cluster, namespace, name, reason)
    operator = start_operator(cluster, namespace, postgres_url, log_path, port)
    try:
        wait_until(lambda: healthy(port), timeout=30, what="the operator's liveness endpoint")
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
        ready, _, _ = select.select([watch.stdout], [], [], event_timeout)
        os.kill(operator.pid, signal.SIGKILL)
        operator.wait()
        assert ready and watch.stdout.readline().startswith("event/"), f"no {reason} within {event_timeout} s"
        operator = start_operator(cluster, namespace, postgres_url, log_path, port)
        status = wait_for_study_end(cluster, namespace, name, timeout=timeout)
        return status, collect()
    finally:
        watch.kill()
        delete_studies(cluster, namespace)
        stop_operator(operator)


def test_operator_killed_at_a_stage_transition_reruns_no_stage_and_no_trial(crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    ledger = tmp_path / "ledger"
    body = staged("transition", [f"--ledger={ledger}"])
    log_path = tmp_path / "operator.log"
    status, (jobs, events) = killed_at_event(  # the first StageFinished: the baseline has ended
        cluster, kube_namespace, postgres_url, body, "StageFinished", log_path, event_timeout=120, timeout=240,
        collect=lambda: (get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=transition")["items"],
                         study_events(cluster, kube_namespace, "transition")))
    assert status["state"] == "Succeeded", (status, log_path.read_text()[-3000:])
    check_stages(status)
    check_events(events)
    # every run started once (the ledger: trial and attempt of each start), and each has exactly one Job
    started = collections.Counter(tuple(line.split()) for line in ledger.read_text().splitlines())
    assert [run for run, count in started.items() if count > 1] == []
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    interrupted = [t.number for t in study.trials if record.is_interrupted(t)]  # asked, its Job never created: run again
    assert len(study.trials) == 18
    assert collections.Counter(record.stage(t) for t in study.trials) == {"baseline": 2, "coarse": 8, "fine": 8}
    assert len(started) == 18 - len(interrupted) + 3
    runs = {f"transition-{run[0]}" + (f"-{run[1]}" if len(run) > 1 else "") for run in started}
    names = [job["metadata"]["name"] for job in jobs]  # a pruned trial's Job is deleted
    assert len(names) == len(set(names)) and set(names) <= runs, (names, started)
    assert {f"transition-{t.number}" for t in study.trials if t.state == TrialState.COMPLETE} <= set(names)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials if t.number not in interrupted)


def test_a_study_warm_starts_from_a_finished_speechtuningstudy_by_name(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    source = small_study("source", ["--epochs", "3", "--sleep", "0.1"], maxTrials=6, parallelism=3,
                         sampler={"type": "random", "seed": 3})
    target = small_study("successor", ["--epochs", "3", "--sleep", "0.1"], maxTrials=4, parallelism=1,
                         sampler={"type": "random", "seed": 4}, warmStart={"study": "source", "topK": 2})
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        # applied together: the successor waits (Pending) until its source has ended
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                                   "items": [source, target]}))
        waiting = wait_until(lambda: {c["type"]: c for c in study_status(cluster, kube_namespace, "successor").get("conditions", [])
                                      if c["reason"] == "WaitingForSource"}, timeout=30, what="the successor to wait for its source")
        assert study_status(cluster, kube_namespace, "source").get("state") in ("Pending", "Running")
        source_status = wait_for_study_end(cluster, kube_namespace, "source", timeout=120)
        status = wait_for_study_end(cluster, kube_namespace, "successor", timeout=120)
        trials = {t["spec"]["number"]: t for t in get_json(cluster, "strial", "-n", kube_namespace,
                                                           "-l", "speechtune.io/study=successor")["items"]}
        events = study_events(cluster, kube_namespace, "successor")
    assert (source_status["state"], status["state"]) == ("Succeeded", "Succeeded"), (source_status, status)
    assert waiting["Ready"]["message"] == "spec.warmStart.study: waiting for SpeechTuningStudy 'source' to end (it is Running)" \
        or "(it is Pending)" in waiting["Ready"]["message"], waiting
    assert status["warmStartSource"] == source_status["optunaStudy"]
    source_study = optuna.load_study(study_name=source_status["optunaStudy"], storage=postgres_url)
    best_two = sorted(source_study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (t.value, t.number))[:2]
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    first_two = sorted(study.trials, key=lambda t: t.number)[:2]
    assert [t.user_attrs.get(record.WARM_START_FROM) for t in first_two] == [
        f"{source_status['optunaStudy']}#{t.number}" for t in best_two]
    for mine, theirs in zip(first_two, best_two):
        assert mine.params == pytest.approx(theirs.params)
        assert trials[mine.number]["status"]["warmStartFrom"] == f"{source_status['optunaStudy']}#{theirs.number}"
    assert len(study.trials) == 4 and not any(record.WARM_START_FROM in t.user_attrs for t in study.trials[2:])
    assert [reason for reason, _ in events].count("WarmStarted") == 1, events


def test_a_warm_start_naming_no_study_fails_the_study_with_invalid_spec(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    body = small_study("orphan", ["--epochs", "2"], maxTrials=2, warmStart={"study": "nowhere", "topK": 2})
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(cluster, kube_namespace, "orphan", timeout=60)
        jobs = get_json(cluster, "jobs", "-n", kube_namespace)["items"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["state"], failed["status"], failed["reason"]) == ("Failed", "True", "InvalidSpec"), status
    assert failed["message"].startswith("spec.warmStart.study: ") and "'nowhere'" in failed["message"], failed
    assert not jobs
