"""spec.checkpoints: keep the best trials' final checkpoints, so the study can be a warm-start source.

With ``keepBest: N`` every trial's run gets ``--checkpoint_dir=<root>/trial-<n>[/...]``; the
trainer leaves its final model there as ``last.ckpt`` (the trainer's resume file). When a trial
ends, the folders of finished trials outside the best N are removed, except those that another
study's ``warmStart.initFrom`` pinned (study user attr ``checkpoint_pins``). Removal needs the
folder on this machine: locally it is; on a cluster the checkpoints are on a PVC the operator
does not mount, so there the operator only stops pointing at them (the trial's ``checkpoint``
attribute is cleared).
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from speechtune import record

if TYPE_CHECKING:
    from speechtune.executor import Executor

CHECKPOINT_FILE = "last.ckpt"  # what speechtune-trainer writes in --checkpoint-dir


class Checkpoints:
    def __init__(self, executor: Executor, keep_best: int, remove_files: bool):
        self.executor = executor
        self.keep_best = keep_best if executor.checkpoint_root is not None else 0
        self.remove_files = remove_files

    def folder(self, number: int, *parts: str) -> str | None:
        """Where a trial's run keeps its checkpoint, when the study keeps checkpoints."""
        if not self.keep_best:
            return None
        return str(PurePath(self.executor.checkpoint_root, f"trial-{number}", *parts))

    def attrs(self, number: int, folder: str | None = None) -> dict[str, Any]:
        """The trial attribute naming its final checkpoint, stored with its COMPLETE state."""
        folder = folder or self.folder(number)
        return {record.CHECKPOINT: str(PurePath(folder, CHECKPOINT_FILE))} if self.keep_best and folder else {}

    def clean(self, trials: list[FrozenTrial]) -> None:
        """Forget (and locally remove) the checkpoints of finished trials outside the best ``keepBest`` and the pins."""
        if not self.keep_best:
            return
        pinned = {int(number) for number in self.executor.study.user_attrs.get(record.CHECKPOINT_PINS, {}).values()}
        sign = -1 if self.executor.spec.objective.direction == "maximize" else 1
        complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and record.checkpoint(t)),
                          key=lambda t: (sign * t.value, t.number))
        keep = {t.number for t in complete[: self.keep_best]} | pinned
        for trial in trials:
            if not trial.state.is_finished() or trial.number in keep:
                continue
            if self.remove_files:
                shutil.rmtree(Path(self.executor.checkpoint_root, f"trial-{trial.number}"), ignore_errors=True)
            if record.checkpoint(trial):
                self.executor.storage.set_trial_user_attr(trial._trial_id, record.CHECKPOINT, "")
