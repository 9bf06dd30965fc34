"""The leaderboard: a study's best trials, from storage alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from speechtune import record

_RANKED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class Row:
    number: int
    state: str
    value: float | None
    step: int | None
    params: dict[str, Any]
    note: str = ""
    stage: str = ""


def rows(study: optuna.Study, limit: int = 10) -> list[Row]:
    """Complete trials by value, then pruned ones by their last value, then the rest."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False)

    def key(trial: FrozenTrial) -> tuple[int, float, int]:
        value = _value(trial)
        rank = _RANKED.index(trial.state) if trial.state in _RANKED and value is not None else len(_RANKED)
        score = 0.0 if value is None else (-value if maximize else value)
        return rank, score, trial.number

    return [
        Row(
            number=t.number, state=t.state.name, value=_value(t), step=t.last_step, params=dict(t.params),
            note=record.fail_reason(t), stage=record.stage(t) or "",
        )
        for t in sorted(trials, key=key)[:limit]
    ]


def _value(trial: FrozenTrial) -> float | None:
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.last_step is not None:
        return trial.intermediate_values[trial.last_step]
    return None


def table(study: optuna.Study, metric: str, limit: int = 10) -> Table:
    board = rows(study, limit)
    names = sorted({name for row in board for name in row.params})
    result = Table(title=f"{study.study_name}: top {len(board)} of {len(study.get_trials(deepcopy=False))} trials")
    result.add_column("#", justify="right")
    result.add_column(metric, justify="right")
    result.add_column("state")
    result.add_column("step", justify="right")
    staged = any(row.stage for row in board)
    if staged:
        result.add_column("stage")
    for name in names:
        result.add_column(name, justify="right")
    for row in board:
        value = "" if row.value is None else f"{row.value:.4f}"
        state = row.state if not row.note else f"{row.state} ({row.note})"
        result.add_row(
            str(row.number), value, state, "" if row.step is None else str(row.step), *([row.stage] if staged else []),
            *(_format(row.params.get(name)) for name in names),
        )
    return result


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
