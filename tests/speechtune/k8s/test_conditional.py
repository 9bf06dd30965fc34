"""A conditional search space on the test cluster: examples/k8s/nas-blackbox.yaml runs to Succeeded, and each
trial (its SpeechTuningTrial and its Job's command line) has a conditional parameter exactly when its
condition holds (docs/search-space.md)."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from tests.speechtune.k8s.helpers import REPO, get_json, operator_running, wait_for_study_end

pytestmark = pytest.mark.cluster
EXAMPLE = REPO / "examples" / "k8s" / "nas-blackbox.yaml"


def applies(params: dict) -> set[str]:
    """The parameters a trial must have, from the example's conditions written out by hand."""
    expected = {"encoder", "decoder", "num_layers", "d_model", "lr"}
    if params["encoder"] in ("conformer", "transformer"):
        expected.add("attention_heads")
    if params["encoder"] == "conformer":
        expected.add("conv_kernel_size")
    if params["decoder"] == "hybrid":
        expected.add("ctc_weight")
    if params["decoder"] == "attention":
        expected.add("decoder_layers")
    return expected


def test_the_nas_blackbox_example_gives_each_trial_job_only_the_parameters_that_apply(crds, kube_namespace, postgres_url,
                                                                                     monkeypatch):
    body = yaml.safe_load(EXAMPLE.read_text())
    selector = ("-l", "speechtune.io/study=nas-blackbox")
    with operator_running(crds, kube_namespace, postgres_url, monkeypatch):  # it deletes the study on leaving
        crds.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        status = wait_for_study_end(crds, kube_namespace, "nas-blackbox", timeout=400)
        trials = get_json(crds, "speechtuningtrials", "-n", kube_namespace, *selector)["items"]
        jobs = get_json(crds, "jobs", "-n", kube_namespace, *selector)["items"]
    assert status["state"] == "Succeeded", status
    stored = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url).trials
    assert len(stored) == body["spec"]["maxTrials"]
    assert len({trial.params["encoder"] for trial in stored}) > 1, "the sampler explored the encoders"
    for params in [trial.params for trial in stored] + [trial["spec"]["params"] for trial in trials]:
        assert set(params) == applies(params), params
    assert len(trials) > 1 and len(jobs) > 1, (len(trials), len(jobs))
    for job in jobs:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        flags = dict(arg[2:].split("=", 1) for arg in container["args"] if arg.startswith("--") and "=" in arg)
        assert set(flags) == applies(flags), container["args"]
