"""The study loop: ask -> launch -> ingest -> report/prune -> tell.

The engine is free of Kubernetes. It keeps ``parallelism`` trials running
through a backend, turns protocol lines into Optuna reports, asks the pruner
after every new value, and records how each trial ended. Optuna storage is the
system of record, so a new engine on the same storage continues the study.

Recovery policy, for trials left RUNNING by an engine that died: if the
backend can re-attach (a Kubernetes Job still exists), the trial is followed
again and its output re-read from the start; values already stored are
skipped. Otherwise, after the backend's ``recovery_grace_seconds`` (a Job
create sent just before the death can land late) and one more look, the trial is recorded FAIL with reason ``interrupted`` (not
counted toward ``maxFailedTrials``) and its configuration is queued again as
a new trial, inside ``maxTrials``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from speechtune import metrics, search, spec
from speechtune.backend import Backend, TrialLaunch, TrialRun, build_launch
from speechtune.local import LaunchError
from speechtune.protocol import parse_line
from speechtune.storage import WriteThroughStorage

log = logging.getLogger(__name__)

FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
REQUEUED_FROM = "requeued_from"


@dataclass(frozen=True)
class Event:
    """Something a person would want to know: started, pruned, completed, failed, study-failed, study-succeeded."""

    kind: str
    number: int | None = None
    message: str = ""
    value: float | None = None


@dataclass
class Budget:
    """The limits that may change while a study runs."""

    max_trials: int
    parallelism: int
    max_failed_trials: int


@dataclass
class Outcome:
    """How the study loop ended."""

    state: str  # Succeeded | Failed
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)


class TrialFailed(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Engine:
    def __init__(
        self,
        study: spec.Study,
        storage: WriteThroughStorage,
        backend: Backend,
        *,
        study_name: str | None = None,
        namespace: str = "local",
        notify: Callable[[Event], None] | None = None,
    ):
        self.spec = study
        self.storage = storage
        self.backend = backend
        self.budget = Budget(study.max_trials, study.parallelism, study.max_failed_trials)
        self.study_name = study_name or study.name
        self.labels = {"namespace": namespace, "study": self.study_name}
        self._notify = notify or (lambda event: None)
        self._distributions = search.distributions(study.search_space)
        self._objective = study.objective.metric
        self.gpus = metrics.requested_gpus(study.trial_template.resources)  # per run, for speechtune_gpu_seconds
        metrics.PRUNED.labels(**self.labels)  # at 0 at once: rate() ignores the value a series first appears with
        if study.sampler.type == "grid":
            self.budget.max_trials = min(self.budget.max_trials, search.grid_size(study.search_space))
        self.study = optuna.create_study(
            study_name=self.study_name, storage=storage, load_if_exists=True,
            sampler=search.build_sampler(study.sampler, study.search_space),
            pruner=search.build_pruner(study.pruner), direction=study.objective.direction,
        )
        if self.study.user_attrs.get("objective") != self._objective:
            self.study.set_user_attr("objective", self._objective)  # so `speechtune status` can label the value
        self._running: dict[int, asyncio.Task] = {}
        self._runs: dict[int, TrialRun] = {}
        self._wake = asyncio.Event()
        self._failed_message = ""

    # -- public -------------------------------------------------------------
    def update_budget(self, max_trials: int | None = None, parallelism: int | None = None, max_failed_trials: int | None = None) -> None:
        """Change the budget of a running study; the loop applies it at once."""
        self.budget = replace(
            self.budget,
            **{k: v for k, v in dict(max_trials=max_trials, parallelism=parallelism, max_failed_trials=max_failed_trials).items() if v is not None},
        )
        if self.spec.sampler.type == "grid":  # the grid sampler would revisit points past its size
            self.budget.max_trials = min(self.budget.max_trials, search.grid_size(self.spec.search_space))
        self._wake.set()

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def counts(self) -> dict[str, int]:
        """Trials per state (RUNNING, COMPLETE, PRUNED, FAIL, WAITING), from the storage's counters."""
        return {state.name: count for state, count in self.storage.state_counts(self.study._study_id).items()}

    def best_trial(self) -> FrozenTrial | None:
        try:
            return self.study.best_trial
        except ValueError:
            return None

    async def run(self) -> Outcome:
        """Run the study to its budget; return Succeeded or Failed with a message."""
        await self._recover()
        self._publish_counts()
        while True:
            self._wake.clear()
            if self._failed_message:  # stop the trials still running; their tasks record why
                await asyncio.gather(*(run.stop() for run in list(self._runs.values())))
            while self._can_start():
                await self._start_next()
            if not self._running:
                break
            woken = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait([*self._running.values(), woken], return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            for task in done:  # a trial task that raised (e.g. StorageUnavailable) stops the study
                if task is not woken and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
        if not self._failed_message:
            await self._finish()
        counts = self.counts()
        if self._failed_message:
            self._notify(Event("study-failed", message=self._failed_message))
            return Outcome("Failed", self._failed_message, counts)
        best = self.best_trial()
        message = f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
        if best is not None:
            message += f"; best {self._objective} {best.value:.4g} (trial {best.number})"
        self._notify(Event("study-succeeded", message=message))
        return Outcome("Succeeded", message, counts)

    # -- the loop -----------------------------------------------------------
    async def _finish(self) -> None:
        """Work after the last trial ended (the ladder's validation runs); nothing by default."""

    def _real_failures(self) -> int:
        return sum(1 for t in self.trials((TrialState.FAIL,)) if t.user_attrs.get(FAIL_REASON) != INTERRUPTED)

    def _can_start(self) -> bool:
        if self._failed_message or len(self._running) >= self.budget.parallelism:
            return False
        counts = self.counts()
        # A WAITING trial (queued again after an interruption) is already counted in the total.
        return sum(counts.values()) < self.budget.max_trials or counts["WAITING"] > 0

    async def _start_next(self) -> None:
        began = time.perf_counter()
        with self.storage.batch():  # the trial and its params are committed together, before launch
            trial = self.study.ask(self._distributions)
            trial.set_user_attr("launched_at", time.time())
        metrics.SUGGEST_SECONDS.labels(**self.labels).observe(time.perf_counter() - began)
        launch = build_launch(self.study_name, trial.number, self.spec.trial_template, trial.params)
        await self._launch(trial, launch, _describe(trial.params))

    async def _launch(self, trial: optuna.Trial, launch: TrialLaunch, description: str,
                      supervise: Callable[[TrialRun], Coroutine[Any, Any, None]] | None = None) -> None:
        """Start one run of a trial and follow it; a command that cannot start fails the trial."""
        try:
            run = await self.backend.launch(launch)
        except LaunchError as exc:
            self._record_failure(trial.number, trial._trial_id, "LaunchError", str(exc))
            self._finish_metrics("FAIL", time.time())
            return
        self._notify(Event("started", trial.number, description))
        self._follow(trial, run, supervise(run) if supervise else None)

    def _follow(self, trial: optuna.Trial, run: TrialRun, work: Coroutine[Any, Any, None] | None = None) -> None:
        """Supervise a running trial in its own task (``work`` defaults to the plain trial loop)."""
        task = asyncio.create_task(work or self._supervise(trial, run), name=f"trial-{trial.number}")
        self._running[trial.number] = task
        self._runs[trial.number] = run

        def forget(_: asyncio.Task) -> None:
            self._running.pop(trial.number, None)
            self._runs.pop(trial.number, None)

        task.add_done_callback(forget)
        self._publish_counts()

    async def _recover(self) -> None:
        lost = [frozen for frozen in self.trials((TrialState.RUNNING,)) if not await self._reattach(frozen)]
        if lost and self.backend.recovery_grace_seconds:
            await asyncio.sleep(self.backend.recovery_grace_seconds)  # a launch still in flight may land
            lost = [frozen for frozen in lost if not await self._reattach(frozen)]
        for frozen in lost:
            self._record_failure(frozen.number, frozen._trial_id, INTERRUPTED, "the runner stopped while this trial was running")
            if sum(self.counts().values()) < self.budget.max_trials:
                self.study.enqueue_trial(frozen.params, user_attrs={REQUEUED_FROM: frozen.number}, skip_if_exists=False)

    async def _reattach(self, frozen: FrozenTrial) -> bool:
        """Follow a trial left running by an earlier engine again, if the backend still has it."""
        run = await self.backend.attach(self.study_name, frozen.number)
        if run is not None:
            self._follow(optuna.Trial(self.study, frozen._trial_id), run)
        return run is not None

    async def _supervise(self, trial: optuna.Trial, run: TrialRun) -> None:
        started = trial.user_attrs.get("launched_at", time.time())
        try:
            state, value, last_metrics = await self._ingest(trial, run)
        except TrialFailed as failure:
            if self._failed_message:  # stopped by us, because the study failed
                failure = TrialFailed("StudyFailed", "stopped because the study failed")
            # Recorded before the run is stopped: a runner killed in between must not find the
            # trial RUNNING without its Job, and call a trial that ran "interrupted".
            self._record_failure(trial.number, trial._trial_id, failure.reason, str(failure))
            await run.stop()
            self._finish_metrics("FAIL", started)
            return
        with self.storage.batch():
            trial.set_user_attr("metrics", last_metrics)
            self.study.tell(trial, value, state=state)
        if state == TrialState.PRUNED:
            await run.stop()  # only now: see above
            metrics.PRUNED.labels(**self.labels).inc()
            frozen = self.storage.get_trial(trial._trial_id)  # told PRUNED: its value is the last reported one
            self._notify(Event("pruned", trial.number, f"pruned at step {frozen.last_step}", frozen.value))
        else:
            self._notify(Event("completed", trial.number, f"{self._objective}={value:.4g}", value))
            self._publish_best()
        self._finish_metrics(state.name, started)

    async def _ingest(self, trial: optuna.Trial, run: TrialRun) -> tuple[TrialState, float | None, dict[str, float]]:
        """Follow a trial's output; return (PRUNED or COMPLETE, value, last metrics), or raise TrialFailed."""
        reported = dict(self.storage.get_trial(trial._trial_id).intermediate_values)

        def on_step(step: int, value: float) -> bool:
            if step in reported:
                return False  # already stored: output re-read after a reconnect or restart
            reported[step] = value
            trial.report(value, step)
            metrics.REPORTED_VALUE.labels(**self.labels, step=metrics.step_bucket(step)).observe(value)
            return trial.should_prune()

        result = await follow_output(run, self._objective, on_step, self.labels, gpus=self.gpus)
        if result.stopped:
            return TrialState.PRUNED, None, result.metrics
        return TrialState.COMPLETE, result.value, result.metrics

    # -- bookkeeping --------------------------------------------------------
    def _record_failure(self, number: int, trial_id: int, reason: str, message: str) -> None:
        with self.storage.batch():
            self.storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
            self.storage.set_trial_user_attr(trial_id, "fail_message", message)
            self.study.tell(number, state=TrialState.FAIL)
        if reason == INTERRUPTED:
            return
        self._notify(Event("failed", number, f"{reason}: {message}"))
        failures = self._real_failures()
        if failures >= self.budget.max_failed_trials and not self._failed_message:
            self._failed_message = (
                f"{failures} trials failed, reaching spec.maxFailedTrials={self.budget.max_failed_trials}; "
                f"last failure, trial {number}: {reason}: {message}"
            )
            self._wake.set()

    def _finish_metrics(self, state: str, started: float) -> None:
        metrics.TRIALS_FINISHED.labels(**self.labels, state=state).inc()
        metrics.TRIAL_DURATION.labels(**self.labels, state=state).observe(max(0.0, time.time() - started))
        self._publish_counts()

    def _publish_counts(self) -> None:
        for state, count in self.counts().items():
            metrics.TRIALS.labels(**self.labels, state=state).set(count)

    def _publish_best(self) -> None:
        best = self.best_trial()
        if best is not None:
            metrics.BEST_VALUE.labels(**self.labels, metric=self._objective).set(best.value)


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items())


