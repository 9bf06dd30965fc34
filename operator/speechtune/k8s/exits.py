"""How a trial's Job ended, read from the Job and its pods (pure, so each case is unit-tested).

The engine records the reason in Optuna and the Trial's status; every failure
here counts toward ``spec.maxFailedTrials``.
"""

from __future__ import annotations

import datetime
from typing import Any

from speechtune.backend import Exit

DELETED = Exit(False, None, "JobDeleted", "the trial's Job was deleted by someone other than the operator")


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
    # One succeeded pod completes the Job (completions: 1). Its Complete condition follows a second
    # or more later (the Job controller batches pod events), time in which the trial's slot would idle.
    if "Complete" in conditions or any(map(succeeded, pods)):
        return Exit(True, 0)
    if "Failed" in conditions:
        return _failure(conditions["Failed"], pods, last_words)
    if not pods:
        age = now - parse_time(job["metadata"].get("creationTimestamp") or _epoch())
        if age >= pending_timeout:
            return Exit(False, None, "NoPod",
                        f"the trial's Job created no pod in {age:.0f} s (spec.pendingTimeoutSeconds={pending_timeout:g}); "
                        f"see `kubectl describe job {job['metadata'].get('name', '')}` (quota, admission, PodSecurity)")
    for pod in pods:
        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            since = parse_time(scheduled.get("lastTransitionTime") or pod["metadata"]["creationTimestamp"])
            if now - since >= pending_timeout:
                return Exit(False, None, "Unschedulable",
                            f"the trial's pod was unschedulable for {now - since:.0f} s "
                            f"(spec.pendingTimeoutSeconds={pending_timeout:g}): {scheduled.get('message', '')}".rstrip(": "))
    return None


def _failure(condition: dict[str, Any], pods: list[dict[str, Any]], last_words: str) -> Exit:
    ended = [state for state in map(terminated, pods) if state is not None]
    state = ended[-1] if ended else None
    if state is not None and state.get("reason") == "OOMKilled":
        return Exit(False, state.get("exitCode"), "OOMKilled",
                    "the trainer ran out of memory (OOMKilled); raise spec.trialTemplate.resources.limits.memory "
                    "or lower the batch size")
    if state is not None and state.get("exitCode"):
        tail = (state.get("message") or "").strip().splitlines()  # FallbackToLogsOnError: the log's end
        detail = last_words or (tail[-1] if tail else "")
        message = f"trainer exited with code {state['exitCode']}"
        return Exit(False, state["exitCode"], "Error", f"{message}: {detail[:300]}" if detail else message)
    reason = condition.get("reason") or "JobFailed"
    return Exit(False, None, reason, condition.get("message") or f"the trial's Job failed ({reason})")
