"""Pure builders for the objects the operator creates: SpeechTuningTrial and its Job.

No I/O here, so every shape is unit-tested without a cluster. Ownership makes
deletion cascade through the garbage collector: study -> Trial -> Job -> pod.
A trial of several pods (trialTemplate.replicas) is an Indexed Job plus a headless
Service for its pods' rendezvous, both owned by the Trial.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from speechtune import spec
from speechtune.backend import TrialLaunch
from speechtune.podworker import DISPATCH_URL_ENV, TOKEN_ENV

API_VERSION = "speechtune.io/v1alpha1"
STUDY_KIND = "SpeechTuningStudy"
TRIAL_KIND = "SpeechTuningTrial"
STUDY_LABEL = "speechtune.io/study"
TRIAL_LABEL = "speechtune.io/trial"
RUNG_LABEL = "speechtune.io/rung"
ATTEMPT_LABEL = "speechtune.io/attempt"  # which run of a trial a Job is: "" (the only one), a level (L1-medium), a seed
WORKER_LABEL = "speechtune.io/worker"  # a warm worker's index; its pods have no trial label
TOKEN_ANNOTATION = "speechtune.io/token-sha256"  # on a worker's Job: what the operator checks its polls against
SECRET_ANNOTATION = "speechtune.io/token-secret-uid"  # on a worker's Job: its token Secret, the only one deleted with it
RUN_ANNOTATION = "speechtune.io/run"  # on a worker's Job: the run it was given last, so a restarted operator knows
WORKER_TOKEN_KEY = "token"
MANAGED_BY = {"app.kubernetes.io/managed-by": "speechtune"}
CONTAINER = "trainer"
MAX_NAME = 63  # Job names end up in a pod label (batch.kubernetes.io/job-name)
CHECKPOINT_VOLUME = "checkpoints"
CHECKPOINT_MOUNT = "/checkpoints"  # where spec.fidelity.checkpointVolume is mounted in every trial pod
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # an Indexed Job's pod: its index (annotation and label)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
MASTER_PORT = 29500  # index 0's rendezvous port in a trial of several pods (torch.distributed's default)


def reserved_label(key: str) -> bool:
    """A label a template may not set (trialTemplate.labels): the operator's own, and those the Job controller sets."""
    return key.startswith(("speechtune.io/", "batch.kubernetes.io/")) or key in MANAGED_BY


@dataclass(frozen=True)
class Owner:
    """Enough of an object to own another: apiVersion, kind, name, uid."""

    api_version: str
    kind: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


@dataclass(frozen=True)
class JobOptions:
    """The cluster-only knobs of a study's trials (CRD fields that the engine's spec does not have)."""

    image: str
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 3600
    checkpoint_claim: str | None = None  # a PVC mounted at CHECKPOINT_MOUNT (spec.fidelity.checkpointVolume)
    service_account: str | None = None  # the pods' ServiceAccount (the chart's trial account); None: default
    replicas: int = 1  # pods per trial (trialTemplate.replicas): above 1, an Indexed Job and a headless Service
    labels: dict[str, str] = field(default_factory=dict)  # trialTemplate.labels: on every Job and pod (a Kueue queue)


def trial_name(study: str, number: int) -> str:
    """The Trial's name (and its Job's, without a ladder): deterministic, so a second launch of a trial finds the first.

    ``<study>-<number>``; a study name too long for that is cut and given a
    short hash, so two long names never collide.
    """
    return _fit(study, f"-{number}")


def job_name(study: str, number: int, attempt: str = "", replicas: int = 1) -> str:
    """The Job of one run of a trial: the Trial's name, plus the attempt (``digits-7-l1-medium``) when it has one.

    Each fidelity level and each validation seed of a configuration is its own Job,
    so a promoted configuration never finds its lower level's Job under its name.
    An Indexed Job's pods are named ``<job>-<index>`` (their hostname, a DNS label):
    with ``replicas`` pods the name leaves room for the highest index.
    """
    suffix = re.sub(r"[^a-z0-9-]+", "-", attempt.lower()).strip("-")
    room = len(f"-{replicas - 1}") if replicas > 1 else 0
    return _fit(study, f"-{number}" + (f"-{suffix}" if suffix else ""), MAX_NAME - room)


