"""The fidelity ladder on the test cluster: each level of a configuration is a new Job, promotions are
Events, the proxy's rank correlation reaches the study's status, and a rank-reversed proxy raises
ProxyUnreliable. These studies run without checkpointVolume (test_manifests.py checks the mount and the
trainer's --checkpoint_dir)."""

from __future__ import annotations

import collections
import json
import os
import signal
import urllib.request

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from speechtune.schedulers.ladder import spearman
from tests.speechtune.k8s.helpers import (
    stop_operator,
    REPO, delete_studies, free_port, get_json, healthy, operator_running, start_operator,
    wait_for_study_end, wait_until,
)

pytestmark = pytest.mark.cluster
LADDER = REPO / "examples" / "k8s" / "fake-ladder.yaml"


def ladder_study(name: str, args: list[str], **fidelity) -> dict:
    body = yaml.safe_load(LADDER.read_text())
    body["metadata"] = {"name": name}
    body["spec"]["trialTemplate"]["args"] += args
    body["spec"]["fidelity"].update(fidelity)
    return body


def study_events(cluster, namespace: str, name: str) -> list[tuple[str, str]]:
    listing = get_json(cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return [(event["reason"], event["message"]) for event in listing["items"]]


def stored_rho(study: optuna.Study, lower: int) -> tuple[float, int]:
    """Spearman's rho between two adjacent levels, recomputed from what Optuna's storage holds."""
    both = [t for t in study.trials if lower in t.intermediate_values and lower + 1 in t.intermediate_values]
    return spearman([t.intermediate_values[lower] for t in both], [t.intermediate_values[lower + 1] for t in both]), len(both)


BY_WER = {"metric": "wer", "direction": "minimize"}  # a level without its own rank ranks by the objective


def test_ladder_runs_each_level_as_a_new_job_and_survives_an_operator_kill(crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    ledger = tmp_path / "ledger"
    body = ladder_study("fake-ladder", [f"--ledger={ledger}"])
    cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    log_path, port = tmp_path / "operator.log", free_port()
    operator = start_operator(cluster, kube_namespace, postgres_url, log_path, port)
    try:
        wait_until(lambda: healthy(port), timeout=30, what="the operator's liveness endpoint")
        # SIGKILL once a promoted level runs: level-0 runs have finished, a level-1 Job is going
        wait_until(lambda: get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/rung=1")["items"],
                   timeout=120, what="a Job of the medium level")
        os.kill(operator.pid, signal.SIGKILL)
        operator.wait()
        operator = start_operator(cluster, kube_namespace, postgres_url, log_path, port)
        status = wait_for_study_end(cluster, kube_namespace, "fake-ladder", timeout=240)
        jobs = get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=fake-ladder")["items"]
        trials = get_json(cluster, "strial", "-n", kube_namespace, "-l", "speechtune.io/study=fake-ladder")["items"]
        events = study_events(cluster, kube_namespace, "fake-ladder")
    finally:
        delete_studies(cluster, kube_namespace)
        stop_operator(operator)
    assert status["state"] == "Succeeded", (status, log_path.read_text()[-3000:])
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    best = study.best_trial
    # every level of a configuration is its own Job, labelled with its rung; validation seeds run the top level
    runs = collections.Counter((job["metadata"]["labels"]["speechtune.io/rung"], job["metadata"]["labels"]["speechtune.io/attempt"])
                               for job in jobs)
    assert runs == {("0", "L0-low"): 16, ("1", "L1-medium"): 4, ("2", "L2-high"): 1, ("2", "seed1"): 1, ("2", "seed2"): 1}
    assert {job["metadata"]["name"] for job in jobs if job["metadata"]["labels"]["speechtune.io/rung"] == "2"} == {
        f"fake-ladder-{best.number}-l2-high", f"fake-ladder-{best.number}-seed1", f"fake-ladder-{best.number}-seed2"}
    # one Trial per configuration, its rung label the highest level it reached
    assert len(trials) == 16
    assert collections.Counter(t["metadata"]["labels"]["speechtune.io/rung"] for t in trials) == {"0": 12, "1": 3, "2": 1}
    top = next(t for t in trials if t["metadata"]["labels"]["speechtune.io/rung"] == "2")
    assert (top["spec"]["number"], top["status"]["state"], top["status"]["level"]) == (best.number, "Complete", "high")
    # the operator's restart re-ran no level of any configuration: each run started once
    started = collections.Counter(tuple(line.split()) for line in ledger.read_text().splitlines())
    assert [run for run, count in started.items() if count > 1] == []
    assert sum(started.values()) == 16 + 4 + 1 + 2
    # Optuna: one trial per configuration, a value per level it ran
    assert collections.Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 1, TrialState.PRUNED: 15}
    assert sorted(best.intermediate_values) == [0, 1, 2]
    assert status["trials"] == {"total": 16, "running": 0, "complete": 1, "pruned": 15, "failed": 0, "waiting": 0}
    measured = {"medianSeconds", "startupSeconds", "costShare"}
    assert [{k: v for k, v in level.items() if k not in measured} for level in status["fidelity"]["levels"]] == [
        {"name": "low", "size": 16, "assigned": 16, "running": 0, "finished": 16, "rank": BY_WER},
        {"name": "medium", "size": 4, "assigned": 4, "running": 0, "finished": 4, "rank": BY_WER},
        {"name": "high", "size": 1, "assigned": 1, "running": 0, "finished": 1, "rank": BY_WER}]
    # each level's measured cost; the levels differ in more than epochs, so none resumes: shares are of the top's run
    low, medium, high = status["fidelity"]["levels"]
    assert high["costShare"] == 1.0 and all(level["medianSeconds"] > 0 for level in (low, medium, high))
    assert low["costShare"] == pytest.approx(low["medianSeconds"] / high["medianSeconds"], abs=1e-3)
    assert all(level["startupSeconds"] >= 0 for level in (medium, high))  # they reported at least two epochs
    spend = status["fidelity"]["spend"]
    assert (spend["configurations"], spend["atTop"]) == (16, 1) and spend["fullRuns"] > 1
    rho, pairs = stored_rho(study, 0)
    assert status["fidelity"]["correlations"] == [
        {"fromLevel": "low", "toLevel": "medium", "rho": round(rho, 4), "pairs": pairs, "unreliable": False,
         "fromMetric": "wer", "toMetric": "wer"}]
    assert pairs == 4  # medium -> high has a single pair: no correlation to publish
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Succeeded"]["status"], conditions["ProxyUnreliable"]["status"]) == ("True", "Unknown")
    validation = status["validation"]
    assert (validation["trial"], validation["seeds"]) == (best.number, 2)
    assert validation["mean"] == pytest.approx(sum(validation["values"]) / 2)
    assert ("TrialPromoted", f"trial {best.number}: to high (wer {best.intermediate_values[1]:.4g} at medium)") in events
    assert "StudyValidated" in {reason for reason, _ in events}


def test_a_rank_reversed_proxy_raises_proxy_unreliable_and_a_faithful_one_does_not(crds, kube_namespace, postgres_url,
                                                                                  monkeypatch):
    cluster = crds
    port = free_port()
    two_levels = dict(levels=[{"name": "low", "overrides": {"train_hours": 1, "epochs": 1}},
                              {"name": "high", "overrides": {"train_hours": 100, "epochs": 2}}],
                      reductionFactor=2, initialTrials=10)
    studies = {"faithful": [], "reversed": ["--misleading-below-hours", "5"]}
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch,
                          {"SPEECHTUNE_METRICS_PORT": str(port), "SPEECHTUNE_METRICS_ADDRESS": "127.0.0.1"}):
        for name, args in studies.items():
            body = ladder_study(name, args, **two_levels)
            body["spec"]["sampler"] = {"type": "random", "seed": 3}
            del body["spec"]["validation"]
            cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        statuses = {name: wait_for_study_end(cluster, kube_namespace, name, timeout=180) for name in studies}
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        events = {name: study_events(cluster, kube_namespace, name) for name in studies}
    for name, status in statuses.items():
        assert status["state"] == "Succeeded", (name, status)
        study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
        rho, pairs = stored_rho(study, 0)
        assert pairs == 5
        [found] = status["fidelity"]["correlations"]
        assert (found["fromLevel"], found["toLevel"], found["rho"], found["pairs"]) == ("low", "high", round(rho, 4), 5)
        labels = f'from_level="low",namespace="{kube_namespace}",study="{status["optunaStudy"]}",to_level="high"'
        assert f"speechtune_proxy_rank_correlation{{{labels}}} {rho}" in exposition
        promoted = f'speechtune_promotions_total{{namespace="{kube_namespace}",rung="high",study="{status["optunaStudy"]}"}} 5.0'
        assert promoted in exposition
    faithful, reversed_ = ({c["type"]: c for c in statuses[name]["conditions"]}["ProxyUnreliable"] for name in studies)
    assert (faithful["status"], faithful["reason"]) == ("False", "RankCorrelationAboveWarning"), faithful
    assert (reversed_["status"], reversed_["reason"]) == ("True", "RankCorrelationBelowWarning"), reversed_
    rho = statuses["reversed"]["fidelity"]["correlations"][0]["rho"]
    assert f"Spearman rho {rho:.2f} between low and high over 5 configurations" in reversed_["message"]
    assert [reason for reason, _ in events["reversed"]].count("ProxyUnreliable") == 1
    assert "ProxyUnreliable" not in {reason for reason, _ in events["faithful"]}
    # ProxyCostly says what the recorded costs say, with one Event when True (a pod's start-up dwarfs a fake epoch)
    for name, status in statuses.items():
        study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
        costs = study.user_attrs["fidelity_costs"]["low"]
        costly = {c["type"]: c for c in status["conditions"]}["ProxyCostly"]
        assert costly["status"] == ("True" if costs["costly"] else "False"), (costly, costs)
        assert f"reaching level low costs {costs['share']:.2f} of reaching the top" in costly["message"]
        assert [reason for reason, _ in events[name]].count("ProxyCostly") == (1 if costs["costly"] else 0)
