"""What the operator writes into status: pure functions from Optuna's trials to the CRDs' status fields.

Kubernetes API conventions: conditions Ready / Succeeded / Failed (and
ProxyUnreliable and ProxyCostly with a fidelity ladder), each with reason, message,
observedGeneration and a lastTransitionTime that moves only when its status does.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from speechtune.record import FAIL_MESSAGE, FAIL_REASON, LEVEL, STAGE, WARM_START_FROM
from speechtune.schedulers.ladder import MIN_COST_RUNS, MIN_PAIRS, describe_cost

STATES = {
    TrialState.WAITING: "Waiting", TrialState.RUNNING: "Running", TrialState.COMPLETE: "Complete",
    TrialState.PRUNED: "Pruned", TrialState.FAIL: "Failed",
}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _time(moment: datetime.datetime | None) -> str | None:
    """Optuna keeps naive local times; the API wants RFC 3339 UTC."""
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def trial_status(trial: FrozenTrial, direction: str, level_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """A SpeechTuningTrial's status: state, last step, latest and best value, why it ended.

    With a fidelity ladder (``level_names``) a step is a level, and the status says which level
    the configuration has reached. With spec.stages it says the trial's stage, and a configuration
    queued from a warm-start source says which (``<optuna study>#<number>``).
    """
    values = {step: value for step, value in trial.intermediate_values.items() if _finite(value) is not None}
    pick = min if direction == "minimize" else max
    final = _finite(trial.value) if trial.state == TrialState.COMPLETE else None
    latest = final if final is not None else (values[max(values)] if values else None)
    candidates = list(values.values()) + ([final] if final is not None else [])
    status: dict[str, Any] = {
        "state": STATES[trial.state],
        "lastStep": max(values) if values else None,
        "value": latest,
        "bestValue": pick(candidates) if candidates else None,
        "startTime": _time(trial.datetime_start),
        "completionTime": _time(trial.datetime_complete),
        "stage": trial.user_attrs.get(STAGE),
        "warmStartFrom": trial.user_attrs.get(WARM_START_FROM),
    }
    rung = trial.user_attrs.get(LEVEL) if level_names else None
    if rung is not None:
        status.update(rung=rung, level=level_names[rung])
    if trial.state == TrialState.FAIL:
        status["reason"] = trial.user_attrs.get(FAIL_REASON, "Failed")
        status["message"] = trial.user_attrs.get(FAIL_MESSAGE, "")
    elif trial.state == TrialState.PRUNED and rung is not None:
        status["message"] = f"not promoted past level {level_names[rung]}"
    elif trial.state == TrialState.PRUNED:
        status["message"] = f"pruned by the pruner at step {max(values)}" if values else "pruned by the pruner"
    return {key: value for key, value in status.items() if value is not None}


def trial_counts(counts: dict[str, int]) -> dict[str, int]:
    """The study's status.trials from Executor.counts()."""
    return {
        "total": sum(count for state, count in counts.items() if state in TrialState.__members__),
        "running": counts.get("RUNNING", 0),
        "complete": counts.get("COMPLETE", 0),
        "pruned": counts.get("PRUNED", 0),
        "failed": counts.get("FAIL", 0),
        "waiting": counts.get("WAITING", 0),
    }


def best_trial(trial: FrozenTrial | None) -> dict[str, Any] | None:
    if trial is None or _finite(trial.value) is None:
        return None
    return {"number": trial.number, "value": trial.value, "params": dict(trial.params)}


def fidelity_status(rungs: list[dict[str, Any]], correlations: dict[str, dict[str, Any]], level_names: tuple[str, ...],
                    brackets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """status.fidelity: each level's progress and rank metric, the proxy rank correlation of each pair of adjacent levels
    measured so far (between their rank metrics), and with several Hyperband brackets, each bracket."""
    measured = []
    ranks = {rung["name"]: rung["rank"]["metric"] for rung in rungs if "rank" in rung}
    for low, high in zip(level_names, level_names[1:]):
        found = correlations.get(f"{low}->{high}")
        if found is not None:
            entry = {"fromLevel": low, "toLevel": high, "rho": found["rho"], "pairs": found["pairs"], "unreliable": found["unreliable"]}
            if low in ranks and high in ranks:
                entry.update(fromMetric=ranks[low], toMetric=ranks[high])
            measured.append(entry)
    found_status: dict[str, Any] = {"levels": rungs, "correlations": measured}
    if brackets is not None and len(brackets) > 1:
        found_status["brackets"] = brackets
    return found_status


def proxy_condition(correlations: list[dict[str, Any]], warning: float, generation: int | None) -> dict[str, Any]:
    """ProxyUnreliable: True while a level ranks configurations unlike the next one (rho < correlationWarning over >= 5 pairs)."""
    def describe(found: dict[str, Any]) -> str:
        return f"Spearman rho {found['rho']:.2f} between {found['fromLevel']} and {found['toLevel']} over {found['pairs']} configurations"

    unreliable = [found for found in correlations if found["unreliable"]]
    if unreliable:
        return condition("ProxyUnreliable", True, "RankCorrelationBelowWarning",
                         "; ".join(map(describe, unreliable)) + f" is below correlationWarning {warning}: "
                         "the lower level does not rank configurations like the higher one, so its promotions are close to random",
                         generation)
    judged = [found for found in correlations if found["pairs"] >= MIN_PAIRS]
    if judged:
        return condition("ProxyUnreliable", False, "RankCorrelationAboveWarning",
                         "; ".join(map(describe, judged)) + f", at least correlationWarning {warning}", generation)
    return {**condition("ProxyUnreliable", False, "TooFewPairs",
                        f"no two adjacent levels share {MIN_PAIRS} configurations yet", generation), "status": "Unknown"}


def cost_condition(costs: dict[str, dict[str, Any]], warning: float, generation: int | None) -> dict[str, Any]:
    """ProxyCostly: True while a lower level costs more than costWarning of the top, or its runs spend more than that
    share of their time before their first epoch (medians, with at least 3 runs there)."""
    costly = [describe_cost(level, found, warning) for level, found in costs.items() if found["costly"]]
    if costly:
        return condition("ProxyCostly", True, "CostAboveWarning", "; ".join(costly), generation)
    judged = [describe_cost(level, found, warning) for level, found in costs.items() if found["runs"] >= MIN_COST_RUNS]
    if judged:
        return condition("ProxyCostly", False, "CostBelowWarning", "; ".join(judged) + f", within costWarning {warning}", generation)
    return {**condition("ProxyCostly", False, "NotMeasured",
                        f"no lower level has {MIN_COST_RUNS} measured runs with a top-level run to compare yet", generation),
            "status": "Unknown"}


def stages_status(stages: tuple, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """status.stages: each stage's kind, state (Pending, Running, Succeeded) and result so far."""
    result = []
    for stage in stages:
        found = records.get(stage.name, {})
        entry: dict[str, Any] = {"name": stage.name, "kind": stage.kind, "state": found.get("state", "Pending")}
        for key in ("trials", "complete", "costSeconds", "mean", "std", "seeds"):
            if found.get(key) is not None:
                entry[key] = found[key]
        if found.get("best"):
            entry["bestTrial"], entry["bestValue"] = found["best"]["number"], found["best"]["value"]
        if found.get("region"):
            entry["region"] = {name: [str(v) for v in values] for name, values in found["region"].items()}
        if found.get("handoff"):
            taken = found["handoff"]
            entry["handoff"] = {**{key: taken[key] for key in ("from", "trial", "value", "flag", "checkpoint") if key in taken},
                                **({"params": {name: str(value) for name, value in taken["params"].items()}} if taken.get("params") else {})}
        result.append(entry)
    return result


def current_stage(stages: list[dict[str, Any]]) -> str | None:
    """status.currentStage: the stage running now, None before the first starts and after the last ends."""
    return next((entry["name"] for entry in stages if entry["state"] == "Running"), None)


def validation_status(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """status.validation: the best configuration retrained with other seeds, as mean and std of the objective."""
    if not record or record.get("mean") is None:
        return None
    values = [record["values"][seed] for seed in sorted(record["values"], key=int)]
    return {"trial": record["trial"], "mean": record["mean"], "std": record["std"], "seeds": len(values), "values": values}


def condition(type_: str, status: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "observedGeneration": generation}


def merge_conditions(previous: list[dict[str, Any]], new: list[dict[str, Any]], now: datetime.datetime) -> list[dict[str, Any]]:
    """The new conditions, keeping lastTransitionTime of those whose status did not change."""
    before = {c.get("type"): c for c in previous or []}
    stamp = now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    merged = []
    for item in new:
        old = before.get(item["type"])
        kept = old.get("lastTransitionTime") if old and old.get("status") == item["status"] else None
        merged.append({**item, "lastTransitionTime": kept or stamp})
    return merged


def phase_conditions(state: str, reason: str, message: str, generation: int | None) -> list[dict[str, Any]]:
    """Ready / Succeeded / Failed for a study state: Pending, Running, Succeeded or Failed."""
    return [
        condition("Ready", state == "Running", reason if state != "Running" else "Running", message, generation),
        condition("Succeeded", state == "Succeeded", reason if state == "Succeeded" else "NotFinished",
                  message if state == "Succeeded" else "", generation),
        condition("Failed", state == "Failed", reason if state == "Failed" else "NotFailed",
                  message if state == "Failed" else "", generation),
    ]
