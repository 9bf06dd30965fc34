"""Stages: a study as an ordered list of schedulers in one Optuna study (seed section 13).

baseline -> search (e.g. random, 20 trials) -> refine (e.g. TPE, 30 trials, around the top-k
so far) -> validate (the best configuration x N seeds, mean ± std). Each trial carries its
stage (user attr ``stage``); each stage's state and result go into the study's user attr
``stages`` when it starts and ends, so a restarted executor resumes the stage it was in and
posts each transition once. A spec without ``stages`` is one unnamed stage (plain search or
the ladder), followed by an unnamed validate stage when it has ``validation.seeds``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from speechtune import metrics, record, search, spec
from speechtune.executor import Event
from speechtune.schedulers import Run, Scheduler, handoff, region as regions, warmstart
from speechtune.schedulers.checkpoints import Checkpoints
from speechtune.schedulers.ladder import Ladder
from speechtune.schedulers.plain import PlainSearch

if TYPE_CHECKING:
    from speechtune.executor import Executor, RunResult, TrialFailed


class Baseline(PlainSearch):
    """The template's defaults, or given parameters, run ``seeds`` times (seeds 0..N-1 when N > 1)."""

    def __init__(self, executor: Executor, *, stage: str, params: dict[str, Any], seeds: int,
                 distributions: dict[str, BaseDistribution], checkpoints: Checkpoints):
        given = {name: value for name, value in params.items() if name in distributions}
        super().__init__(executor, stage=stage, sampler=_fixed(given, optuna.samplers.RandomSampler()),
                         pruner=optuna.pruners.NopPruner(), distributions={name: distributions[name] for name in given},
                         max_trials=lambda: seeds, checkpoints=checkpoints)
        self.seeds = seeds
        self.overrides = {name: value for name, value in params.items() if name not in distributions}

    def ask(self) -> optuna.Trial:
        index = len(self.trials())
        trial = super().ask()
        trial.set_user_attr(record.SEED, trial.user_attrs.get(record.SEED, index))
        return trial

    def trial_overrides(self, trial: optuna.Trial) -> dict[str, Any]:
        overrides = super().trial_overrides(trial)
        if self.seeds > 1:
            overrides["seed"] = trial.user_attrs.get(record.SEED, 0)
        return overrides

    def describe(self, trial: optuna.Trial) -> str:
        return f"baseline {super().describe(trial)}".strip() + (f" seed {trial.user_attrs.get(record.SEED, 0)}" if self.seeds > 1 else "")


class Validate(Scheduler):
    """The best configuration so far retrained with seeds 1..N; mean and std of the objective."""

    def __init__(self, executor: Executor, *, stage: str | None, seeds: int,
                 overrides_of: Callable[[FrozenTrial], tuple[dict[str, Any], int, spec.TrialTemplate]]):
        super().__init__(executor, stage)
        self.seeds = seeds
        self.overrides_of = overrides_of  # a trial's deciding run's overrides, level (a ladder's top) and trainer
        self._tried: set[int] = set()
        self._announced = False

    def total_trials(self) -> int:
        return 0

    def result(self) -> dict[str, Any] | None:
        validation = self.study.user_attrs.get(record.VALIDATION)
        return validation if validation and validation.get("mean") is not None else None

    def next_run(self) -> Run | None:
        best = self.executor.best_trial()
        if best is None:
            return None
        done = self.study.user_attrs.get(record.VALIDATION, {}).get("values", {})
        for seed in range(1, self.seeds + 1):
            if str(seed) in done or seed in self._tried:
                continue
            self._tried.add(seed)
            overrides, level, self.template = self.overrides_of(best)
            return self.make_run(optuna.Trial(self.study, best._trial_id), values=best.params, overrides={**overrides, "seed": seed},
                                 attempt=f"seed{seed}", level=level, description=f"validation seed {seed}", announce=False, seed=seed)
        result = self.result()
        if self._tried and not self.running() and result and not self._announced:
            self._announced = True
            self.executor.notify(Event("validated", result["trial"], f"{self.executor.objective} {result['mean']:.4g} ± "
                                       f"{result['std']:.4g} over {len(result['values'])} seeds"))
        return None

    def on_result(self, run: Run, result: RunResult) -> None:
        stored = dict(self.study.user_attrs.get(record.VALIDATION, {"trial": run.trial.number, "values": {}}))
        values = {**stored["values"], str(run.seed): result.value}  # stored at once: after a restart only the missing seeds run
        mean, std = _mean_std(list(values.values()))
        self.study.set_user_attr(record.VALIDATION, {**stored, "values": values, "mean": mean, "std": std})

    def on_failure(self, run: Run, failure: TrialFailed) -> None:
        self.executor.notify(Event("failed", run.trial.number, f"validation seed {run.seed}: {failure}"))


