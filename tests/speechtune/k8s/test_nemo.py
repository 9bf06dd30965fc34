"""The NeMo trainer on the cluster: a tiny ASR model, 2 epochs, 3 trials, through the operator."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from tests.speechtune.k8s.helpers import operator_running, small_study, wait_for_study_end

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.trainer]


def test_nemo_trainer_study_succeeds_on_the_cluster(crds, kube_namespace, postgres_url, monkeypatch, tmp_path):
    cluster = crds
    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "speechtune_trainer.cli", "make-data", "--out", str(data), "--hours", "0.03",
                    "--seed", "1", "--workers", "2"], check=True, capture_output=True)
    body = small_study("nemo-digits", ["--data", str(data), "--epochs", "2", "--accelerator", "cpu", "--threads", "1",
                                       "--num-layers", "1", "--n-mels", "40"],
                       command=("speechtune-trainer", "asr"), maxTrials=3, parallelism=3,
                       sampler={"type": "random", "seed": 1},
                       searchSpace=[{"name": "lr", "float": {"low": 1e-3, "high": 6e-3, "log": True}},
                                    {"name": "d_model", "categorical": [48, 64]}])
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(cluster, kube_namespace, "nemo-digits", timeout=300)
    assert status["state"] == "Succeeded", status
    trials = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [t.user_attrs for t in trials]
    for trial in trials:
        assert sorted(trial.intermediate_values) == [1, 2]
        assert 0 <= trial.value <= 1.5
        assert set(trial.user_attrs["metrics"]) >= {"wer", "cer"}
