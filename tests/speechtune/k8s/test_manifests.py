"""The pure parts of the operator, without a cluster: manifests, exit classification, status, retention, the ladder's Jobs."""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime
import json

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from speechtune import spec
from speechtune.backend import Exit, build_launch
from speechtune.k8s import exits, retention, status, studyspec
from speechtune.k8s.logs import LogCursor, parse_nanos, rfc3339_seconds, split_stamp
from speechtune.fake_trainer import InProcessBackend
from speechtune.k8s.manifests import (
    JobOptions, Owner, build_job, build_rendezvous_service, build_trial, build_worker_job, checkpoint_root, job_name,
    rung_patch, service_name, trial_name,
)
from speechtune.executor import Executor
from speechtune.storage import WriteThroughStorage, open_rdb
from tests.speechtune.k8s.helpers import REPO

STUDY = Owner("speechtune.io/v1alpha1", "SpeechTuningStudy", "digits", "uid-study")
TEMPLATE = spec.TrialTemplate(command=("python", "-m", "speechtune.fake_trainer"), args=("--epochs", "9"),
                              env={"HF_HOME": "/cache"}, resources={"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}})


def job(number: int = 3, **options) -> dict:
    launch = build_launch("ns.digits.abc", number, TEMPLATE, {"lr": 0.001, "encoder": "conformer"})
    trial = Owner("speechtune.io/v1alpha1", "SpeechTuningTrial", trial_name("digits", number), "uid-trial")
    return build_job(trial, launch, JobOptions(image="trainer:1", **options), "digits")


def test_trial_and_job_names_are_deterministic_and_fit_a_label():
    assert trial_name("digits", 12) == "digits-12"
    long_a, long_b = "a" * 63, "a" * 62 + "b"
    assert trial_name(long_a, 123456) != trial_name(long_b, 123456)
    assert all(len(trial_name(name, 123456)) <= 63 for name in (long_a, long_b))
    assert trial_name(long_a, 7) == trial_name(long_a, 7)


def test_trial_is_owned_by_its_study_and_labelled():
    trial = build_trial(STUDY, 4, {"lr": 0.01})
    assert trial["metadata"]["ownerReferences"] == [{
        "apiVersion": "speechtune.io/v1alpha1", "kind": "SpeechTuningStudy", "name": "digits", "uid": "uid-study",
        "controller": True, "blockOwnerDeletion": True}]
    assert trial["metadata"]["labels"]["speechtune.io/study"] == "digits"
    assert trial["metadata"]["labels"]["speechtune.io/trial"] == "4"
    assert trial["metadata"]["labels"]["speechtune.io/rung"] == "0"
    assert trial["spec"] == {"study": "digits", "number": 4, "params": {"lr": 0.01}}


def test_job_is_owned_by_its_trial_and_runs_the_params_as_flags_and_env():
    manifest = job()
    assert manifest["metadata"]["name"] == "digits-3"
    assert manifest["metadata"]["ownerReferences"][0]["kind"] == "SpeechTuningTrial"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-trial"
    assert manifest["spec"]["backoffLimit"] == 0
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600
    pod = manifest["spec"]["template"]["spec"]
    assert manifest["spec"]["template"]["metadata"]["labels"]["speechtune.io/trial"] == "3"
    container = pod["containers"][0]
    assert container["image"] == "trainer:1"
    assert container["command"] == ["python", "-m", "speechtune.fake_trainer"]
    assert container["args"] == ["--epochs", "9", "--lr=0.001", "--encoder=conformer"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert json.loads(env["SPEECHTUNE_PARAMS"]) == {"lr": 0.001, "encoder": "conformer"}
    assert (env["SPEECHTUNE_TRIAL"], env["HF_HOME"]) == ("3", "/cache")
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}}


def test_job_options_come_from_the_spec():
    manifest = job(backoff_limit=2, ttl_seconds_after_finished=60)
    assert (manifest["spec"]["backoffLimit"], manifest["spec"]["ttlSecondsAfterFinished"]) == (2, 60)


def test_trial_pods_get_no_credentials_and_a_restricted_security_context():
    pod = job()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True}
    text = json.dumps(pod).lower()
    assert "secret" not in text and "postgres" not in text and "storage" not in text


def test_trial_pods_run_as_the_given_service_account_else_the_namespace_default():
    assert "serviceAccountName" not in job()["spec"]["template"]["spec"]
    pod = job(service_account="speechtune-trial")["spec"]["template"]["spec"]
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == ("speechtune-trial", False)


NOW = 1_800_000_000.0


def stamp(seconds_ago: float) -> str:
    return datetime.datetime.fromtimestamp(NOW - seconds_ago, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def a_job(*conditions: tuple[str, str, str], age: float = 10) -> dict:
    return {"metadata": {"name": "digits-3", "creationTimestamp": stamp(age)},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]}}


