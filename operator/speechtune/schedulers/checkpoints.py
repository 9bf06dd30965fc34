"""spec.checkpoints: keep the best trials' final checkpoints, so the study can be a warm-start source.

With ``keepBest: N`` every trial's run gets ``--checkpoint_dir=<root>/trial-<n>[/...]``; the
trainer leaves its final model there as ``last.ckpt`` (the trainer's resume file). When a trial
ends, the folders of finished trials outside the best N are removed, except the best of the
stages a later stage's handoff takes a checkpoint from, and those that another study's
``warmStart.initFrom`` pinned (study user attr ``checkpoint_pins``). The study's
``kept_checkpoints`` names the checkpoints that still exist, by trial. Removal needs the folder on this machine: locally it
is; on a cluster the checkpoints are on a PVC the operator does not mount, so there the operator
only drops them from ``kept_checkpoints`` and the files stay until the PVC is cleaned.
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
    def __init__(self, executor: Executor, keep_best: int, remove_files: bool, handed_on: list[tuple[str, ...]] | None = None):
        self.executor = executor
        self.keep_best = keep_best if executor.checkpoint_root is not None else 0
        self.remove_files = remove_files
        self.handed_on = handed_on or []  # stage groups whose best checkpoint a later stage's handoff takes: kept too
        self._removed: set[int] = set()

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
        """Keep the checkpoints of the best ``keepBest`` complete trials and the pinned ones; remove
        (locally) the rest of the finished trials'; record the kept ones in the study (``kept_checkpoints``)."""
        if not self.keep_best:
            return
        study = self.executor.study
        pinned = {int(number) for number in study.user_attrs.get(record.CHECKPOINT_PINS, {}).values()}
        sign = -1 if self.executor.spec.objective.direction == "maximize" else 1
        complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and record.checkpoint(t)),
                          key=lambda t: (sign * t.value, t.number))
        keep = {t.number for t in complete[: self.keep_best]} | pinned
        for stages in self.handed_on:
            keep |= {t.number for t in [t for t in complete if record.stage(t) in stages][:1]}
        kept = {**{number: path for number, path in record.kept_checkpoints(study.user_attrs).items() if int(number) in pinned},
                **{str(t.number): record.checkpoint(t) for t in complete if t.number in keep}}
        if kept != record.kept_checkpoints(study.user_attrs):
            study.set_user_attr(record.KEPT_CHECKPOINTS, kept)
        if not self.remove_files:
            return
        for trial in trials:
            if trial.state.is_finished() and trial.number not in keep and trial.number not in self._removed:
                shutil.rmtree(Path(self.executor.checkpoint_root, f"trial-{trial.number}"), ignore_errors=True)
                self._removed.add(trial.number)
