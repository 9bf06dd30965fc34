"""Schedulers decide what runs next and what a run's values mean; the executor does the rest.

A scheduler never launches, follows or stops a run (``speechtune.executor`` does): it answers
``next_run`` ("what now?"), hears each value (``on_value``: go on or stop), and says what a run's
ending means for its trial (``on_result`` / ``on_failure``), recording it through the executor's
``complete`` / ``prune`` / ``fail``. The executor stops a run only after that, so the order
"record, then stop" holds for every policy by construction.

``build`` picks the scheduler for a spec: plain search (sampler + pruner), the fidelity ladder,
or a sequence of stages (baseline, search, refine, validate), with warm start from another study.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from speechtune import record
from speechtune.backend import TrialLaunch, TrialRun, build_launch

if TYPE_CHECKING:
    from speechtune.executor import Executor, RunResult, TrialFailed


@dataclass(eq=False)
class Run:
    """One run a scheduler asked for: a trial (new or existing), with the trainer's overrides."""

    scheduler: Scheduler
    trial: optuna.Trial
    launch: TrialLaunch
    description: str
    started: float  # when the trial began, for its duration metric
    announce: bool = True  # post a "started" event
    level: int = 0
    seed: int | None = None
    reported: dict[int, float] = field(default_factory=dict)  # steps already stored (a re-read after a restart skips them)
    handle: TrialRun | None = None


class Scheduler:
    """The policy interface; the defaults fit a scheduler whose runs decide their trial's state."""

    def __init__(self, executor: Executor, stage: str | None = None):
        self.executor = executor
        self.stage = stage  # the spec.stages entry this scheduler runs; None outside stages
        self.overrides: dict[str, Any] = {}  # for every run: fixed parameters, warm start's init_from, a stage's handoff
        self.template = executor.spec.trial_template  # what its runs start (a stage may run its own trainer)

    @property
    def study(self) -> optuna.Study:
        return self.executor.study

    def prepare(self) -> None:
        """Called when this scheduler's turn comes (and on every start): put its sampler and pruner on the study."""

    def next_run(self) -> Run | None:
        """The run to start now, or None when there is nothing to start now."""
        raise NotImplementedError

    def on_value(self, run: Run, step: int, value: float) -> bool:
        """A new value of the objective; True stops the run (the executor records, then stops)."""
        return False

    def on_result(self, run: Run, result: RunResult) -> None:
        raise NotImplementedError

    def on_failure(self, run: Run, failure: TrialFailed) -> None:
        self.executor.fail(run.trial.number, run.trial._trial_id, failure.reason, self.failure_message(run, failure))
        self.executor.finish_metrics("FAIL", run.started)

    def failure_message(self, run: Run, failure: TrialFailed) -> str:
        return str(failure)

    def resume(self, frozen: FrozenTrial) -> Run | None:
        """The run of a RUNNING trial that an earlier executor may have left going, to re-attach to;
        None when nothing of it was running."""
        return None

    def lost(self, frozen: FrozenTrial) -> None:
        """A RUNNING trial whose run (from ``resume``) is gone: the runner died while it ran."""
        self.executor.fail(frozen.number, frozen._trial_id, record.INTERRUPTED, "the runner stopped while this trial was running")

    def total_trials(self) -> int:
        """How many trials this scheduler will run, for progress displays."""
        raise NotImplementedError

    def stage_now(self) -> str | None:
        """The stage running now (None outside stages)."""
        return self.stage

    def trials(self) -> list[FrozenTrial]:
        """This scheduler's trials: those of its stage, or all of them outside stages."""
        trials = self.executor.trials()
        if self.stage is None:
            return trials
        return [t for t in trials if record.stage(t) == self.stage]

    def running(self) -> int:
        """Runs of this scheduler going on now."""
        return self.executor.runs_of(self)

    def make_run(self, trial: optuna.Trial, *, values: dict[str, Any], overrides: dict[str, Any] | None = None,
                 attempt: str = "", level: int = 0, description: str = "", announce: bool = True,
                 seed: int | None = None, started: float | None = None) -> Run:
        launch = build_launch(self.executor.study_name, trial.number, self.template, values,
                              overrides={**self.overrides, **(overrides or {})}, attempt=attempt, rung=level)
        return Run(self, trial, launch, description, started if started is not None else time.time(),
                   announce=announce, level=level, seed=seed)


def build(executor: Executor) -> Scheduler:
    """The scheduler for the executor's spec."""
    from speechtune.schedulers.stages import build_stages

    return build_stages(executor)
