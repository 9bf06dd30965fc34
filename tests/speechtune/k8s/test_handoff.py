"""A stage's handoff on the test cluster, with the fake trainer: examples/k8s/tts-two-stage.yaml hands the best
acoustic checkpoint (on the study's checkpoint PVC) to the vocoder stages, also when the operator is SIGKILLed the
moment it posts the first Handoff; examples/k8s/nas-darts.yaml hands the architecture a supernet reported to a
retrain stage. The node agent maps the claim to a directory of this machine, so the test reads what the trainer
itself recorded as loaded."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from speechtune import record
from speechtune.backend import format_value
from speechtune.k8s.manifests import CHECKPOINT_MOUNT, TRIAL_LABEL
from tests.speechtune.k8s.helpers import REPO, bound_claim, get_json, operator_running, wait_for_study_end
from tests.speechtune.k8s.test_stages import killed_at_event, study_events

pytestmark = pytest.mark.cluster
TTS = REPO / "examples" / "k8s" / "tts-two-stage.yaml"
NAS = REPO / "examples" / "k8s" / "nas-darts.yaml"
ACOUSTIC = ("acoustic-default", "acoustic")
# (name, kind, trials): the example's budgets
TTS_BUDGETS = [("acoustic-default", "baseline", 1), ("acoustic", "search", 5), ("vocoder-default", "baseline", 1),
               ("vocoder", "search", 3)]


def jobs_by_trial(cluster, namespace: str, study: str) -> dict[int, list[dict]]:
    jobs = get_json(cluster, "jobs", "-n", namespace, "-l", f"speechtune.io/study={study}")["items"]
    found = collections.defaultdict(list)
    for job in jobs:
        found[int(job["metadata"]["labels"][TRIAL_LABEL])].append(job)
    return found


def args(job: dict) -> list[str]:
    return job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_vocoder_stages_load_the_best_acoustic_checkpoint_also_after_a_kill_at_the_handoff(
        crds, kube_namespace, postgres_url, tmp_path):
    cluster = crds
    ledger, claim_dir = tmp_path / "ledger", tmp_path / "claim"
    body = yaml.safe_load(TTS.read_text())
    body["spec"]["trialTemplate"]["args"] += [f"--ledger={ledger}"]
    body["spec"]["stages"][2]["trialTemplate"]["args"] += [f"--ledger={ledger}"]  # the vocoder stages' (one YAML anchor)
    log_path = tmp_path / "operator.log"
    with bound_claim(cluster, kube_namespace, "tts-checkpoints", claim_dir):
        status, (jobs, events) = killed_at_event(  # the first Handoff: vocoder-default starts
            cluster, kube_namespace, postgres_url, body, "Handoff", log_path, event_timeout=300, timeout=400,
            collect=lambda: (jobs_by_trial(cluster, kube_namespace, "tts-two-stage"),
                             study_events(cluster, kube_namespace, "tts-two-stage")))
    assert status["state"] == "Succeeded", (status, log_path.read_text()[-3000:])
    assert [(entry["name"], entry["kind"], entry["state"], entry["trials"]) for entry in status["stages"]] == [
        (name, kind, "Succeeded", trials) for name, kind, trials in TTS_BUDGETS], status["stages"]
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    acoustic = [t for t in study.trials if record.stage(t) in ACOUSTIC and t.state == TrialState.COMPLETE]
    best = min(acoustic, key=lambda t: (t.value, t.number))
    checkpoint = f"{CHECKPOINT_MOUNT}/{status['optunaStudy']}/trial-{best.number}/last.ckpt"
    assert record.checkpoint(best) == checkpoint
    on_host = str(claim_dir / Path(checkpoint).relative_to(CHECKPOINT_MOUNT))  # where the node agent put it
    assert Path(on_host).is_file()
    by_name = {entry["name"]: entry for entry in status["stages"]}
    for name in ("vocoder-default", "vocoder"):
        assert by_name[name]["handoff"] == {"from": list(ACOUSTIC), "trial": best.number, "value": pytest.approx(best.value),
                                            "flag": "acoustic_checkpoint", "checkpoint": checkpoint}, by_name[name]
    # one Handoff per stage that takes one, naming the trial and the flag: the restarted operator posts none again
    handoffs = sorted(message for reason, message in events if reason == "Handoff")
    assert [message.split()[1] for message in handoffs] == ["vocoder", "vocoder-default"], events
    assert all(f"takes trial {best.number} " in message and f"--acoustic_checkpoint={checkpoint}" in message
               for message in handoffs), handoffs
    vocoder = [t for t in study.trials if record.stage(t) in ("vocoder-default", "vocoder")]
    assert len(vocoder) == 4 and all(t.state == TrialState.COMPLETE for t in vocoder)
    for trial in vocoder:
        assert jobs[trial.number] and all(f"--acoustic_checkpoint={checkpoint}" in args(job) for job in jobs[trial.number])
    assert not any(arg.startswith("--acoustic_checkpoint") for job in jobs[best.number] for arg in args(job))
    # what each vocoder run loaded, as the fake trainer recorded it in its own checkpoint on the claim (on a cluster
    # the operator removes no file, so every vocoder trial's is there): the handed-on file, by its host path
    recorded = {t.number: json.loads((claim_dir / status["optunaStudy"] / f"trial-{t.number}" / "last.ckpt").read_text())
                for t in vocoder}
    assert all(ran["loaded"] == {"acoustic_checkpoint": on_host} and ran["epoch"] == 3 for ran in recorded.values()), recorded
    assert str(best.number) in record.kept_checkpoints(study.user_attrs)
    # every run started once (the ledger: one line per start), each with one Job
    started = collections.Counter(tuple(line.split()) for line in ledger.read_text().splitlines())
    assert [run for run, count in started.items() if count > 1] == []
    interrupted = [t.number for t in study.trials if record.is_interrupted(t)]  # asked, its Job never created: run again
    assert len(study.trials) == 10 and len(started) == 10 - len(interrupted)
    assert all(len(found) == 1 for found in jobs.values()) and set(jobs) == {int(run[0]) for run in started}


def test_a_retrain_stage_holds_the_architecture_its_supernet_reported(crds, kube_namespace, postgres_url, monkeypatch):
    cluster = crds
    with operator_running(cluster, kube_namespace, postgres_url, monkeypatch):
        cluster.kubectl("apply", "-n", kube_namespace, "-f", str(NAS))
        status = wait_for_study_end(cluster, kube_namespace, "nas-darts", timeout=300)
        jobs = jobs_by_trial(cluster, kube_namespace, "nas-darts")
        events = study_events(cluster, kube_namespace, "nas-darts")
    assert status["state"] == "Succeeded", status
    assert [(entry["name"], entry["state"], entry["trials"]) for entry in status["stages"]] == [
        ("supernet", "Succeeded", 1), ("retrain", "Succeeded", 4)], status["stages"]
    study = optuna.load_study(study_name=status["optunaStudy"], storage=postgres_url)
    [supernet] = [t for t in study.trials if record.stage(t) == "supernet"]
    reported = supernet.user_attrs[record.REPORTED_PARAMS]
    assert set(reported) == {"num_layers", "conformer_blocks"}
    # a pair the real asr accepts: one block per layer (the fake picks the same index from both lists)
    assert reported["conformer_blocks"].count(",") + 1 == reported["num_layers"] in (1, 2, 3)
    handoff = next(entry for entry in status["stages"] if entry["name"] == "retrain")["handoff"]
    assert handoff["trial"] == supernet.number and handoff["from"] == ["supernet"] and "flag" not in handoff
    assert handoff["params"] == {name: str(value) for name, value in reported.items()}
    retrain = [t for t in study.trials if record.stage(t) == "retrain"]
    assert len(retrain) == 4 and all(set(t.params) == {"lr"} for t in retrain), "the architecture is held, not searched"
    flags = {f"--{name}={format_value(value)}" for name, value in reported.items()}
    for trial in retrain:
        assert jobs[trial.number] and all(flags <= set(args(job)) for job in jobs[trial.number]), (flags, jobs[trial.number])
    assert not any(arg.startswith(("--num_layers", "--conformer_blocks")) for job in jobs[supernet.number] for arg in args(job))
    assert [reason for reason, _ in events].count("Handoff") == 1, events
