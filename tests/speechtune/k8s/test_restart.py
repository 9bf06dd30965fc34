"""The operator SIGKILLed three times during a 30-trial study: it still ends with exactly 30 trials,
no trial number ran twice, and every value the fake trainer printed is in storage."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer
from speechtune.backend import format_value
from tests.speechtune.k8s.helpers import (
    stop_operator,
    delete_studies, free_port, get_json, healthy, small_study, start_operator, study_status, wait_for_study_end, wait_until,
)

pytestmark = pytest.mark.cluster


def test_operator_killed_three_times_loses_nothing(crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    ledger = tmp_path / "ledger"
    body = small_study("survivor", ["--epochs", "9", "--sleep", "0.3", f"--ledger={ledger}"], maxTrials=30, parallelism=4,
                       maxFailedTrials=3, pruner={"type": "median", "startupTrials": 4, "warmupSteps": 3})
    cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    rng = random.Random(7)
    log_path = tmp_path / "operator.log"
    port = free_port()
    operator = start_operator(cluster, kube_namespace, postgres_url, log_path, port)
    try:
        wait_until(lambda: healthy(port), timeout=30, what="the operator's liveness endpoint")
        for _ in range(3):
            time.sleep(rng.uniform(2, 6))
            wait_until(lambda: study_status(cluster, kube_namespace, "survivor").get("trials", {}).get("running"),
                       timeout=30, what="trials running when the operator is killed")
            os.kill(operator.pid, signal.SIGKILL)
            operator.wait()
            operator = start_operator(cluster, kube_namespace, postgres_url, log_path, port)
        status = wait_for_study_end(cluster, kube_namespace, "survivor", timeout=180)
        jobs = get_json(cluster, "jobs", "-n", kube_namespace, "-l", "speechtune.io/study=survivor")["items"]
    finally:
        delete_studies(cluster, kube_namespace)
        stop_operator(operator)
    assert status["state"] == "Succeeded", (status, log_path.read_text()[-3000:])
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 30
    runs = collections.Counter(int(line) for line in ledger.read_text().split())
    assert not [number for number, count in runs.items() if count > 1], f"trial numbers that ran twice: {runs}"
    assert set(runs) == {t.number for t in trials if t.state != TrialState.FAIL}
    assert {job["metadata"]["name"] for job in jobs} <= {f"survivor-{number}" for number in runs}  # pruned: deleted
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            printed = {step: fake_trainer.wer({name: format_value(value) for name, value in trial.params.items()}, step)
                       for step in range(1, (trial.last_step or 0) + 1)}
            assert trial.intermediate_values == pytest.approx(printed), trial.number
        else:  # interrupted before its Job existed: recorded, and its configuration run again
            assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted", trial
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.last_step == 9 for t in complete)