def service_name(job: str) -> str:
    """The headless Service of a several-pod run: the Job's name, made a DNS-1035 label (a letter first)."""
    return job if job[:1].isalpha() else f"s{job}"


def _fit(study: str, suffix: str, limit: int = MAX_NAME) -> str:
    if len(study) + len(suffix) <= limit:
        return study + suffix
    digest = hashlib.sha256(study.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{study[:keep].rstrip('-')}-{digest}{suffix}"


def checkpoint_root(options: JobOptions, optuna_study: str) -> PurePosixPath | None:
    """Where a study's checkpoints live inside its trial pods, or None without a checkpoint volume.

    Under the Optuna study's name, unique per object: a study deleted and created
    again under the same name must not resume the old one's checkpoints.
    """
    return PurePosixPath(CHECKPOINT_MOUNT, optuna_study) if options.checkpoint_claim else None


def labels(study: str, number: int, rung: int = 0) -> dict[str, str]:
    return {**MANAGED_BY, STUDY_LABEL: study, TRIAL_LABEL: str(number), RUNG_LABEL: str(rung)}


def build_trial(study: Owner, number: int, params: dict[str, Any], rung: int = 0) -> dict[str, Any]:
    """The SpeechTuningTrial object for a trial, owned by its study.

    One per configuration; its rung label follows the configuration up the ladder (``rung_patch``).
    """
    return {
        "apiVersion": API_VERSION,
        "kind": TRIAL_KIND,
        "metadata": {
            "name": trial_name(study.name, number),
            "labels": labels(study.name, number, rung),
            "ownerReferences": [study.reference()],
        },
        "spec": {"study": study.name, "number": number, "params": dict(params)},
    }


def rung_patch(rung: int) -> dict[str, Any]:
    """The merge patch that moves a Trial's rung label to the level its configuration was promoted to."""
    return {"metadata": {"labels": {RUNG_LABEL: str(rung)}}}


def build_job(trial: Owner, launch: TrialLaunch, options: JobOptions, study: str) -> dict[str, Any]:
    """The Job that runs one run of a trial (the trial, a fidelity level of it, a validation seed), owned by its Trial.

    The pod gets the trainer's argv and env only: no service-account token and
    no database credentials (only the operator talks to the storage), and a
    securityContext that passes the PodSecurity "restricted" profile. With
    ``options.replicas`` above 1, the Job is Indexed (``indexed``).
    """
    name = job_name(study, launch.number, launch.attempt, options.replicas)
    command = list(launch.template.command)
    env = [{"name": key, "value": value} for key, value in sorted(launch.env.items())]
    if options.replicas > 1:
        env += rendezvous_env(name, options.replicas)
    pod = _pod_spec(command, list(launch.argv[len(command):]), env, launch.template, options)
    job = _job(name, run_labels(launch, options, study), {}, trial, options, pod)
    return indexed(job, options.replicas) if options.replicas > 1 else job


def run_labels(launch: TrialLaunch, options: JobOptions, study: str) -> dict[str, str]:
    """A run's Job and pods: the template's labels, then the operator's (which they cannot override)."""
    return {**options.labels, **labels(study, launch.number, launch.rung), ATTEMPT_LABEL: launch.attempt}


def rendezvous_env(job: str, replicas: int) -> list[dict[str, Any]]:
    """What each pod of a several-pod run is told (the trainer's contract, docs/operator.md "Trials across pods"):
    index 0's stable hostname and port, the number of pods, and its own index; the torchrun forms (PET_*) too."""
    rank = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
    address, port, pods = f"{job}-0.{service_name(job)}", str(MASTER_PORT), str(replicas)
    return [{"name": "MASTER_ADDR", "value": address}, {"name": "MASTER_PORT", "value": port},
            {"name": "WORLD_SIZE", "value": pods}, {"name": "NODE_RANK", "valueFrom": rank},
            {"name": "PET_MASTER_ADDR", "value": address}, {"name": "PET_MASTER_PORT", "value": port},
            {"name": "PET_NNODES", "value": pods}, {"name": "PET_NODE_RANK", "valueFrom": rank}]


def indexed(job: dict[str, Any], replicas: int) -> dict[str, Any]:
    """``job`` as ``replicas`` pods that run together: an Indexed Job (pod i is ``<job>-i``, reachable as
    ``<job>-i.<service>``), done when index 0 is, failed as a whole by the first pod that fails (naming it)."""
    spec = job["spec"]
    spec.update({
        "completionMode": "Indexed", "completions": replicas, "parallelism": replicas,
        "backoffLimit": 0,  # a retried pod could not rejoin its peers' rendezvous
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER, "operator": "NotIn", "values": [0]}}]},
        "successPolicy": {"rules": [{"succeededIndexes": "0"}]},  # the metrics are index 0's
    })
    spec["template"]["spec"]["subdomain"] = service_name(job["metadata"]["name"])
    return job


