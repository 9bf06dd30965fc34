"""The study loop: start what the scheduler asks for, follow it, record how it ended.

The executor is free of Kubernetes and of policy. It keeps ``parallelism`` runs going
through a backend, turns protocol lines into values for the scheduler, and records every
ending in Optuna storage (the system of record) *before* it stops a run, so a new executor
on the same storage continues the study. What runs next, and what a value means, is the
scheduler's business (``speechtune.schedulers``): plain search, the fidelity ladder, stages.

Recovery policy, for trials left RUNNING by an executor that died: if the backend can
re-attach (a Kubernetes Job still exists), the run is followed again and its output re-read
from the start; values already stored are skipped. Otherwise, after the backend's
``recovery_grace_seconds`` (a Job create sent just before the death can land late) and one
more look, the scheduler decides: plain search records the trial FAIL with reason
``interrupted`` (not counted toward ``maxFailedTrials``) and queues its configuration again
inside ``maxTrials``; the ladder runs the level again.

Storage: the engine runs on an event loop, so its writes return at once and the storage's
writer thread commits them in order (``WriteThroughStorage``); the executor awaits
``storage.flushed()`` before every side effect that depends on them: before a launch, before a
stop, after each value (so a run's output is read no faster than it is stored) and before the
study's end. A database outage thus holds up only this study, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from speechtune import metrics, record, spec
from speechtune.backend import Backend, TrialRun
from speechtune.local import LaunchError
from speechtune.protocol import parse_line
from speechtune.storage import StorageUnavailable, WriteThroughStorage

if TYPE_CHECKING:
    from speechtune.schedulers import Run, Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Something a person would want to know: started, pruned, completed, failed, promoted, stage-started, ..."""

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


