"""Which finished SpeechTuningTrial objects to delete under spec.retention.keepTrials (pure).

The Optuna storage keeps every trial; this only bounds what sits in etcd. The
best complete trials stay (the leaderboard), then the newest pruned or failed.
"""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState


def to_delete(trials: list[FrozenTrial], keep: int | None, direction: str) -> list[int]:
    """Trial numbers beyond the ``keep`` finished trials worth keeping; running ones are never chosen."""
    if keep is None:
        return []
    finished = [t for t in trials if t.state.is_finished()]
    sign = 1 if direction == "minimize" else -1
    complete = sorted((t for t in finished if t.state == TrialState.COMPLETE and t.value is not None),
                      key=lambda t: (sign * t.value, t.number))
    others = sorted((t for t in finished if t not in complete), key=lambda t: -t.number)
    ranked = complete + others
    return sorted(t.number for t in ranked[keep:])