def a_pod(phase: str = "Running", terminated: dict | None = None, unschedulable_for: float | None = None) -> dict:
    pod = {"metadata": {"name": "digits-3-x", "creationTimestamp": stamp(30)}, "status": {"phase": phase}}
    if terminated is not None:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    if unschedulable_for is not None:
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/1 nodes: Insufficient nvidia.com/gpu.",
                                        "lastTransitionTime": stamp(unschedulable_for)}]
    return pod


@pytest.mark.parametrize("job_, pods, expected", [
    (a_job(), [a_pod()], None),
    (a_job(("Complete", "", "")), [a_pod("Succeeded", {"exitCode": 0, "reason": "Completed"})], Exit(True, 0)),
    (a_job(), [a_pod("Succeeded", {"exitCode": 0, "reason": "Completed"})], Exit(True, 0)),
    (None, [], exits.DELETED),
    (a_job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")),
     [a_pod("Failed", {"exitCode": 137, "reason": "OOMKilled"})], "OOMKilled"),
    (a_job(("Failed", "BackoffLimitExceeded", "")), [a_pod("Failed", {"exitCode": 3, "reason": "Error"})], "Error"),
    (a_job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")), [], "DeadlineExceeded"),
    (a_job(), [a_pod("Pending", unschedulable_for=30)], None),
    (a_job(), [a_pod("Pending", unschedulable_for=120)], "Unschedulable"),
    (a_job(age=30), [], None),
    (a_job(age=120), [], "NoPod"),
], ids=["running", "complete", "pod-succeeded", "deleted", "oomkilled", "exit-code", "job-reason", "pending", "unschedulable",
        "no-pod-yet", "no-pod"])
def test_exits_are_classified(job_, pods, expected):
    result = exits.classify(job_, pods, NOW, pending_timeout=60, last_words="RuntimeError: CUDA error")
    if expected is None or isinstance(expected, Exit):
        assert result == expected
    else:
        assert (result.succeeded, result.reason) == (False, expected)


def test_a_nonzero_exit_says_the_code_and_the_trainers_last_words():
    result = exits.classify(a_job(("Failed", "BackoffLimitExceeded", "")), [a_pod("Failed", {"exitCode": 3})], NOW, 60,
                            last_words="ValueError: bad config")
    assert result == Exit(False, 3, "Error", "trainer exited with code 3: ValueError: bad config")


def test_unschedulable_names_the_timeout_field():
    result = exits.classify(a_job(), [a_pod("Pending", unschedulable_for=120)], NOW, pending_timeout=60)
    assert "spec.pendingTimeoutSeconds=60" in result.message and "Insufficient nvidia.com/gpu" in result.message


def test_log_timestamps_keep_nanoseconds_and_resume_at_whole_seconds():
    nanos = parse_nanos("2026-11-26T14:30:01.123456789Z")
    assert nanos % 1_000_000_000 == 123456789
    assert parse_nanos("2026-11-26T14:30:01.5Z") == nanos - 123456789 + 500_000_000
    assert rfc3339_seconds(nanos) == "2026-11-26T14:30:01Z"
    assert split_stamp(b"2026-11-26T14:30:01.5Z {\"speechtune\": 1}", 0) == (nanos - 123456789 + 500_000_000, b'{"speechtune": 1}')
    assert split_stamp(b"garbage", 42) == (42, b"garbage")


LOG = [b"2026-11-26T14:30:00.9Z epoch 0", b"2026-11-26T14:30:01.1Z epoch 1", b"2026-11-26T14:30:01.1Z same stamp",
       b"2026-11-26T14:30:01.7Z epoch 2", b"2026-11-26T14:30:02.2Z epoch 3"]


@pytest.mark.parametrize("dropped_after", range(1, len(LOG)))
def test_a_resumed_log_passes_on_every_line_once(dropped_after):
    cursor = LogCursor()
    assert cursor.since_time() is None
    seen = [cursor.accept(raw) for raw in LOG[:dropped_after]]
    since = cursor.since_time()
    # The API resumes from the whole second: it sends again what the cursor already passed on.
    replay = [raw for raw in LOG if raw.split(b" ")[0].decode()[:19] + "Z" >= since]
    seen += [cursor.accept(raw) for raw in replay]
    assert [line for line in seen if line is not None] == [raw.split(b" ", 1)[1] for raw in LOG]


def frozen(number: int, state: TrialState, values: dict[int, float], value: float | None = None, **attrs) -> optuna.trial.FrozenTrial:
    trial = create_trial(state=state, value=value, params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-5, 1)},
                         intermediate_values=values, user_attrs=attrs)
    trial.number = number
    return trial


def test_trial_status_reads_like_a_leaderboard_row():
    complete = status.trial_status(frozen(1, TrialState.COMPLETE, {1: 0.5, 2: 0.3, 3: 0.35}, 0.34), "minimize")
    assert {k: complete[k] for k in ("state", "lastStep", "value", "bestValue")} == \
        {"state": "Complete", "lastStep": 3, "value": 0.34, "bestValue": 0.3}
    pruned = status.trial_status(frozen(2, TrialState.PRUNED, {1: 0.9}), "minimize")
    assert (pruned["state"], pruned["value"], pruned["message"]) == ("Pruned", 0.9, "pruned by the pruner at step 1")
    failed = status.trial_status(frozen(3, TrialState.FAIL, {}, fail_reason="OOMKilled", fail_message="ran out"), "maximize")
    assert (failed["state"], failed["reason"], failed["message"]) == ("Failed", "OOMKilled", "ran out")
    assert "value" not in failed and "lastStep" not in failed