class Executor:
    """Runs one study to its end with the scheduler ``speechtune.schedulers.build`` picks for its spec."""

    def __init__(
        self,
        study: spec.Study,
        storage: WriteThroughStorage,
        backend: Backend,
        *,
        study_name: str | None = None,
        namespace: str = "local",
        notify: Callable[[Event], None] | None = None,
        checkpoint_root: PurePath | None = None,
        checkpoint_files_here: bool = True,
        warm_start_url: str | None = None,
    ):
        from speechtune import schedulers

        self.spec = study
        self.storage = storage
        self.backend = backend
        self.budget = Budget(study.max_trials, study.parallelism, study.max_failed_trials)
        self.study_name = study_name or study.name
        self.labels = {"namespace": namespace, "study": self.study_name}
        self.checkpoint_root = checkpoint_root  # where runs keep checkpoints (ladder resume, spec.checkpoints)
        self.checkpoint_files_here = checkpoint_files_here  # False on a cluster: the files are on a PVC, not here
        self.warm_start_url = warm_start_url or (study.warm_start.storage.url if study.warm_start else None)
        self._notify = notify or (lambda event: None)
        self.objective = study.objective.metric
        # per run, for speechtune_gpu_seconds: every GPU of every pod of a run (trialTemplate.replicas pods)
        self.gpus = metrics.requested_gpus(study.trial_template.resources) * study.trial_template.replicas
        metrics.PRUNED.labels(**self.labels)  # at 0 at once: rate() ignores the value a series first appears with
        self.study = optuna.create_study(
            study_name=self.study_name, storage=storage, load_if_exists=True,
            direction=study.objective.direction,
        )
        if self.study.user_attrs.get(record.OBJECTIVE) != self.objective:
            self.study.set_user_attr(record.OBJECTIVE, self.objective)  # so `speechtune status` can label the value
        self._running: dict[int, asyncio.Task] = {}  # by run key: one task per run going on
        self._runs: dict[int, Run] = {}
        self._trial_runs: dict[int, int] = {}  # trial number -> runs of it going on
        self._wake = asyncio.Event()
        self._failed_message = ""
        self._stop_error: BaseException | None = None  # what a run task raised: it stops the study
        self.scheduler: Scheduler = schedulers.build(self)

    # -- public -------------------------------------------------------------
    def update_budget(self, max_trials: int | None = None, parallelism: int | None = None, max_failed_trials: int | None = None) -> None:
        """Change the budget of a running study; the loop applies it at once."""
        self.budget = replace(
            self.budget,
            **{k: v for k, v in dict(max_trials=max_trials, parallelism=parallelism, max_failed_trials=max_failed_trials).items() if v is not None},
        )
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

    def runs_of(self, scheduler: Scheduler) -> int:
        """Runs of this scheduler going on now."""
        return sum(1 for run in self._runs.values() if run.scheduler is scheduler)

    def is_running(self, number: int) -> bool:
        """Whether a run of this trial is going on now (in this executor)."""
        return self._trial_runs.get(number, 0) > 0

    @property
    def failed(self) -> bool:
        return bool(self._failed_message)

    async def run(self) -> Outcome:
        """Run the study to its end; return Succeeded or Failed with a message. Raises StorageUnavailable
        when the storage stays unreachable for its retry window. Returns or raises only once the runs'
        tasks have ended and the storage has committed what it can."""
        try:
            return await self._run()
        finally:
            running = list(self._running.values())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)  # retrieved: no "never retrieved" noise
            try:
                await self.storage.flushed()  # no write of this engine lands after it is gone
            except StorageUnavailable:
                pass  # already raised, or raised to whoever runs the study next

    async def _run(self) -> Outcome:
        self.scheduler.prepare()
        await self._recover()
        self._publish_counts()
        while True:
            self._wake.clear()
            if self._stop_error is not None:  # run() stops the other runs' tasks
                raise self._stop_error
            if self._failed_message:  # stop the runs still going; their tasks record why
                await self.storage.flushed()  # the study's failure is recorded before anything is stopped
                await asyncio.gather(*(run.handle.stop() for run in list(self._runs.values()) if run.handle is not None))
            while not self._failed_message and len(self._running) < self.budget.parallelism:
                run = self.scheduler.next_run()
                if run is None:
                    break
                await self._launch(run)
            if not self._running:
                break  # nothing going on and nothing to start: the study is over
            woken = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait([*self._running.values(), woken], return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
        await self.storage.flushed()  # the study has ended only once its storage says so
        counts = self.counts()
        if self._failed_message:
            self._notify(Event("study-failed", message=self._failed_message))
            return Outcome("Failed", self._failed_message, counts)
        best = self.best_trial()
        message = f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
        if best is not None:
            message += f"; best {self.objective} {best.value:.4g} (trial {best.number})"
        self._notify(Event("study-succeeded", message=message))
        return Outcome("Succeeded", message, counts)

    # -- what schedulers call to record -------------------------------------------
    def notify(self, event: Event) -> None:
        self._notify(event)

    def fail_study(self, message: str) -> None:
        """End the study Failed: a scheduler cannot go on (e.g. a stage's handoff has nothing to hand on)."""
        if not self._failed_message:
            self._failed_message = message
            self._wake.set()

    def complete(self, trial: optuna.Trial | int, value: float, message: str, started: float,
                 attrs: dict[str, Any] | None = None) -> None:
        """Tell Optuna a trial is COMPLETE with ``value``, with ``attrs`` in the same commit."""
        number = trial if isinstance(trial, int) else trial.number
        with self.storage.batch():
            self._set_attrs(trial, attrs)
            self.study.tell(trial, value)
        self._notify(Event("completed", number, message, value))
        self._publish_best()
        self.finish_metrics("COMPLETE", started)

    def prune(self, trial: optuna.Trial | int, message: str, value: float | None, started: float,
              attrs: dict[str, Any] | None = None) -> None:
        """Tell Optuna a trial is PRUNED (its value is its last reported one), with ``attrs`` in the same commit."""
        number = trial if isinstance(trial, int) else trial.number
        with self.storage.batch():
            self._set_attrs(trial, attrs)
            self.study.tell(trial, state=TrialState.PRUNED)
        metrics.PRUNED.labels(**self.labels).inc()
        self._notify(Event("pruned", number, message, value))
        self.finish_metrics("PRUNED", started)

    def _set_attrs(self, trial: optuna.Trial | int, attrs: dict[str, Any] | None) -> None:
        if attrs:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, trial) if isinstance(trial, int) else trial._trial_id
            for key, value in attrs.items():
                self.storage.set_trial_user_attr(trial_id, key, value)

    def fail(self, number: int, trial_id: int, reason: str, message: str) -> None:
        """Record a trial FAIL with why; a real failure counts toward maxFailedTrials."""
        with self.storage.batch():
            self.storage.set_trial_user_attr(trial_id, record.FAIL_REASON, reason)
            self.storage.set_trial_user_attr(trial_id, record.FAIL_MESSAGE, message)
            self.study.tell(number, state=TrialState.FAIL)
        if reason == record.INTERRUPTED:
            return
        self._notify(Event("failed", number, f"{reason}: {message}"))
        failures = self.real_failures()
        if failures >= self.budget.max_failed_trials and not self._failed_message:
            self._failed_message = (
                f"{failures} trials failed, reaching spec.maxFailedTrials={self.budget.max_failed_trials}; "
                f"last failure, trial {number}: {reason}: {message}"
            )
            self._wake.set()

    def real_failures(self) -> int:
        return sum(1 for t in self.trials((TrialState.FAIL,)) if not record.is_interrupted(t))

    def finish_metrics(self, state: str, started: float) -> None:
        stage = self.scheduler.stage_now() or ""  # stages run one at a time: a trial ends in the current one
        metrics.TRIALS_FINISHED.labels(**self.labels, stage=stage, state=state).inc()
        metrics.TRIAL_DURATION.labels(**self.labels, stage=stage, state=state).observe(max(0.0, time.time() - started))
        self._publish_counts()

    # -- running ------------------------------------------------------------------
    async def _launch(self, run: Run) -> None:
        """Start one run and follow it; a command that cannot start fails the run."""
        await self.storage.flushed()  # the trial and its parameters are committed before it runs
        try:
            handle = await self.backend.launch(run.launch)
        except LaunchError as exc:
            run.scheduler.on_failure(run, TrialFailed("LaunchError", str(exc)))
            await self.storage.flushed()
            return
        if run.announce:
            self._notify(Event("started", run.trial.number, run.description))
        self._follow(run, handle)

    def _follow(self, run: Run, handle: TrialRun) -> None:
        """Supervise a run in its own task."""
        run.handle = handle
        key = id(run)
        task = asyncio.create_task(self._supervise(run), name=run.launch.run_name)
        self._running[key] = task
        self._runs[key] = run
        number = run.trial.number
        self._trial_runs[number] = self._trial_runs.get(number, 0) + 1

        def forget(done: asyncio.Task) -> None:
            # A run task that raised (StorageUnavailable, or the backend being away) stops the study, even when it
            # ends while the loop awaits something else (a launch): the loop raises it at its next turn.
            if not done.cancelled() and done.exception() is not None and self._stop_error is None:
                self._stop_error = done.exception()
                self._wake.set()
            self._running.pop(key, None)
            self._runs.pop(key, None)
            self._trial_runs[number] -= 1

        task.add_done_callback(forget)
        self._publish_counts()

    async def _supervise(self, run: Run) -> None:
        """Follow a run to its end. Its ending is recorded first, then the run is stopped: a
        runner killed in between must not find a trial RUNNING without its run, and call a
        trial that ran "interrupted". Whatever goes wrong with one run fails only its trial:
        the storage being down is the one error that stops the study."""
        assert run.handle is not None
        try:
            try:
                result = await follow_output(run.handle, self.objective, lambda step, value: run.scheduler.on_value(run, step, value),
                                             self.labels, gpus=self.gpus, stored=self.storage.flushed)
            except TrialFailed as failure:
                if self._failed_message:  # stopped by us, because the study failed
                    failure = TrialFailed("StudyFailed", "stopped because the study failed")
                run.scheduler.on_failure(run, failure)
                await self.storage.flushed()
                await run.handle.stop()
                return
            run.scheduler.on_result(run, result)
            await self.storage.flushed()
            if result.stopped:
                await run.handle.stop()
        except (StorageUnavailable, asyncio.CancelledError, *getattr(self.backend, "unavailable", ())):
            raise  # nothing can be recorded, or the backend's own infrastructure is away: not this trial's doing
        except Exception as error:  # a bug, or output the engine could not handle: this trial's problem only
            log.exception("%s: run %s failed inside the runner", self.study_name, run.launch.run_name)
            if self.storage.get_trial(run.trial._trial_id).state == TrialState.RUNNING:
                run.scheduler.on_failure(run, TrialFailed("RunnerError", f"{type(error).__name__}: {error}"))
            await self.storage.flushed()
            await run.handle.stop()

    async def _recover(self) -> None:
        """Follow again the runs an earlier executor left going; the scheduler decides about the lost ones."""
        candidates = [run for frozen in self.trials((TrialState.RUNNING,)) if (run := self.scheduler.resume(frozen)) is not None]
        lost = [run for run in candidates if not await self._reattach(run)]
        if lost and self.backend.recovery_grace_seconds:
            await asyncio.sleep(self.backend.recovery_grace_seconds)  # a launch still in flight may land
            lost = [run for run in lost if not await self._reattach(run)]
        for run in lost:
            run.scheduler.lost(self.storage.get_trial(run.trial._trial_id))
        await self.storage.flushed()

    async def _reattach(self, run: Run) -> bool:
        handle = await self.backend.attach(self.study_name, run.trial.number, run.launch.attempt)
        if handle is not None:
            self._follow(run, handle)
        return handle is not None

    def _publish_counts(self) -> None:
        for state, count in self.counts().items():
            metrics.TRIALS.labels(**self.labels, state=state).set(count)

    def _publish_best(self) -> None:
        best = self.best_trial()
        if best is not None:
            metrics.BEST_VALUE.labels(**self.labels, metric=self.objective).set(best.value)