def build_rendezvous_service(trial: Owner, job: dict[str, Any]) -> dict[str, Any]:
    """The headless Service that gives an Indexed Job's pods their DNS names (``<job>-<i>.<service>``), owned by
    the Trial as the Job is; it publishes pods before they are ready, as a rendezvous needs."""
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "labels": dict(job["metadata"]["labels"]),
                     "ownerReferences": [trial.reference()]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {JOB_NAME_LABEL: name},
                 "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]},
    }


def completion_index(pod: dict[str, Any]) -> int | None:
    """An Indexed Job's pod's index (None for another pod)."""
    value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
    return int(value) if value is not None and value.isdigit() else None


def _pod_spec(command: list[str], args: list[str], env: list[dict[str, Any]], template: spec.TrialTemplate,
              options: JobOptions) -> dict[str, Any]:
    """A trainer pod: restricted PodSecurity, no service-account token, the template's resources."""
    env = [*env, {"name": "PYTHONUNBUFFERED", "value": "1"}]  # protocol lines reach the log as printed
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": options.image,
        "command": command,
        "args": args,
        "env": env,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = {key: value for key, value in template.resources.items() if key in ("limits", "requests")}
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # The image's own non-root USER runs the trainer (the trainer image's is 10001).
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    if options.checkpoint_claim:
        pod["volumes"] = [{"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": options.checkpoint_claim}}]
        container["volumeMounts"] = [{"name": CHECKPOINT_VOLUME, "mountPath": CHECKPOINT_MOUNT}]
    return pod


def _job(name: str, job_labels: dict[str, str], annotations: dict[str, str], owner: Owner, options: JobOptions,
         pod: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": job_labels, "ownerReferences": [owner.reference()]}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": options.backoff_limit,
            "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": job_labels}, "spec": pod},
        },
    }


def worker_name(study: str, index: int) -> str:
    """A warm worker's Job (and token Secret): ``<study>-worker-<index>``; indexes are never reused by one operator."""
    return _fit(study, f"-worker-{index}")


def worker_labels(study: str, index: int) -> dict[str, str]:
    return {**MANAGED_BY, STUDY_LABEL: study, WORKER_LABEL: str(index)}


def build_worker_secret(study: Owner, index: int, token: str) -> dict[str, Any]:
    """The worker's token, which only lets its pod ask the operator for its own runs; owned by the study."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": worker_name(study.name, index), "labels": worker_labels(study.name, index),
                     "ownerReferences": [study.reference()]},
        "type": "Opaque",
        "stringData": {WORKER_TOKEN_KEY: token},
    }


def build_worker_job(study: Owner, index: int, template: spec.TrialTemplate, options: JobOptions, dispatch_url: str,
                     token_sha256: str, secret_uid: str) -> dict[str, Any]:
    """A warm worker: one pod that runs many of its study's runs, owned by the study.

    The trainer command runs under ``speechtune.podworker``, which asks the operator for runs with the
    token from the worker's Secret; its pod is a trial pod in every other respect (no service-account
    token, no database credentials, restricted PodSecurity). Runs' argv and env come with each run.
    """
    name = worker_name(study.name, index)
    command = ["python", "-m", "speechtune.podworker", "--", *template.command]
    env = [{"name": key, "value": value} for key, value in sorted(template.env.items())]
    env += [{"name": DISPATCH_URL_ENV, "value": dispatch_url},
            {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": name, "key": WORKER_TOKEN_KEY}}}]
    pod = _pod_spec(command, list(template.args), env, template, options)
    annotations = {TOKEN_ANNOTATION: token_sha256, SECRET_ANNOTATION: secret_uid}
    return _job(name, {**options.labels, **worker_labels(study.name, index)}, annotations, study, options, pod)
