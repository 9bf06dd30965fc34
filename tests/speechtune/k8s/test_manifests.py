"""The pure parts of the operator, without a cluster: manifests, exit classification, status, retention."""

from __future__ import annotations

import datetime
import json

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from speechtune import spec
from speechtune.backend import Exit, build_launch
from speechtune.k8s import exits, retention, status, studyspec
from speechtune.k8s.logs import LogCursor, parse_nanos, rfc3339_seconds, split_stamp
from speechtune.k8s.manifests import JobOptions, Owner, build_job, build_trial, trial_name

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
    assert trial["spec"] == {"study": "digits", "number": 4, "rung": 0, "params": {"lr": 0.01}}


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
    (None, [], exits.DELETED),
    (a_job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")),
     [a_pod("Failed", {"exitCode": 137, "reason": "OOMKilled"})], "OOMKilled"),
    (a_job(("Failed", "BackoffLimitExceeded", "")), [a_pod("Failed", {"exitCode": 3, "reason": "Error"})], "Error"),
    (a_job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")), [], "DeadlineExceeded"),
    (a_job(), [a_pod("Pending", unschedulable_for=30)], None),
    (a_job(), [a_pod("Pending", unschedulable_for=120)], "Unschedulable"),
    (a_job(age=30), [], None),
    (a_job(age=120), [], "NoPod"),
], ids=["running", "complete", "deleted", "oomkilled", "exit-code", "job-reason", "pending", "unschedulable",
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