def test_conditions_keep_their_transition_time_until_their_status_changes():
    first = status.merge_conditions([], status.phase_conditions("Running", "Running", "", 1), datetime.datetime(2026, 1, 1))
    later = status.merge_conditions(first, status.phase_conditions("Succeeded", "Completed", "done", 2), datetime.datetime(2026, 1, 2))
    times = {c["type"]: c["lastTransitionTime"][:10] for c in later}
    assert times == {"Ready": "2026-01-02", "Succeeded": "2026-01-02", "Failed": "2026-01-01"}


def test_retention_keeps_the_best_complete_trials_then_the_newest():
    trials = [frozen(0, TrialState.COMPLETE, {}, 0.3), frozen(1, TrialState.PRUNED, {1: 0.9}),
              frozen(2, TrialState.COMPLETE, {}, 0.1), frozen(3, TrialState.FAIL, {}),
              frozen(4, TrialState.RUNNING, {1: 0.5}), frozen(5, TrialState.COMPLETE, {}, 0.2)]
    assert retention.to_delete(trials, None, "minimize") == []
    assert retention.to_delete(trials, 2, "minimize") == [0, 1, 3]
    assert retention.to_delete(trials, 4, "minimize") == [1]
    assert retention.to_delete(trials, 2, "maximize") == [1, 2, 3]


def test_cluster_only_fields_are_split_from_the_engine_spec():
    body = {"metadata": {"name": "digits", "namespace": "ns"}, "spec": {
        "pendingTimeoutSeconds": 30, "retention": {"keepTrials": 5}, "maxTrials": 3,
        "searchSpace": [{"name": "lr", "float": {"low": 1e-4, "high": 1e-2, "log": True}}],
        "trialTemplate": {"image": "t:1", "command": ["train"], "backoffLimit": 1, "ttlSecondsAfterFinished": 9},
        "storage": {"secretRef": {"name": "db", "key": "url"}, "deleteOnStudyDeletion": True}}}
    study, options = studyspec.parse(body)
    assert (study.max_trials, study.storage.secret_name) == (3, "db")
    assert options == studyspec.ClusterOptions(JobOptions("t:1", 1, 9), 30, True)
    assert studyspec.keep_trials(body) == 5
    assert body["spec"]["trialTemplate"]["image"] == "t:1", "parse must not change the object"


def test_spec_problems_name_every_field():
    body = {"metadata": {"name": "digits"}, "spec": {"searchSpace": [{"name": "c", "categorical": [1, 1]}],
                                                     "trialTemplate": {"command": ["train"]}}}
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(body)
    assert [path for path, _ in error.value.problems] == ["spec.searchSpace[0].categorical", "spec.trialTemplate.image"]


def test_warm_workers_parse_on_a_cluster():
    body = {"metadata": {"name": "digits"}, "spec": {"searchSpace": [{"name": "c", "categorical": [1, 2]}],
                                                     "trialTemplate": {"image": "t:1", "command": ["train"], "workers": {"mode": "warm"}}}}
    study, _ = studyspec.parse(body)
    assert study.trial_template.workers.mode == "warm"


# -- the fidelity ladder ---------------------------------------------------------------