@dataclass
class _Step:
    stage: spec.Stage | None  # None: the implicit stage of a spec without spec.stages
    build: Callable[[], Scheduler]
    scheduler: Scheduler | None = None

    @property
    def name(self) -> str | None:
        return self.stage.name if self.stage else None


class Stages(Scheduler):
    """Runs its steps in order; a step is over when it has nothing to start and nothing running."""

    def __init__(self, executor: Executor, steps: list[_Step], on_begin: Callable[[_Step], None], on_end: Callable[[], None]):
        super().__init__(executor)
        self.steps = steps
        self.index = 0
        self.on_begin = on_begin
        self.on_end = on_end  # once, when the last step is over
        self._ended = False

    @property
    def current(self) -> Scheduler:
        return self._scheduler(self.index)

    def _scheduler(self, index: int) -> Scheduler:
        step = self.steps[index]
        if step.scheduler is None:
            step.scheduler = step.build()
        return step.scheduler

    def records(self) -> dict[str, dict[str, Any]]:
        return record.stages(self.study.user_attrs)

    def prepare(self) -> None:
        done = {name for name, found in self.records().items() if found.get("state") == "Succeeded"}
        while self.index < len(self.steps) - 1 and self.steps[self.index].name in done:
            self.index += 1
        self._begin()

    def stage_now(self) -> str | None:
        return self.steps[self.index].name

    def _begin(self) -> None:
        step = self.steps[self.index]
        self.on_begin(step)
        self._scheduler(self.index).prepare()
        self._publish_active(self.index)
        if step.name is not None:  # at 0 from the start: increase() ignores the value a series first appears with
            for state in ("COMPLETE", "PRUNED", "FAIL"):
                metrics.TRIALS_FINISHED.labels(**self.executor.labels, stage=step.name, state=state)

    def _publish_active(self, active: int | None) -> None:
        for index, other in enumerate(self.steps):
            if other.name is not None:
                metrics.STAGE_ACTIVE.labels(**self.executor.labels, stage=other.name).set(1 if index == active else 0)

    def total_trials(self) -> int:
        return sum(spec.stage_trials(step.stage) if step.stage else self._scheduler(index).total_trials()
                   for index, step in enumerate(self.steps))

    def next_run(self) -> Run | None:
        while True:
            if self.executor.failed:  # e.g. a stage's handoff found nothing to hand on: start nothing more
                return None
            run = self.current.next_run()
            if run is not None or self.current.running():
                return run
            self._finish(self.steps[self.index])  # nothing to start and nothing running: the step is over
            if self.index == len(self.steps) - 1:
                self._publish_active(None)
                if not self._ended:
                    self._ended = True
                    self.on_end()
                return None
            self.index += 1
            self._begin()

    def resume(self, frozen: FrozenTrial) -> Run | None:
        return self._route(frozen).resume(frozen)

    def _route(self, trial: FrozenTrial) -> Scheduler:
        name = record.stage(trial)
        for index, step in enumerate(self.steps):
            if step.name == name:
                return self._scheduler(index)
        return self.current

    def _finish(self, step: _Step) -> None:
        """Record a named stage's result and post its end, once."""
        if step.stage is None:
            return
        records = self.records()
        found = dict(records.get(step.name, {}))
        if found.get("state") == "Succeeded":
            return
        found.update(state="Succeeded", finishedAt=time.time(), **stage_result(self.executor, step.stage, self._scheduler(self.index)))
        best = found.get("best", {}).get("value", found.get("mean"))
        if best is not None:
            metrics.STAGE_BEST_VALUE.labels(**self.executor.labels, stage=step.name, metric=self.executor.objective).set(best)
        self.study.set_user_attr(record.STAGES, {**records, step.name: found})
        self.executor.notify(Event("stage-finished", None, announcement("stage-finished", step.stage, found, self.executor.objective)))