@dataclass(frozen=True)
class RunResult:
    value: float | None  # the final objective value; None when on_step stopped the run
    metrics: dict[str, float]
    stopped: bool = False


async def follow_output(run: TrialRun, objective: str, on_step: Callable[[int, float], bool], labels: dict[str, str],
                        *, gpus: float) -> RunResult:
    """Read a run's protocol lines to its end; ``on_step`` sees each value and may end the reading
    early (``RunResult.stopped``): the caller then records why and stops the run.

    The run's GPU-seconds (``gpus`` x time since following began) are counted at each value and at
    the end, so a run of days shows up while it runs. Raises TrialFailed for NaN, a failed exit, or
    a run that reported nothing.
    """
    gpu_seconds = metrics.GPU_SECONDS.labels(**labels)
    counted = time.monotonic()

    def count_gpu_time() -> None:
        nonlocal counted
        now = time.monotonic()
        gpu_seconds.inc(gpus * (now - counted))
        counted = now

    def on_value(step: int, value: float) -> bool:
        count_gpu_time()
        return on_step(step, value)

    try:
        return await _read_output(run, objective, on_value, labels)
    finally:
        count_gpu_time()


async def _read_output(run: TrialRun, objective: str, on_step: Callable[[int, float], bool], labels: dict[str, str]) -> RunResult:
    final_value: float | None = None
    last_value: float | None = None
    last_metrics: dict[str, float] = {}
    async for raw in run.lines():
        line = parse_line(raw)
        if line is None:
            continue
        value = line.metrics.get(objective)
        if value is None:
            continue
        if not math.isfinite(value):
            where = "final line" if line.final else f"step {line.step}"
            raise TrialFailed("NaN", f"objective {objective} is {value} at {where}")
        last_metrics = line.metrics
        if line.final:
            final_value = value
            continue
        last_value = value
        if line.time is not None:
            metrics.METRIC_LAG.labels(**labels).observe(max(0.0, time.time() - line.time))
        if on_step(line.step, value):
            return RunResult(None, last_metrics, stopped=True)  # the caller stops the run once it has recorded why
    exit = await run.wait()
    if not exit.succeeded:
        raise TrialFailed(exit.reason or "Error", exit.message or f"exit code {exit.exit_code}")
    if final_value is None and last_value is None:
        raise TrialFailed("NoMetrics", f"the trainer exited 0 but printed no protocol line with {objective!r}")
    return RunResult(final_value if final_value is not None else last_value, last_metrics)