@dataclass(frozen=True)
class RunResult:
    value: float | None  # the final objective value; None when on_step stopped the run
    metrics: dict[str, float]  # each metric's last reported value (a ladder level may rank by one)
    stopped: bool = False
    seconds: float = 0.0  # on the loop's clock, from the first read of the run's output to its end: what the run cost
    startup_seconds: float | None = None  # before its first epoch: the first report's time less the next one's gap
    params: dict[str, Any] = field(default_factory=dict)  # what the final line reported for a following stage (``params``)


async def follow_output(run: TrialRun, objective: str, on_step: Callable[[int, float], bool], labels: dict[str, str],
                        *, gpus: float, stored: Callable[[], Awaitable[None]] | None = None) -> RunResult:
    """Read a run's protocol lines to its end; ``on_step`` sees each value and may end the reading
    early (``RunResult.stopped``): the caller then records why and stops the run. ``stored``, awaited
    after each value, holds the reading until what ``on_step`` recorded is committed.

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

    loop = asyncio.get_running_loop()
    began = loop.time()  # the loop's clock, so that a replay on a simulated clock measures simulated time
    reports: list[float] = []  # when the first two values came

    def on_value(step: int, value: float) -> bool:
        count_gpu_time()
        if len(reports) < 2:
            reports.append(loop.time() - began)
        return on_step(step, value)

    try:
        result = await _read_output(run, objective, on_value, labels, stored)
        startup = max(0.0, 2 * reports[0] - reports[1]) if len(reports) == 2 else None
        return replace(result, seconds=loop.time() - began, startup_seconds=startup)
    finally:
        count_gpu_time()


async def _read_output(run: TrialRun, objective: str, on_step: Callable[[int, float], bool], labels: dict[str, str],
                       stored: Callable[[], Awaitable[None]] | None = None) -> RunResult:
    final_value: float | None = None
    last_value: float | None = None
    last_metrics: dict[str, float] = {}
    reported: dict[str, Any] = {}
    async for raw in run.lines():
        line = parse_line(raw)
        if line is None:
            continue
        if line.final and "params" in line.extra:
            reported = reported_params(line.extra["params"])
        value = line.metrics.get(objective)
        if value is None:
            continue
        if not math.isfinite(value):
            where = "final line" if line.final else f"step {line.step}"
            raise TrialFailed("NaN", f"objective {objective} is {value} at {where}")
        last_metrics = {**last_metrics, **line.metrics}  # each metric's last value: a final line may carry only some
        if line.final:
            final_value = value
            continue
        last_value = value
        if line.time is not None:
            metrics.METRIC_LAG.labels(**labels).observe(max(0.0, time.time() - line.time))
        stop = on_step(line.step, value)
        if stored is not None:
            await stored()
        if stop:
            return RunResult(None, last_metrics, stopped=True)  # the caller stops the run once it has recorded why
    exit = await run.wait()
    if not exit.succeeded:
        raise TrialFailed(exit.reason or "Error", exit.message or f"exit code {exit.exit_code}")
    if final_value is None and last_value is None:
        raise TrialFailed("NoMetrics", f"the trainer exited 0 but printed no protocol line with {objective!r}")
    return RunResult(final_value if final_value is not None else last_value, last_metrics, params=reported)


def reported_params(value: Any) -> dict[str, Any]:
    """A final line's ``params`` (parameters for a following stage, e.g. a derived architecture), checked:
    a trainer that gets it wrong fails its trial, naming what is wrong, rather than handing on nonsense."""
    if not isinstance(value, dict) or not value:
        raise TrialFailed("BadParams", f"the final line's params must be a non-empty object of parameter name -> value, got {value!r}")
    bad = [name for name, item in value.items() if not spec.PARAM_NAME.match(name) or not isinstance(item, (str, int, float, bool))]
    if bad:
        raise TrialFailed("BadParams", f"the final line's params {bad!r}: each must be a parameter name (letters, digits, '_') "
                                       "with a string, number or boolean value")
    return dict(value)


def describe(params: dict) -> str:
    return " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items())