def stage_result(executor: Executor, stage: spec.Stage, scheduler: Scheduler) -> dict[str, Any]:
    """A finished stage's trials, best, cost (trial-seconds) and, for baseline and validate, mean ± std."""
    if stage.kind == "validate":
        validation = scheduler.result() if isinstance(scheduler, Validate) else None
        return {"trials": 0, **({"mean": validation["mean"], "std": validation["std"], "seeds": len(validation["values"]),
                                 "trial": validation["trial"]} if validation else {})}
    trials = scheduler.trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    sign = -1 if executor.spec.objective.direction == "maximize" else 1
    best = min(complete, key=lambda t: (sign * t.value, t.number), default=None)
    cost = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete and t.datetime_start)
    result: dict[str, Any] = {"trials": len(trials), "complete": len(complete), "costSeconds": round(cost, 3)}
    if best is not None:
        result["best"] = {"number": best.number, "value": best.value}
    if stage.kind == "baseline" and complete:
        result["mean"], result["std"] = _mean_std([t.value for t in complete])
    return result


def announcement(kind: str, stage: spec.Stage, found: dict[str, Any], objective: str) -> str:
    """The message of a stage-started or stage-finished event (``found``: the stage's record)."""
    if kind == "stage-started":
        return f"stage {stage.name} ({stage.kind}) started"
    return f"stage {stage.name} ({stage.kind}) finished: {describe_result(found, objective)}"