LADDER_SPEC = {
    "pruner": {"type": "none"},
    "searchSpace": [{"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}}],
    "fidelity": {"levels": [{"name": "low", "overrides": {"train_hours": 1, "epochs": 1}},
                            {"name": "mid", "overrides": {"train_hours": 1, "epochs": 3}},
                            {"name": "high", "overrides": {"train_hours": 10, "epochs": 3}}],
                 "reductionFactor": 2, "initialTrials": 8, "checkpointVolume": "ckpt"},
    "validation": {"seeds": 2},
    "trialTemplate": {"image": "t:1", "command": ["python", "-m", "speechtune.fake_trainer"], "backoffLimit": 1},
}


def test_each_run_of_a_trial_gets_its_own_job_name_that_fits_a_label():
    assert job_name("digits", 7) == trial_name("digits", 7) == "digits-7"
    assert job_name("digits", 7, "L1-medium") == "digits-7-l1-medium"
    assert job_name("digits", 7, "seed2") == "digits-7-seed2"
    long_a, long_b = "a" * 63, "a" * 62 + "b"
    names = {job_name(study, 123456, attempt) for study in (long_a, long_b) for attempt in ("L0-low", "L1-low", "seed1")}
    assert len(names) == 6 and all(len(name) <= 63 for name in names)


def test_a_level_job_is_labelled_with_its_rung_and_attempt_and_gets_the_level_overrides_last():
    launch = build_launch("ns.digits.abc", 3, TEMPLATE, {"lr": 0.001, "epochs": 9}, overrides={"epochs": 27},
                          attempt="L2-high", rung=2)
    trial = Owner("speechtune.io/v1alpha1", "SpeechTuningTrial", "digits-3", "uid-trial")
    manifest = build_job(trial, launch, JobOptions(image="trainer:1"), "digits")
    assert manifest["metadata"]["name"] == "digits-3-l2-high"
    assert manifest["metadata"]["ownerReferences"][0]["name"] == "digits-3", "every run of a trial is owned by its one Trial"
    for labels in (manifest["metadata"]["labels"], manifest["spec"]["template"]["metadata"]["labels"]):
        assert (labels["speechtune.io/trial"], labels["speechtune.io/rung"], labels["speechtune.io/attempt"]) == ("3", "2", "L2-high")
    assert manifest["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--lr=0.001", "--epochs=27"]
    assert "volumes" not in manifest["spec"]["template"]["spec"], "no checkpoint volume unless the spec names one"


def test_a_promoted_trial_moves_its_rung_label():
    assert rung_patch(2) == {"metadata": {"labels": {"speechtune.io/rung": "2"}}}


class RecordingBackend(InProcessBackend):
    """The fake trainer in-process, remembering every launch: the engine decides, the manifests are built from it."""

    def __init__(self):
        super().__init__(epochs=1)
        self.launches = []

    async def launch(self, launch):
        self.launches.append(launch)
        return await super().launch(launch)


def test_ladder_level_jobs_mount_the_checkpoint_claim_and_point_the_trainer_into_it(tmp_path):
    study, options = studyspec.parse({"metadata": {"name": "digits", "namespace": "ns"}, "spec": LADDER_SPEC})
    assert options.job.checkpoint_claim == "ckpt"
    root = checkpoint_root(options.job, "ns.digits.abc")
    backend = RecordingBackend()
    engine = Executor(study, WriteThroughStorage(open_rdb(f"sqlite:///{tmp_path}/ladder.db")), backend,
                          study_name="ns.digits.abc", checkpoint_root=root)
    assert asyncio.run(engine.run()).state == "Succeeded"
    jobs = [build_job(Owner("speechtune.io/v1alpha1", "SpeechTuningTrial", trial_name("digits", launch.number), "uid"),
                      launch, options.job, "digits") for launch in backend.launches]
    assert [job["metadata"]["labels"]["speechtune.io/rung"] for job in jobs].count("1") == 4
    for job, launch in zip(jobs, backend.launches):
        pod = job["spec"]["template"]["spec"]
        assert pod["volumes"] == [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}}]
        assert pod["containers"][0]["volumeMounts"] == [{"name": "checkpoints", "mountPath": "/checkpoints"}]
        flags = [arg for arg in pod["containers"][0]["args"] if arg.startswith("--checkpoint_dir=")]
        if launch.attempt.startswith("seed"):  # validation retrains from scratch
            assert not flags
            continue
        # low and mid differ only in epochs: mid resumes low's checkpoint; high (more data) starts afresh
        chain = {"L0-low": 0, "L1-mid": 0, "L2-high": 2}[launch.attempt]
        assert flags == [f"--checkpoint_dir=/checkpoints/ns.digits.abc/trial-{launch.number}/from-level-{chain}"]
    assert sorted(job["metadata"]["name"] for job in jobs if "seed" in job["metadata"]["name"]) == \
        [f"digits-{engine.best_trial().number}-seed1", f"digits-{engine.best_trial().number}-seed2"]


def test_the_fidelity_and_validation_fields_reach_the_engine():
    study, options = studyspec.parse({"metadata": {"name": "digits"}, "spec": LADDER_SPEC})
    assert [level.name for level in study.fidelity.levels] == ["low", "mid", "high"]
    assert (study.fidelity.reduction_factor, study.fidelity.initial_trials, study.validation_seeds) == (2, 8, 2)
    assert (options.job.backoff_limit, options.job.checkpoint_claim) == (1, "ckpt")
    without = copy.deepcopy(LADDER_SPEC)
    del without["fidelity"]["checkpointVolume"]
    assert studyspec.parse({"metadata": {"name": "digits"}, "spec": without})[1].job.checkpoint_claim is None


def test_what_the_crd_cannot_check_in_overrides_is_named_by_the_parser():
    spec_ = copy.deepcopy(LADDER_SPEC)
    spec_["fidelity"]["levels"][1]["overrides"] = {"train-hours": 10, "epochs": {"max": 3}}
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse({"metadata": {"name": "digits"}, "spec": spec_})
    assert [path for path, _ in error.value.problems] == [
        "spec.fidelity.levels[1].overrides.train-hours", "spec.fidelity.levels[1].overrides.epochs"]


