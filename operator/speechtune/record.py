"""What a study and its trials carry besides Optuna's own fields: the keys and their typed readers.

Every user attribute the engine writes is named here, so a reader (the CLI, the operator's
status, a report, optuna-dashboard's user) finds them in one place. Optuna keeps them in its
own schema, so ``optuna.load_study`` shows them as ``user_attrs``.
"""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial

# -- trial user attributes ---------------------------------------------------------------
LAUNCHED_AT = "launched_at"  # unix time the trial was asked, for its duration metric
METRICS = "metrics"  # every metric of the trial's last protocol line
FAIL_REASON = "fail_reason"
FAIL_MESSAGE = "fail_message"
REQUEUED_FROM = "requeued_from"  # the interrupted trial this one runs again
LEVEL = "level"  # fidelity ladder: the level a configuration is assigned to (running, queued or done)
BRACKET = "bracket"  # fidelity ladder with brackets: the Hyperband bracket of a configuration (absent: 0)
STAGE = "stage"  # the spec.stages entry a trial belongs to
SEED = "seed"  # a baseline trial's seed, when the baseline runs several
CHECKPOINT = "checkpoint"  # the trial's final checkpoint file, kept for warm start (spec.checkpoints)
REPORTED_PARAMS = "reported_params"  # parameters the trial's final line reported, for a following stage's handoff
WARM_START_FROM = "warm_start_from"  # "study#number": a configuration enqueued from a warm-start source

INTERRUPTED = "interrupted"  # fail reason of a trial whose runner died; not a real failure


def level_metrics_key(level_name: str) -> str:
    """The metrics of a configuration's run at one fidelity level."""
    return f"metrics_{level_name}"


def level_finished_key(level_name: str) -> str:
    """When a configuration's run at one fidelity level ended (unix time): the last tie-break of its ranking."""
    return f"finished_{level_name}"


def level_seconds_key(level_name: str) -> str:
    """How long a configuration's run at one fidelity level took (``RunResult.seconds``): the level's measured cost."""
    return f"seconds_{level_name}"


def level_startup_key(level_name: str) -> str:
    """How long that run spent before its first epoch (``RunResult.startup_seconds``), when it reported two epochs."""
    return f"startup_{level_name}"


# -- study user attributes -----------------------------------------------------------------
OBJECTIVE = "objective"  # the metric the value is, so readers can label it
CORRELATIONS = "fidelity_correlations"  # Spearman rho between adjacent ladder levels
COSTS = "fidelity_costs"  # each lower ladder level's measured cost as a share of the top's
SPEND = "fidelity_spend"  # the ladder's compute so far in full runs' worth, and the configurations it bought
VALIDATION = "validation"  # the best configuration retrained with other seeds
STAGES = "stages"  # each stage's state and result, by stage name
CHECKPOINT_PINS = "checkpoint_pins"  # trial numbers whose checkpoints other studies warm-start from
WARM_START = "warm_start"  # what spec.warmStart took from its source, as first read
KEPT_CHECKPOINTS = "kept_checkpoints"  # trial number (as text) -> checkpoint file, for those still kept


def fail_reason(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get(FAIL_REASON, ""))


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get(FAIL_REASON) == INTERRUPTED


def stage(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(STAGE)


def level(trial: FrozenTrial) -> int | None:
    return trial.user_attrs.get(LEVEL)


def bracket(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get(BRACKET, 0))


def checkpoint(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(CHECKPOINT)


def kept_checkpoints(study_attrs: dict[str, Any]) -> dict[str, str]:
    return dict(study_attrs.get(KEPT_CHECKPOINTS, {}))


def stages(study_attrs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(study_attrs.get(STAGES, {}))
