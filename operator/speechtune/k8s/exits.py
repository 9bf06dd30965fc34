"""How a trial's Job ended, read from the Job and its pods (pure, so each case is unit-tested).

The engine records the reason in Optuna and the Trial's status; every failure
here counts toward ``spec.maxFailedTrials``. A Job of several pods (an Indexed Job,
trialTemplate.replicas) succeeds with its index 0, and fails as a whole with the
first of its pods that fails, which the reason names.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from speechtune.backend import Exit
from speechtune.k8s.manifests import completion_index

DELETED = Exit(False, None, "JobDeleted", "the trial's Job was deleted by someone other than the operator")
# A Job's Failed condition by its pod failure policy (manifests.indexed): "Container trainer for pod ns/name failed
# with exit code 3 matching FailJob rule at index 0".
FAILED_POD = re.compile(r"for pod [^/\s]+/(?P<pod>\S+) failed with exit code (?P<code>\d+)")


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer container's terminated state, if it has ended."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return state["terminated"]
    return None


def succeeded(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Succeeded"


def started(pod: dict[str, Any]) -> bool:
    """Whether the container has started, so its log can be read."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "running" in state or "terminated" in state:
            return True
    return False


def _epoch() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def classify(job: dict[str, Any] | None, pods: list[dict[str, Any]], now: float, pending_timeout: float,
             last_words: str = "") -> Exit | None:
    """The trial's Exit, or None while it is still pending or running.

    ``pods`` are the Job's pods, oldest first; ``last_words`` is the last
    non-protocol line the trainer printed, to say why it failed.
    """
    if job is None:
        return DELETED
    conditions = _true_conditions(job)
    several = (job.get("spec") or {}).get("completionMode") == "Indexed"
    # One succeeded pod completes the Job (completions: 1; several pods: index 0's, whose log has the metrics).
    # Its Complete condition follows a second or more later (the Job controller batches pod events), time in
    # which the trial's slot would idle.
    if {"Complete", "SuccessCriteriaMet"} & conditions.keys() or any(
            succeeded(pod) for pod in pods if completion_index(pod) in (None, 0)):
        return Exit(True, 0)
    if "Failed" in conditions:
        return _failure(conditions["Failed"], pods, last_words, several)
    if not pods:
        age = now - parse_time(job["metadata"].get("creationTimestamp") or _epoch())
        if age >= pending_timeout:
            queued = " while suspended (a queue such as Kueue has not admitted it)" if (job.get("spec") or {}).get("suspend") else ""
            return Exit(False, None, "NoPod",
                        f"the trial's Job created no pod in {age:.0f} s{queued} (spec.pendingTimeoutSeconds={pending_timeout:g}); "
                        f"see `kubectl describe job {job['metadata'].get('name', '')}` (quota, admission, PodSecurity)")
    for pod in pods:
        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            since = parse_time(scheduled.get("lastTransitionTime") or pod["metadata"]["creationTimestamp"])
            if now - since >= pending_timeout:
                return Exit(False, None, "Unschedulable",
                            f"the trial's pod{_which(pod, job) if several else ''} was unschedulable for {now - since:.0f} s "
                            f"(spec.pendingTimeoutSeconds={pending_timeout:g}): {scheduled.get('message', '')}".rstrip(": "))
    return None


def _which(pod: dict[str, Any], job: dict[str, Any] | None = None) -> str:
    """`` <name> (index i of n)``: which pod of a Job of several pods."""
    of = f" of {job['spec'].get('completions')}" if job else ""
    return f" {pod['metadata']['name']} (index {completion_index(pod)}{of})"


def _culprit(condition: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod whose failure failed a Job of several pods: the one the Job controller names (its pod failure
    policy's message; None once that pod is gone: the message names it), else the first to end with a failure;
    its peers, stopped after it, ended later."""
    named = FAILED_POD.search(condition.get("message") or "")
    if named:
        return next((pod for pod in pods if pod["metadata"]["name"] == named["pod"]), None)
    failed = [pod for pod in pods if (terminated(pod) or {}).get("exitCode")]
    return min(failed, key=lambda pod: (terminated(pod).get("finishedAt") or "", bool(pod["metadata"].get("deletionTimestamp"))),
               default=None)


def _failure(condition: dict[str, Any], pods: list[dict[str, Any]], last_words: str, several: bool = False) -> Exit:
    """How the Job failed: its last pod's end (a retried Job's earlier pods failed before it); of several pods, the
    culprit's, named, with the last words only when it is index 0 (the run's log is index 0's)."""
    where = ""
    if several:
        pod = _culprit(condition, pods)
        state = terminated(pod) if pod is not None else None
        if pod is not None:
            where = _which(pod)
            last_words = last_words if completion_index(pod) == 0 else ""
        elif gone := FAILED_POD.search(condition.get("message") or ""):  # the Job controller names a pod since deleted
            code = int(gone["code"])
            killed = " (a signal: the pod was deleted, evicted or preempted)" if code in (137, 143) else ""
            return Exit(False, code, "Error", f"trainer pod {gone['pod']} exited with code {code}{killed}")
    else:
        ended = [state for state in map(terminated, pods) if state is not None]
        state = ended[-1] if ended else None
    if state is not None and state.get("reason") == "OOMKilled":
        return Exit(False, state.get("exitCode"), "OOMKilled",
                    f"the trainer{where} ran out of memory (OOMKilled); raise spec.trialTemplate.resources.limits.memory "
                    "or lower the batch size")
    if state is not None and state.get("exitCode"):
        tail = (state.get("message") or "").strip().splitlines()  # FallbackToLogsOnError: the log's end
        detail = last_words or (tail[-1] if tail else "")
        message = f"trainer{where} exited with code {state['exitCode']}"
        return Exit(False, state["exitCode"], "Error", f"{message}: {detail[:300]}" if detail else message)
    reason = condition.get("reason") or "JobFailed"
    return Exit(False, None, reason, condition.get("message") or f"the trial's Job failed ({reason})")