def test_a_ladder_trial_status_says_which_level_it_reached():
    names = ("low", "mid", "high")
    stopped = status.trial_status(frozen(4, TrialState.PRUNED, {0: 0.4, 1: 0.3}, level=1), "minimize", names)
    assert {k: stopped[k] for k in ("state", "rung", "level", "lastStep", "value", "message")} == {
        "state": "Pruned", "rung": 1, "level": "mid", "lastStep": 1, "value": 0.3, "message": "not promoted past level mid"}
    queued = status.trial_status(frozen(5, TrialState.RUNNING, {0: 0.2}, level=1), "minimize", names)
    assert (queued["state"], queued["rung"], queued["lastStep"]) == ("Running", 1, 0)
    assert "rung" not in status.trial_status(frozen(6, TrialState.RUNNING, {1: 0.2}), "minimize")


CORRELATIONS = {"low->mid": {"rho": 0.9, "pairs": 4, "unreliable": False},
                "mid->high": {"rho": -0.3, "pairs": 6, "unreliable": True}}


def test_fidelity_status_lists_the_correlations_of_adjacent_levels_in_order():
    rungs = [{"name": "low", "size": 8, "assigned": 8, "running": 0, "finished": 8}]
    found = status.fidelity_status(rungs, CORRELATIONS, ("low", "mid", "high"))
    assert found["levels"] == rungs
    assert found["correlations"] == [
        {"fromLevel": "low", "toLevel": "mid", "rho": 0.9, "pairs": 4, "unreliable": False},
        {"fromLevel": "mid", "toLevel": "high", "rho": -0.3, "pairs": 6, "unreliable": True}]


def test_proxy_unreliable_is_true_only_for_a_low_rho_over_enough_pairs():
    measured = status.fidelity_status([], CORRELATIONS, ("low", "mid", "high"))["correlations"]
    bad = status.proxy_condition(measured, 0.5, 3)
    assert (bad["type"], bad["status"], bad["reason"]) == ("ProxyUnreliable", "True", "RankCorrelationBelowWarning")
    assert "Spearman rho -0.30 between mid and high over 6 configurations" in bad["message"]
    assert "low and mid" not in bad["message"]
    good = status.proxy_condition([dict(measured[1], rho=0.8, unreliable=False)], 0.5, 3)
    assert (good["status"], good["reason"]) == ("False", "RankCorrelationAboveWarning")
    unknown = status.proxy_condition(measured[:1], 0.5, 3)
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "TooFewPairs")


def test_proxy_costly_is_true_for_a_level_that_costs_too_much_or_is_mostly_start_up_and_says_which():
    cheap = {"share": 0.3, "runs": 9, "startupShare": 0.1, "costly": False}
    dear = {"share": 0.7, "runs": 3, "startupShare": 0.1, "costly": True}
    slow_start = {"share": 0.34, "runs": 9, "startupShare": 0.8, "costly": True}
    bad = status.cost_condition({"low": cheap, "mid": dear}, 0.5, 3)
    assert (bad["type"], bad["status"], bad["reason"]) == ("ProxyCostly", "True", "CostAboveWarning")
    assert "reaching level mid costs 0.70 of reaching the top" in bad["message"] and "level low" not in bad["message"]
    assert "fewer epochs or less data" in bad["message"] and "start-up, not training" not in bad["message"]
    started = status.cost_condition({"low": slow_start}, 0.5, 3)
    assert started["status"] == "True" and "spend 80% of their time before their first epoch" in started["message"]
    assert "start-up, not training" in started["message"] and "fewer epochs" not in started["message"]
    good = status.cost_condition({"low": cheap}, 0.5, 3)
    assert (good["status"], good["reason"]) == ("False", "CostBelowWarning")
    unknown = status.cost_condition({"low": dict(cheap, runs=2)}, 0.5, 3)
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "NotMeasured")


def test_validation_status_is_mean_and_std_over_the_seeds_in_seed_order():
    record = {"trial": 7, "values": {"10": 0.3, "2": 0.1, "1": 0.2}, "mean": 0.2, "std": 0.1}
    assert status.validation_status(record) == {"trial": 7, "mean": 0.2, "std": 0.1, "seeds": 3, "values": [0.2, 0.1, 0.3]}
    assert status.validation_status({"trial": 7, "values": {}, "mean": None}) is None


# -- stages and warm start ------------------------------------------------------------------

STAGED = yaml.safe_load((REPO / "examples" / "k8s" / "staged-study.yaml").read_text())


def test_the_staged_example_reaches_the_engine_with_each_stages_budget():
    study, _ = studyspec.parse(STAGED)
    assert [(s.name, s.kind, s.max_trials, s.seeds) for s in study.stages] == [
        ("baseline", "baseline", 0, 2), ("coarse", "search", 8, 1), ("fine", "refine", 8, 1), ("validate", "validate", 0, 3)]
    assert study.max_trials == 2 + 8 + 8  # spec.maxTrials is ignored: the stages' budgets