def describe_result(found: dict[str, Any], objective: str) -> str:
    parts = []
    if "mean" in found:
        parts.append(f"{objective} {found['mean']:.4g} ± {found['std']:.4g}")
    if "best" in found:
        parts.append(f"best {objective} {found['best']['value']:.4g} (trial {found['best']['number']})")
    if found.get("trials"):
        parts.append(f"{found['trials']} trials, {found.get('costSeconds', 0):.0f} trial-seconds")
    return ", ".join(parts) or "no result"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_stages(executor: Executor) -> Scheduler:
    """The scheduler for a spec: its stages (or the implicit one), with warm start applied."""
    study = executor.spec
    distributions = search.distributions(study.search_space)
    checkpoints = Checkpoints(executor, study.checkpoints.keep_best, executor.checkpoint_files_here,
                              handed_on=[stage.handoff.stages for stage in study.stages if stage.handoff and stage.handoff.checkpoint_flag])
    source = None
    if study.warm_start is not None:
        stored = executor.study.user_attrs.get(record.WARM_START)
        source = warmstart.load(study.warm_start, study.objective, executor.storage, executor.warm_start_url,
                                check_files=executor.checkpoint_files_here, stored=stored)
        if stored is None:
            executor.study.set_user_attr(record.WARM_START, source.as_record())
    fixed_base = dict(source.fixed) if source else {}
    extra = {"init_from": source.init_from} if source and source.init_from else {}
    fidelity_of: dict[str | None, spec.Fidelity | None] = {None: study.fidelity}
    by_name = {stage.name: stage for stage in study.stages}

    def transferred(stage: spec.Stage | None) -> dict[str, Any]:
        """What warm start passes to every run of a stage on the study's trainer (not to a stage's own trainer)."""
        return {} if stage is not None and stage.template is not None else extra

    def searcher(stage: spec.Stage | None, index: int) -> Scheduler:
        name = stage.name if stage else None
        own = stage is not None and stage.template is not None  # its own trainer and search space
        space = stage.space(study.search_space) if stage else study.search_space
        here = search.distributions(space) if own else distributions
        sampler_spec = (stage.sampler if stage else None) or (spec.Sampler("tpe", study.sampler.seed) if stage and stage.kind == "refine" else study.sampler)
        pruner_spec = (stage.pruner if stage else None) or study.pruner
        fidelity = stage.fidelity if stage else study.fidelity
        fixed = {**({} if own else fixed_base), **(stage.fixed if stage else {})}
        area = source.region(distributions, study.warm_start) if source and not own else {}
        if stage is not None and stage.search_space and not own:
            area.update(search.distributions(stage.search_space))
        if stage is not None and stage.kind == "refine":
            earlier = {s.name for s in study.stages[:index] if s.template is None}
            area.update(regions.narrow(distributions, [t.params for t in _top(executor, earlier, stage.top_k)], stage.margin))
        sampler = search.build_sampler(sampler_spec, space)
        if area:
            sampler = regions.RegionSampler(sampler, area)
        held = {key: value for key, value in fixed.items() if key in here}
        _check_fixed(held, here, f"spec.stages[{index}].fixed" if stage else "spec.warmStart.fixed")
        if held:
            sampler = _fixed(held, sampler)
        if fidelity is not None:
            scheduler: Scheduler = Ladder(executor, stage=name, fidelity=fidelity, sampler=sampler, distributions=distributions,
                                          checkpoints=checkpoints)
        else:
            budget = (lambda: stage.max_trials) if stage else (lambda: executor.budget.max_trials)
            if sampler_spec.type == "grid":  # the grid sampler would revisit points past its size
                size = search.grid_size(space)
                limit = budget
                budget = lambda: min(limit(), size)  # noqa: E731
            scheduler = PlainSearch(executor, stage=name, sampler=sampler, pruner=search.build_pruner(pruner_spec),
                                    distributions=here, max_trials=budget, checkpoints=checkpoints)
            scheduler.space = space
        scheduler.template = study.template_of(stage)
        scheduler.overrides = {**{k: v for k, v in fixed.items() if k not in here}, **transferred(stage)}
        if stage is not None and area:
            _remember(executor, stage.name, region=regions.describe(area))
        return scheduler

    def validator(stage: spec.Stage | None, seeds: int) -> Scheduler:
        def overrides_of(best: FrozenTrial) -> tuple[dict[str, Any], int, spec.TrialTemplate]:
            name = record.stage(best)
            decided = by_name.get(name) if name else None
            base = {**transferred(decided), **handoff.overrides(record.stages(executor.study.user_attrs).get(name, {}).get("handoff", {}))}
            fidelity = fidelity_of.get(name)
            if fidelity is None:
                return base, 0, study.template_of(decided)
            top = len(fidelity.levels) - 1
            return {**base, **fidelity.levels[top].overrides}, top, study.template_of(decided)

        return Validate(executor, stage=stage.name if stage else None, seeds=seeds, overrides_of=overrides_of)

    steps: list[_Step] = []
    if not study.stages:
        steps.append(_Step(None, lambda: searcher(None, 0)))
        if study.validation_seeds:
            steps.append(_Step(None, lambda: validator(None, study.validation_seeds)))
    for index, stage in enumerate(study.stages):
        fidelity_of[stage.name] = stage.fidelity
        if stage.kind == "baseline":
            build = (lambda s: lambda: _baseline(executor, s, distributions, checkpoints, transferred(s)))(stage)
        elif stage.kind == "validate":
            build = (lambda s: lambda: validator(s, s.seeds))(stage)
        else:
            build = (lambda s, i: lambda: searcher(s, i))(stage, index)
        steps.append(_Step(stage, build))
    first_search = next((step for step in steps if step.stage is None or step.stage.kind in ("search", "refine")), None)

    def on_begin(step: _Step) -> None:
        """A stage's start: recorded and posted once; its handoff taken (once, then as recorded); warm
        start's topK queued into the first search."""
        found = record.stages(executor.study.user_attrs).get(step.name, {}) if step.stage else {}
        fresh = "state" not in found if step.stage else not executor.trials()
        if fresh and step.stage is not None:
            _remember(executor, step.name, state="Running", kind=step.stage.kind, startedAt=time.time())
            executor.notify(Event("stage-started", None, announcement("stage-started", step.stage, {}, executor.objective)))
        if step.stage is not None and step.stage.handoff is not None:
            taken = found.get("handoff")
            if taken is None:
                try:
                    taken = handoff.take(executor, step.stage, study.stages.index(step.stage), _top(executor, step.stage.handoff.stages, 1))
                except handoff.HandoffError as exc:
                    executor.fail_study(str(exc))
                    return
                _remember(executor, step.name, handoff=taken)
                executor.notify(Event("handoff", None, handoff.describe(step.name, taken)))
            step.scheduler.overrides.update(handoff.overrides(taken))
        if not fresh:
            return
        if source is not None and step is first_search:
            if study.warm_start.init_from:
                warmstart.pin(study.warm_start, executor.storage, executor.warm_start_url, executor.study_name, source.best_number)
            if study.warm_start.top_k:
                count = warmstart.enqueue_top(executor.study, source, study.warm_start.top_k, distributions,
                                              {record.STAGE: step.name} if step.name else {})
                executor.notify(Event("warm-started", None, f"queued the {count} best configurations of study {source.study}"))

    def on_end() -> None:
        """The user's answer to "did the transfer pay off here?", from this study's own results."""
        found = warmstart.report(executor.study, source, study.objective.direction == "maximize") if source else None
        if found:
            executor.notify(Event("warm-start-report", None, found))

    if len(steps) == 1 and source is None:
        return steps[0].build()
    for step in steps:  # built now, so their metric series exist from the start; a refine region needs the earlier results
        if step.stage is None or step.stage.kind != "refine":
            step.scheduler = step.build()
    return Stages(executor, steps, on_begin, on_end)


