"""Plain search: the sampler proposes, every trial is one run, the pruner may stop it early."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from speechtune import metrics, record, search
from speechtune.schedulers import Run, Scheduler
from speechtune.schedulers.checkpoints import Checkpoints

if TYPE_CHECKING:
    from speechtune.executor import Executor, RunResult


class PlainSearch(Scheduler):
    """``max_trials`` trials from ``sampler``, each reporting every step to ``pruner``."""

    def __init__(self, executor: Executor, *, stage: str | None, sampler: BaseSampler, pruner: optuna.pruners.BasePruner,
                 distributions: dict[str, BaseDistribution], max_trials: Callable[[], int], checkpoints: Checkpoints):
        super().__init__(executor, stage)
        self.sampler = sampler
        self.pruner = pruner
        self.distributions = distributions
        self.max_trials = max_trials  # a callable: outside stages the budget may change while the study runs
        self.checkpoints = checkpoints
        self.space = executor.spec.search_space  # its conditional structure (a stage's own trainer has its own)

    def prepare(self) -> None:
        self.study.sampler = self.sampler
        self.study.pruner = self.pruner

    def total_trials(self) -> int:
        return self.max_trials()

    def _counts(self) -> tuple[int, int]:
        """(trials of this scheduler, of which WAITING): storage counters outside stages, else a scan."""
        if self.stage is None:
            counts = self.executor.counts()
            return sum(counts.values()), counts["WAITING"]
        mine = self.trials()
        return len(mine), sum(1 for t in mine if t.state == TrialState.WAITING)

    def next_run(self) -> Run | None:
        total, waiting = self._counts()
        # A WAITING trial (queued again after an interruption, or by warm start) is already counted in the total.
        if total >= self.max_trials() and not waiting:
            return None
        began = time.perf_counter()
        with self.executor.storage.batch():  # the trial and its params are committed together, before launch
            trial = self.ask()
        metrics.SUGGEST_SECONDS.labels(**self.executor.labels).observe(time.perf_counter() - began)
        return self.run_of(trial)

    def ask(self) -> optuna.Trial:
        trial = search.ask(self.study, self.distributions, self.space)
        trial.set_user_attr(record.LAUNCHED_AT, time.time())
        if self.stage is not None:
            trial.set_user_attr(record.STAGE, self.stage)
        return trial

    def run_of(self, trial: optuna.Trial, reported: dict[int, float] | None = None) -> Run:
        run = self.make_run(trial, values=trial.params, overrides=self.trial_overrides(trial), description=self.describe(trial),
                            started=trial.user_attrs.get(record.LAUNCHED_AT, time.time()))
        run.reported = dict(reported or {})
        return run

    def trial_overrides(self, trial: optuna.Trial) -> dict[str, Any]:
        """What this trial's run gets besides its parameters: where to keep its checkpoint."""
        folder = self.checkpoints.folder(trial.number)
        return {"checkpoint_dir": folder} if folder is not None else {}

    def describe(self, trial: optuna.Trial) -> str:
        from speechtune.executor import describe

        return describe(trial.params)

    def on_value(self, run: Run, step: int, value: float) -> bool:
        if step in run.reported:
            return False  # already stored: output re-read after a reconnect or restart
        run.reported[step] = value
        run.trial.report(value, step)
        metrics.REPORTED_VALUE.labels(**self.executor.labels, step=metrics.step_bucket(step)).observe(value)
        return run.trial.should_prune()

    def on_result(self, run: Run, result: RunResult) -> None:
        attrs = {record.METRICS: result.metrics}
        if result.stopped:
            step = max(run.reported)
            self.executor.prune(run.trial, f"pruned at step {step}", run.reported[step], run.started, attrs)
        else:
            attrs.update(self.checkpoints.attrs(run.trial.number))
            if result.params:
                attrs[record.REPORTED_PARAMS] = result.params
            self.executor.complete(run.trial, result.value, f"{self.executor.objective}={result.value:.4g}", run.started, attrs)
        self.checkpoints.clean(self.executor.trials())

    def on_failure(self, run: Run, failure: Any) -> None:
        super().on_failure(run, failure)
        self.checkpoints.clean(self.executor.trials())

    def resume(self, frozen: FrozenTrial) -> Run | None:
        return self.run_of(optuna.Trial(self.study, frozen._trial_id), frozen.intermediate_values)

    def lost(self, frozen: FrozenTrial) -> None:
        super().lost(frozen)
        if self._counts()[0] < self.max_trials():
            attrs = {record.REQUEUED_FROM: frozen.number}
            if self.stage is not None:
                attrs[record.STAGE] = self.stage
            self.study.enqueue_trial(frozen.params, user_attrs=attrs, skip_if_exists=False)