def test_a_staged_trial_status_says_its_stage_and_where_a_warm_start_came_from():
    trial = status.trial_status(frozen(3, TrialState.COMPLETE, {1: 0.5}, 0.4, stage="coarse",
                                       warm_start_from="ns.source.1a2b3c4d#7"), "minimize")
    assert (trial["stage"], trial["warmStartFrom"]) == ("coarse", "ns.source.1a2b3c4d#7")
    plain = status.trial_status(frozen(4, TrialState.COMPLETE, {1: 0.5}, 0.4), "minimize")
    assert "stage" not in plain and "warmStartFrom" not in plain


def test_stages_status_lists_every_stage_in_spec_order_and_the_current_one():
    study, _ = studyspec.parse(STAGED)
    records = {"coarse": {"state": "Running", "kind": "search", "region": {"lr": [1e-5, 1e-2]}},
               "baseline": {"state": "Succeeded", "trials": 2, "complete": 2, "costSeconds": 3.5,
                            "best": {"number": 1, "value": 0.4}, "mean": 0.41, "std": 0.01}}
    found = status.stages_status(study.stages, records)
    assert found == [
        {"name": "baseline", "kind": "baseline", "state": "Succeeded", "trials": 2, "complete": 2, "costSeconds": 3.5,
         "mean": 0.41, "std": 0.01, "bestTrial": 1, "bestValue": 0.4},
        {"name": "coarse", "kind": "search", "state": "Running", "region": {"lr": ["1e-05", "0.01"]}},
        {"name": "fine", "kind": "refine", "state": "Pending"},
        {"name": "validate", "kind": "validate", "state": "Pending"}]
    assert status.current_stage(found) == "coarse"
    assert status.current_stage([dict(entry, state="Succeeded") for entry in found]) is None


def test_a_staged_study_runs_each_stage_in_turn_and_every_run_is_its_own_job(tmp_path):
    study, options = studyspec.parse({**STAGED, "metadata": {"name": "staged", "namespace": "ns"}})
    backend = RecordingBackend()
    engine = Executor(study, WriteThroughStorage(open_rdb(f"sqlite:///{tmp_path}/staged.db")), backend, study_name="ns.staged.abc")
    assert asyncio.run(engine.run()).state == "Succeeded"
    trials = engine.trials()
    assert collections.Counter(status.trial_status(t, "minimize").get("stage") for t in trials) == {"baseline": 2, "coarse": 8, "fine": 8}
    found = status.stages_status(study.stages, engine.study.user_attrs["stages"])
    assert [(entry["name"], entry["state"], entry.get("trials")) for entry in found] == [
        ("baseline", "Succeeded", 2), ("coarse", "Succeeded", 8), ("fine", "Succeeded", 8), ("validate", "Succeeded", 0)]
    assert found[3]["seeds"] == 3 and "mean" in found[3] and "std" in found[3]
    assert status.current_stage(found) is None
    names = [build_job(Owner("speechtune.io/v1alpha1", "SpeechTuningTrial", trial_name("staged", launch.number), "uid"),
                       launch, options.job, "staged")["metadata"]["name"] for launch in backend.launches]
    assert len(names) == len(set(names)) == 2 + 8 + 8 + 3
    best = engine.best_trial().number
    assert sorted(name for name in names if "seed" in name) == [f"staged-{best}-seed{seed}" for seed in (1, 2, 3)]


def test_spec_checkpoints_volume_is_the_claim_every_trial_job_mounts():
    body = copy.deepcopy(STAGED)
    body["spec"]["checkpoints"] = {"keepBest": 2, "volume": "staged-ckpt"}
    _, options = studyspec.parse(body)
    assert options.job.checkpoint_claim == "staged-ckpt"
    body["spec"]["stages"][1]["fidelity"] = {"levels": [{"name": "low"}, {"name": "high"}], "initialTrials": 4,
                                             "checkpointVolume": "other"}
    del body["spec"]["stages"][1]["maxTrials"]
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(body)
    assert "must be one PVC" in str(error.value)


def test_a_worker_job_runs_the_trainer_under_the_pod_worker_with_its_token_from_its_secret_only():
    from speechtune.k8s.manifests import build_worker_job, build_worker_secret, worker_name

    worker = build_worker_job(STUDY, 3, TEMPLATE, JobOptions(image="trainer:1"), "http://op.ns.svc:8082", "sha", "uid-secret")
    secret = build_worker_secret(STUDY, 3, "the-token")
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert worker["metadata"]["name"] == secret["metadata"]["name"] == worker_name("digits", 3) == "digits-worker-3"
    assert container["command"] == ["python", "-m", "speechtune.podworker", "--", "python", "-m", "speechtune.fake_trainer"]
    assert container["args"] == ["--epochs", "9"]
    env = {var["name"]: var for var in container["env"]}
    assert env["SPEECHTUNE_WORKER_TOKEN"] == {"name": "SPEECHTUNE_WORKER_TOKEN",
                                              "valueFrom": {"secretKeyRef": {"name": "digits-worker-3", "key": "token"}}}
    assert env["SPEECHTUNE_DISPATCH_URL"]["value"] == "http://op.ns.svc:8082" and env["HF_HOME"]["value"] == "/cache"
    assert "the-token" not in json.dumps(worker), "the token is in the Secret, never in the Job"
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == TEMPLATE.resources
    assert worker["metadata"]["annotations"] == {"speechtune.io/token-sha256": "sha", "speechtune.io/token-secret-uid": "uid-secret"}
    assert worker["metadata"]["ownerReferences"][0]["uid"] == secret["metadata"]["ownerReferences"][0]["uid"] == "uid-study"
    assert "speechtune.io/trial" not in worker["metadata"]["labels"], "the Job backend must not take a worker for a trial's Job"