def _baseline(executor: Executor, stage: spec.Stage, distributions: dict[str, BaseDistribution], checkpoints: Checkpoints,
              extra: dict[str, Any]) -> Scheduler:
    if stage.template is not None:  # its own trainer: its params are of its own search space
        distributions = search.distributions(stage.search_space)
    _check_fixed({k: v for k, v in stage.params.items() if k in distributions}, distributions, f"spec.stages[{stage.name}].params")
    scheduler = Baseline(executor, stage=stage.name, params=stage.params, seeds=stage.seeds, distributions=distributions,
                         checkpoints=checkpoints)
    scheduler.template = executor.spec.template_of(stage)
    scheduler.overrides.update(extra)
    return scheduler


def _fixed(values: dict[str, Any], base: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """Optuna's sampler that holds some parameters (marked experimental since v2.4, stable in use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.PartialFixedSampler(values, base)


def _top(executor: Executor, stages: set[str] | tuple[str, ...], k: int) -> list[FrozenTrial]:
    sign = -1 if executor.spec.objective.direction == "maximize" else 1
    complete = [t for t in executor.trials((TrialState.COMPLETE,)) if record.stage(t) in stages and math.isfinite(t.value)]
    return sorted(complete, key=lambda t: (sign * t.value, t.number))[:k]


def _check_fixed(values: dict[str, Any], distributions: dict[str, BaseDistribution], path: str) -> None:
    bad = [name for name, value in values.items() if not regions.contains({name: distributions[name]}, {name: value})]
    if bad:
        raise spec.SpecError([(f"{path}.{name}", f"{values[name]!r} is outside spec.searchSpace's {name}") for name in bad])


def _remember(executor: Executor, name: str, **fields: Any) -> None:
    records = record.stages(executor.study.user_attrs)
    executor.study.set_user_attr(record.STAGES, {**records, name: {**records.get(name, {}), **fields}})
