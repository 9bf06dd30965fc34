"""A SpeechTuningStudy object -> the engine's Study plus the cluster-only options.

The CRD's spec is the engine's spec with a few fields only a cluster has
(pendingTimeoutSeconds, retention, storage.deleteOnStudyDeletion,
trialTemplate.backoffLimit, ttlSecondsAfterFinished and labels). They are taken out
here, and the rest goes through speechtune.spec -- the same checks as a local
study file -- so what CEL cannot say still fails with the field named.
spec.fidelity.checkpointVolume stays in the engine's spec (locally a directory);
on a cluster it names the PVC that every trial Job mounts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import Any

from speechtune import spec
from speechtune.k8s.manifests import JobOptions, reserved_label


@dataclass(frozen=True)
class ClusterOptions:
    job: JobOptions
    pending_timeout_seconds: int = 600
    delete_on_study_deletion: bool = False


PVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # as the CRD's pattern: a DNS subdomain
BUDGET_FIELDS = ("maxTrials", "parallelism", "maxFailedTrials")


def parse(body: dict[str, Any]) -> tuple[spec.Study, ClusterOptions]:
    """Validate a study object; raise spec.SpecError naming every bad field."""
    raw = copy.deepcopy(dict(body.get("spec") or {}))
    template = raw.get("trialTemplate") if isinstance(raw.get("trialTemplate"), dict) else {}
    storage = raw.get("storage") if isinstance(raw.get("storage"), dict) else {}
    raw.pop("retention", None)  # read live by the runner: see keep_trials
    options = ClusterOptions(
        job=JobOptions(
            image=template.pop("image", None) or "",
            backoff_limit=template.pop("backoffLimit", 0),
            ttl_seconds_after_finished=template.pop("ttlSecondsAfterFinished", 3600),
            labels=labels if isinstance(labels := template.pop("labels", None) or {}, dict) else {"": labels},
        ),
        pending_timeout_seconds=raw.pop("pendingTimeoutSeconds", 600),
        delete_on_study_deletion=bool(storage.pop("deleteOnStudyDeletion", False)),
    )
    metadata = body.get("metadata") or {}
    problems: list[tuple[str, str]] = []
    try:
        study = spec.parse_study({"apiVersion": body.get("apiVersion", spec.API_VERSION), "kind": body.get("kind", spec.KIND),
                                  "metadata": {"name": metadata.get("name"), "namespace": metadata.get("namespace")},
                                  "spec": raw})
    except spec.SpecError as error:
        problems.extend(error.problems)
    if not options.job.image:
        problems.append(("spec.trialTemplate.image", "is required on a cluster: the trainer image each trial runs"))
    problems += template_problems(options.job, template.get("replicas", 1))
    claims = checkpoint_claims(study) if not problems else {}
    problems += [(field, f"must be a PersistentVolumeClaim name on a cluster (lowercase letters, digits, '-', '.'), got {claim!r}")
                 for field, claim in claims.items() if not PVC_NAME.match(claim) or len(claim) > 253]
    if len(set(claims.values())) > 1:  # named as the CRD's rule names it: checkpoints.volume when given, else a ladder's
        named = "spec.checkpoints.volume" if "spec.checkpoints.volume" in claims else sorted(claims)[-1]
        problems.append((named, f"every checkpoint volume of a study must be one PVC; got {claims}"))
    if problems:
        raise spec.SpecError(problems)
    if claims:
        options = replace(options, job=replace(options.job, checkpoint_claim=next(iter(claims.values()))))
    return study, replace(options, job=replace(options.job, replicas=study.trial_template.replicas))


def template_problems(job: JobOptions, replicas: Any) -> list[tuple[str, str]]:
    """The cluster-only template fields, as the CRD's rules judge them: labels the operator does not own, and no pod
    retries in a trial of several pods (a retried pod could not rejoin its peers' rendezvous)."""
    path = "spec.trialTemplate"
    problems = [(f"{path}.labels", f"must map label keys to values, got {value!r}") for key, value in job.labels.items() if key == ""]
    problems += [(f"{path}.labels", f"label {key!r} is the operator's or the Job controller's own: use another key")
                 for key in job.labels if reserved_label(key)]
    problems += [(f"{path}.labels", f"label {key!r} must have a string value, got {value!r}")
                 for key, value in job.labels.items() if key and not isinstance(value, str)]
    if isinstance(replicas, int) and replicas > 1 and job.backoff_limit:
        problems.append((f"{path}.backoffLimit", f"must be 0 with replicas > 1, got {job.backoff_limit}: a trial of "
                         "several pods fails as a whole, since a retried pod could not rejoin its peers"))
    return problems


def checkpoint_claims(study: spec.Study) -> dict[str, str]:
    """The PVC each field names, by field path: every trial Job of the study mounts the one PVC."""
    claims = {}
    if study.checkpoints.volume:
        claims["spec.checkpoints.volume"] = study.checkpoints.volume
    if study.fidelity and study.fidelity.checkpoint_volume:
        claims["spec.fidelity.checkpointVolume"] = study.fidelity.checkpoint_volume
    for index, stage in enumerate(study.stages):
        if stage.fidelity and stage.fidelity.checkpoint_volume:
            claims[f"spec.stages[{index}].fidelity.checkpointVolume"] = stage.fidelity.checkpoint_volume
    return claims


def budget(body: dict[str, Any]) -> dict[str, Any]:
    """The budget fields as the engine's update_budget takes them."""
    raw = body.get("spec") or {}
    return {"max_trials": raw.get("maxTrials"), "parallelism": raw.get("parallelism"),
            "max_failed_trials": raw.get("maxFailedTrials")}


def keep_trials(body: dict[str, Any]) -> int | None:
    return ((body.get("spec") or {}).get("retention") or {}).get("keepTrials")


def without_budget(body: dict[str, Any]) -> dict[str, Any]:
    """The spec minus the fields a running study applies at once; a change here restarts the engine."""
    raw = dict(body.get("spec") or {})
    for name in BUDGET_FIELDS + ("retention",):
        raw.pop(name, None)
    return raw