def test_a_workers_assignment_survives_its_annotation_and_junk_reads_as_none():
    from speechtune.k8s.workers import Assignment

    given = Assignment("trial-4-L1@digits-worker-2#7", 4, "L1", 7, ["--epochs", "3"], {"SPEECHTUNE_TRIAL": "4"})
    assert Assignment.parse(given.annotation()) == given
    assert given.request() == {"run": given.id, "argv": ["--epochs", "3"], "env": {"SPEECHTUNE_TRIAL": "4"}}
    for junk in (None, "", "{", "[]", '{"id": "x"}', '{"id": "x", "number": "four", "attempt": "", "seq": 1, "argv": [], "env": {}}'):
        assert Assignment.parse(junk) is None, junk


# -- trials across pods (trialTemplate.replicas) -------------------------------------------------------------


def test_a_trial_of_several_pods_is_an_indexed_job_that_runs_its_pods_together_and_fails_as_a_whole():
    manifest = job(replicas=4)
    spec_ = manifest["spec"]
    assert manifest["metadata"]["name"] == "digits-3"
    assert (spec_["completionMode"], spec_["completions"], spec_["parallelism"], spec_["backoffLimit"]) == ("Indexed", 4, 4, 0)
    assert spec_["podFailurePolicy"] == {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "trainer", "operator": "NotIn", "values": [0]}}]}
    assert spec_["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    pod = spec_["template"]["spec"]
    assert pod["subdomain"] == "digits-3" and pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}}  # per pod
    assert "completionMode" not in job()["spec"] and "subdomain" not in job()["spec"]["template"]["spec"]  # one pod: as before


def test_every_pod_of_a_trial_learns_index_0s_address_the_number_of_pods_and_its_own_index():
    env = {item["name"]: item for item in job(replicas=2)["spec"]["template"]["spec"]["containers"][0]["env"]}
    rank = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    for prefix in ("", "PET_"):
        assert env[f"{prefix}MASTER_ADDR"]["value"] == "digits-3-0.digits-3"
        assert env[f"{prefix}MASTER_PORT"]["value"] == "29500"
        assert env[f"{prefix}NODE_RANK"]["valueFrom"] == rank
    assert env["WORLD_SIZE"]["value"] == env["PET_NNODES"]["value"] == "2"
    assert env["SPEECHTUNE_TRIAL"]["value"] == "3"
    single = {item["name"] for item in job()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not single & {"MASTER_ADDR", "WORLD_SIZE", "NODE_RANK"}


def test_the_rendezvous_service_is_headless_owned_by_the_trial_and_selects_the_jobs_pods():
    manifest = job(replicas=2)
    trial = Owner("speechtune.io/v1alpha1", "SpeechTuningTrial", "digits-3", "uid-trial")
    service = build_rendezvous_service(trial, manifest)
    assert service["metadata"]["name"] == manifest["spec"]["template"]["spec"]["subdomain"] == "digits-3"
    assert service["metadata"]["ownerReferences"] == manifest["metadata"]["ownerReferences"]
    assert service["metadata"]["labels"]["speechtune.io/trial"] == "3"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "digits-3"}


def test_several_pod_job_names_leave_room_for_the_highest_index_and_their_service_starts_with_a_letter():
    long = "a" * 60
    for replicas in (2, 10, 128):
        name = job_name(long, 123, "L1-medium", replicas)
        assert len(f"{name}-{replicas - 1}") <= 63
    assert job_name("digits", 7, "", 2) == job_name("digits", 7) == "digits-7"  # short names are the same
    assert service_name("digits-7") == "digits-7" and service_name("7up-1") == "s7up-1"


