"""The operator SIGKILLed three times during a 30-trial study: it still ends with exactly 30 trials,
no trial number ran twice, and every value the fake trainer printed is in storage."""

from __future__ import annotations

import collections
import json
import random

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer
from speechtune.backend import format_value
from tests.speechtune.k8s.helpers import small_study, survive_kills

pytestmark = pytest.mark.cluster


def test_operator_killed_three_times_loses_nothing(crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    ledger = tmp_path / "ledger"
    body = small_study("survivor", ["--epochs", "9", "--sleep", "0.3", f"--ledger={ledger}"], maxTrials=30, parallelism=4,
                       maxFailedTrials=3, pruner={"type": "median", "startupTrials": 4, "warmupSteps": 3})
    cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
    log_path = tmp_path / "operator.log"
    status, jobs = survive_kills(cluster, kube_namespace, "survivor", postgres_url, log_path, random.Random(7), timeout=180)
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

