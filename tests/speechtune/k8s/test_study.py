"""A real study on the test cluster: the operator runs examples/k8s/fake-study.yaml to Succeeded."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tests.speechtune.k8s.conftest import REPO, get_json, operator_running, wait_until

pytestmark = pytest.mark.cluster
EXAMPLE = REPO / "examples" / "k8s" / "fake-study.yaml"


def study_status(cluster, namespace: str, name: str) -> dict:
    return get_json(cluster, "speechtuningstudy", name, "-n", namespace).get("status") or {}


def test_fake_study_reaches_succeeded_with_every_value_in_optuna(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", str(EXAMPLE))
        status = wait_until(
            lambda: (s := study_status(cluster, kube_namespace, "fake-digits")).get("state") in ("Succeeded", "Failed") and s,
            timeout=180, what="the study to finish")
        trials_table = cluster.kubectl("get", "speechtuningtrials", "-n", kube_namespace,
                                       "-l", "speechtune.io/study=fake-digits").stdout
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