def test_template_labels_reach_every_job_and_pod_but_never_override_the_operators():
    queue = {"kueue.x-k8s.io/queue-name": "gpus"}
    manifest = job(replicas=2, labels=queue)
    for labels_ in (manifest["metadata"]["labels"], manifest["spec"]["template"]["metadata"]["labels"]):
        assert labels_["kueue.x-k8s.io/queue-name"] == "gpus" and labels_["speechtune.io/trial"] == "3"
    worker = build_worker_job(STUDY, 0, TEMPLATE, JobOptions(image="trainer:1", labels=queue), "http://op", "sha", "uid")
    assert worker["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"


def test_replicas_and_labels_parse_on_a_cluster_and_bad_ones_are_named():
    body = yaml.safe_load((REPO / "examples" / "k8s" / "fake-study.yaml").read_text())
    body["spec"]["trialTemplate"].update(replicas=2, labels={"kueue.x-k8s.io/queue-name": "gpus"})
    study, options = studyspec.parse(copy.deepcopy(body))
    assert study.trial_template.replicas == options.job.replicas == 2
    assert options.job.labels == {"kueue.x-k8s.io/queue-name": "gpus"}
    body["spec"]["trialTemplate"].update(replicas=0, labels={"speechtune.io/trial": "x"})
    body["spec"]["trialTemplate"]["workers"] = {"mode": "warm"}
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(copy.deepcopy(body))
    assert {"spec.trialTemplate.replicas", "spec.trialTemplate.labels"} <= {path for path, _ in error.value.problems}
    body["spec"]["trialTemplate"].update(replicas=2, backoffLimit=1, labels={})
    with pytest.raises(spec.SpecError) as error:
        studyspec.parse(copy.deepcopy(body))
    assert [path for path, _ in error.value.problems] == ["spec.trialTemplate.replicas", "spec.trialTemplate.backoffLimit"]


def a_rank(index: int, phase: str = "Running", terminated: dict | None = None, deleting: bool = False) -> dict:
    pod = a_pod(phase, terminated)
    pod["metadata"].update(name=f"digits-3-{index}-abcde", annotations={"batch.kubernetes.io/job-completion-index": str(index)})
    if deleting:
        pod["metadata"]["deletionTimestamp"] = stamp(0)
    return pod


def indexed_job(*conditions: tuple[str, str, str]) -> dict:
    return dict(a_job(*conditions), spec={"completionMode": "Indexed", "completions": 2})


POLICY = ("Failed", "PodFailurePolicy", "Container trainer for pod ns/digits-3-1-abcde failed with exit code 3 matching "
                                        "FailJob rule at index 0")


@pytest.mark.parametrize("job_, pods, expected", [
    (indexed_job(), [a_rank(0), a_rank(1, "Succeeded", {"exitCode": 0})], None),  # index 1 alone is not the trial
    (indexed_job(), [a_rank(0, "Succeeded", {"exitCode": 0}), a_rank(1)], Exit(True, 0)),  # index 0 is (successPolicy)
    (indexed_job(("SuccessCriteriaMet", "SuccessPolicy", "")), [], Exit(True, 0)),
    (indexed_job(POLICY), [a_rank(0, "Failed", {"exitCode": 143, "finishedAt": stamp(1)}, deleting=True),
                           a_rank(1, "Failed", {"exitCode": 3, "finishedAt": stamp(2), "message": "boom"})],
     Exit(False, 3, "Error", "trainer digits-3-1-abcde (index 1) exited with code 3: boom")),
    (indexed_job(POLICY), [a_rank(0, "Failed", {"exitCode": 143}, deleting=True)],  # the culprit is gone: the Job names it
     Exit(False, 3, "Error", "trainer pod digits-3-1-abcde exited with code 3")),
    (indexed_job(("Failed", "BackoffLimitExceeded", "")),  # no policy message: the first to fail, not the peer it stopped
     [a_rank(0, "Failed", {"exitCode": 143, "finishedAt": stamp(1)}, deleting=True),
      a_rank(1, "Failed", {"exitCode": 137, "reason": "OOMKilled", "finishedAt": stamp(5)})], "OOMKilled"),
], ids=["index-1-done", "index-0-done", "success-criteria", "named-by-policy", "culprit-gone", "first-failure"])
def test_a_trial_of_several_pods_succeeds_with_index_0_and_fails_naming_the_pod(job_, pods, expected):
    result = exits.classify(job_, pods, NOW, pending_timeout=60, last_words="index 0's last line")
    if isinstance(expected, str):
        assert (result.reason, "digits-3-1-abcde (index 1)" in result.message) == (expected, True), result
    else:
        assert result == expected


def test_an_unschedulable_pod_of_several_is_named_and_a_suspended_job_says_it_is_queued():
    pending = a_rank(1, "Pending")
    pending["status"]["conditions"] = a_pod("Pending", unschedulable_for=120)["status"]["conditions"]
    result = exits.classify(indexed_job(), [a_rank(0), pending], NOW, pending_timeout=60)
    assert result.reason == "Unschedulable" and "pod digits-3-1-abcde (index 1 of 2) was unschedulable" in result.message
    queued = dict(a_job(age=120), spec={"suspend": True})
    assert "while suspended" in exits.classify(queued, [], NOW, pending_timeout=60).message


def test_gpu_seconds_count_every_gpu_of_every_pod(tmp_path):
    template = spec.TrialTemplate(command=("true",), resources={"requests": {"nvidia.com/gpu": 4}}, replicas=2)
    body = yaml.safe_load((REPO / "examples" / "fake-study.yaml").read_text())
    study = spec.parse_study(body)
    study = dataclasses.replace(study, trial_template=template)
    engine = Executor(study, WriteThroughStorage(open_rdb(f"sqlite:///{tmp_path}/s.db")), InProcessBackend())
    assert engine.gpus == 8
