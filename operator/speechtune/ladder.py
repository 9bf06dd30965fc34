"""The multi-fidelity ladder: cheap proxies first, the best promoted (seed sections 3 and 9).

Each configuration is one Optuna trial. Each level is a new run of the trainer with
that level's overrides (more data, more layers, more epochs); the level's objective is
the trial's intermediate value at step = level index. With reduction factor eta,
``initialTrials`` configurations run the lowest level, the best 1/eta of them the next,
and so on (64 -> 16 -> 4 for eta 4). Configurations that stop below the top are told
PRUNED, so the sampler learns from them; those that finish the top level are COMPLETE.

* synchronous: a level's best are promoted once every run of that level has ended;
* asynchronous (ASHA): a configuration is promoted as soon as it ranks in the top 1/eta
  of the results its level has so far, while the next level has room.

Parallelism is independent of rung sizes: promotions queue. The level a configuration is
assigned to is stored with it (user attr ``level``) before it runs, so after a crash the
ladder re-runs only levels that had not finished, never a finished one.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import PurePath
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from speechtune import metrics
from speechtune.backend import TrialRun, build_launch
from speechtune.engine import INTERRUPTED, Engine, Event, TrialFailed, follow_output
from speechtune.local import LaunchError
from speechtune.spec import Fidelity

LEVEL = "level"  # user attr: the level a configuration is assigned to (running, queued or done)
CORRELATIONS = "fidelity_correlations"  # study user attr: Spearman rho between adjacent levels
VALIDATION = "validation"  # study user attr: the best configuration retrained with other seeds
EPOCHS_KEYS = {"epochs", "max_epochs"}
MIN_PAIRS = 5  # fewer configurations that ran both levels say too little to call a proxy unreliable


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when undefined."""
    if len(xs) != len(ys) or len(xs) < 2:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else math.nan


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def chain_start(fidelity: Fidelity, level: int) -> int:
    """The lowest level from which ``level`` differs only in epochs: its checkpoint can be resumed."""
    start = level
    while start > 0:
        lower, upper = fidelity.levels[start - 1].overrides, fidelity.levels[start].overrides
        changed = {key for key in set(lower) | set(upper) if lower.get(key) != upper.get(key)}
        if not changed <= EPOCHS_KEYS:
            break
        start -= 1
    return start


class LadderEngine(Engine):
    """The engine, scheduling level runs instead of whole trials."""

    def __init__(self, *args: Any, checkpoint_root: PurePath | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        assert self.spec.fidelity is not None, "LadderEngine needs spec.fidelity"
        self.fidelity: Fidelity = self.spec.fidelity
        self.sizes = self.fidelity.rung_sizes()
        self.top = len(self.sizes) - 1
        self.budget.max_trials = self.sizes[0]
        self.checkpoint_root = checkpoint_root
        # Each level's series at 0 from the start: rate() ignores the value a series first appears with.
        for index, level in enumerate(self.fidelity.levels):
            metrics.REPORTED_VALUE.labels(**self.labels, step=level.name)
            if index:
                metrics.PROMOTIONS.labels(**self.labels, rung=level.name)

    def rungs(self) -> list[dict[str, Any]]:
        """Each level's progress: configurations it takes, assigned to it, running it now, done with it."""
        configs = self._configs()
        return [
            {"name": level.name, "size": size, "assigned": self._launched(index, configs),
             "running": sum(1 for t in configs if t.user_attrs[LEVEL] == index and t.number in self._runs),
             "finished": sum(1 for t in configs if index in t.intermediate_values)}
            for index, (level, size) in enumerate(zip(self.fidelity.levels, self.sizes))
        ]

    # -- state, derived from storage each time ------------------------------
    def _configs(self) -> list[FrozenTrial]:
        return [t for t in self.trials() if LEVEL in t.user_attrs]

    def _launched(self, level: int, configs: list[FrozenTrial]) -> int:
        return sum(1 for t in configs if t.user_attrs[LEVEL] >= level)

    def _pending(self, configs: list[FrozenTrial]) -> list[FrozenTrial]:
        """Configurations assigned to a level they have not finished and are not running."""
        return [
            t for t in configs
            if t.state == TrialState.RUNNING and t.user_attrs[LEVEL] not in t.intermediate_values and t.number not in self._runs
        ]

    def _rung_done(self, level: int, configs: list[FrozenTrial]) -> bool:
        """No run at ``level`` is going on or still to come."""
        if level == 0:
            full = len(configs) >= self.sizes[0]
        else:
            full = self._launched(level, configs) > 0 if self.fidelity.mode == "synchronous" else (
                self._launched(level, configs) >= self.sizes[level] or self._rung_done(level - 1, configs))
        busy = any(t.user_attrs[LEVEL] == level and t.number in self._runs for t in configs)
        return full and not busy and not any(t.user_attrs[LEVEL] == level for t in self._pending(configs))

    def _results(self, level: int, configs: list[FrozenTrial]) -> list[FrozenTrial]:
        """Configurations with a value at ``level``, best first."""
        done = [t for t in configs if level in t.intermediate_values and t.state != TrialState.FAIL]
        sign = -1 if self.spec.objective.direction == "maximize" else 1
        return sorted(done, key=lambda t: (sign * t.intermediate_values[level], t.number))

    # -- decisions ------------------------------------------------------------
    def _promotions(self, configs: list[FrozenTrial]) -> list[tuple[FrozenTrial, int]]:
        """Configurations to move up now, deepest level first."""
        chosen: list[tuple[FrozenTrial, int]] = []
        for level in range(self.top - 1, -1, -1):
            room = self.sizes[level + 1] - self._launched(level + 1, configs)
            if room <= 0:
                continue
            results = self._results(level, configs)
            waiting = [t for t in results if t.user_attrs[LEVEL] == level and t.state == TrialState.RUNNING]
            if self.fidelity.mode == "synchronous":
                if self._launched(level + 1, configs) == 0 and self._rung_done(level, configs):
                    chosen += [(t, level + 1) for t in waiting[:room]]
            else:
                allowed = len(results) // self.fidelity.reduction_factor
                if self._rung_done(level, configs):  # no more results will come: fill the next level
                    allowed = sum(1 for t in results if t.user_attrs[LEVEL] > level) + room
                top_numbers = {t.number for t in results[:allowed]}
                chosen += [(t, level + 1) for t in waiting if t.number in top_numbers][:room]
        return chosen

    def _settle(self, configs: list[FrozenTrial], final: bool = False) -> None:
        """Tell Optuna about configurations whose ladder is over: COMPLETE at the top, else PRUNED."""
        for trial in configs:
            level = trial.user_attrs[LEVEL]
            if trial.state != TrialState.RUNNING or level not in trial.intermediate_values or trial.number in self._runs:
                continue
            if level == self.top:
                self.study.tell(trial.number, trial.intermediate_values[level])
                self._notify(Event("completed", trial.number, f"{self._objective}={trial.intermediate_values[level]:.4g} at {self.fidelity.levels[level].name}", trial.intermediate_values[level]))
                self._publish_best()
                self._finish_metrics("COMPLETE", trial.datetime_start.timestamp())
            elif final or self._launched(level + 1, configs) >= self.sizes[level + 1] or (
                self.fidelity.mode == "synchronous" and self._launched(level + 1, configs) > 0
            ):
                self.study.tell(trial.number, state=TrialState.PRUNED)
                metrics.PRUNED.labels(**self.labels).inc()
                self._notify(Event("pruned", trial.number, f"stopped after level {self.fidelity.levels[level].name}", trial.intermediate_values[level]))
                self._finish_metrics("PRUNED", trial.datetime_start.timestamp())

    # -- the engine's hooks ---------------------------------------------------
    def _can_start(self) -> bool:
        if self._failed_message or len(self._running) >= self.budget.parallelism:
            return False
        return self._advance()

    def _advance(self) -> bool:
        """Settle finished ladders, decide promotions; say whether a run can start now."""
        configs = self._configs()
        self._settle(configs)
        if self._pending(configs):
            return True
        promotions = self._promotions(configs)
        if promotions:
            with self.storage.batch():
                for trial, level in promotions:
                    self.storage.set_trial_user_attr(trial._trial_id, LEVEL, level)
            for trial, level in promotions:
                name = self.fidelity.levels[level].name
                metrics.PROMOTIONS.labels(**self.labels, rung=name).inc()
                self._notify(Event("promoted", trial.number, f"to {name} ({self._objective} {trial.intermediate_values[level - 1]:.4g} at {self.fidelity.levels[level - 1].name})"))
            return True
        return len(configs) < self.sizes[0]

    async def _start_next(self) -> None:
        pending = self._pending(self._configs())
        if pending:
            frozen = max(pending, key=lambda t: (t.user_attrs[LEVEL], -t.number))
            trial = optuna.Trial(self.study, frozen._trial_id)
            level = frozen.user_attrs[LEVEL]
        else:
            began = time.perf_counter()
            with self.storage.batch():
                trial = self.study.ask(self._distributions)
                trial.set_user_attr(LEVEL, 0)
            metrics.SUGGEST_SECONDS.labels(**self.labels).observe(time.perf_counter() - began)
            level = 0
        await self._launch_level(trial, level)

    async def _launch_level(self, trial: optuna.Trial, level: int) -> None:
        attempt = f"L{level}-{self.fidelity.levels[level].name}"
        launch = build_launch(self.study_name, trial.number, self.spec.trial_template, trial.params,
                              overrides=self._overrides(trial.number, level), attempt=attempt, rung=level)
        await self._launch(trial, launch, f"level {self.fidelity.levels[level].name}",
                           lambda run: self._supervise_level(trial, run, level))

    def _overrides(self, number: int, level: int) -> dict[str, Any]:
        overrides = dict(self.fidelity.levels[level].overrides)
        if self.fidelity.resume_from_checkpoint and self.checkpoint_root is not None:
            chain = chain_start(self.fidelity, level)
            overrides["checkpoint_dir"] = str(self.checkpoint_root / f"trial-{number}" / f"from-level-{chain}")
        return overrides

    async def _supervise_level(self, trial: optuna.Trial, run: TrialRun, level: int) -> None:
        name = self.fidelity.levels[level].name
        try:
            result = await follow_output(run, self._objective, lambda step, value: False, self.labels, gpus=self.gpus)
        except TrialFailed as failure:
            await run.stop()
            if self._failed_message:
                failure = TrialFailed("StudyFailed", "stopped because the study failed")
            self._record_failure(trial.number, trial._trial_id, failure.reason, f"at level {name}: {failure}")
            self._finish_metrics("FAIL", self.storage.get_trial(trial._trial_id).datetime_start.timestamp())
            return
        assert result.value is not None
        with self.storage.batch():
            trial.report(result.value, level)
            trial.set_user_attr(f"metrics_{name}", result.metrics)
        metrics.REPORTED_VALUE.labels(**self.labels, step=name).observe(result.value)
        self._notify(Event("level-done", trial.number, f"{name}: {self._objective}={result.value:.4g}", result.value))
        if level > 0:
            self._update_correlation(level - 1)

    async def _recover(self) -> None:
        """Runs that were going when the last engine died are pending again: their level re-runs."""
        for frozen in self.trials((TrialState.RUNNING,)):
            if LEVEL not in frozen.user_attrs:  # asked but never assigned: cannot have run
                self._record_failure(frozen.number, frozen._trial_id, INTERRUPTED, "the runner stopped before this trial started")
                continue
            level = frozen.user_attrs[LEVEL]
            attempt = f"L{level}-{self.fidelity.levels[level].name}"
            run = await self.backend.attach(self.study_name, frozen.number, attempt)
            if run is not None and level not in frozen.intermediate_values:
                trial = optuna.Trial(self.study, frozen._trial_id)
                self._follow(trial, run, self._supervise_level(trial, run, level))

    async def _finish(self) -> None:
        self._settle(self._configs(), final=True)
        await self._validate()

    # -- proxy correlation and validation -------------------------------------
    def _update_correlation(self, lower: int) -> None:
        pairs = [t for t in self._configs() if lower in t.intermediate_values and lower + 1 in t.intermediate_values]
        proxy, target = [t.intermediate_values[lower] for t in pairs], [t.intermediate_values[lower + 1] for t in pairs]
        rho = spearman(proxy, target)
        if math.isnan(rho) and len(pairs) >= 2 and len(set(proxy)) == 1 < len(set(target)):
            rho = 0.0  # a proxy that scores every configuration alike ranks nothing
        if math.isnan(rho):
            return
        low, high = self.fidelity.levels[lower].name, self.fidelity.levels[lower + 1].name
        metrics.PROXY_CORRELATION.labels(**self.labels, from_level=low, to_level=high).set(rho)
        correlations = dict(self.study.user_attrs.get(CORRELATIONS, {}))
        unreliable = rho < self.fidelity.correlation_warning and len(pairs) >= MIN_PAIRS
        was_unreliable = correlations.get(f"{low}->{high}", {}).get("unreliable", False)
        correlations[f"{low}->{high}"] = {"rho": round(rho, 4), "pairs": len(pairs), "unreliable": unreliable}
        self.study.set_user_attr(CORRELATIONS, correlations)
        if unreliable and not was_unreliable:  # once per pair of levels, not after every run
            self._notify(Event("proxy-unreliable", None, f"Spearman rho {rho:.2f} between {low} and {high} over {len(pairs)} "
                               f"configurations is below correlationWarning {self.fidelity.correlation_warning}: "
                               f"the {low} proxy does not rank configurations like {high}"))

    async def _validate(self) -> None:
        """Retrain the best top-level configuration with other seeds; report mean and std."""
        seeds = self.spec.validation_seeds
        best = self.best_trial()
        if not seeds or best is None:
            return
        record = dict(self.study.user_attrs.get(VALIDATION, {"trial": best.number, "values": {}}))
        record["values"] = dict(record["values"])
        gate = asyncio.Semaphore(self.budget.parallelism)

        async def validate(seed: int) -> None:
            async with gate:
                value = await self._validation_run(best, seed)
            if value is not None:  # stored at once: after a restart only the seeds without a value run
                record["values"][str(seed)] = value
                values = list(record["values"].values())
                record.update(mean=sum(values) / len(values), std=_std(values))
                self.study.set_user_attr(VALIDATION, {**record, "values": dict(record["values"])})

        await asyncio.gather(*(validate(seed) for seed in range(1, seeds + 1) if str(seed) not in record["values"]))
        if record.get("mean") is not None:
            self._notify(Event("validated", best.number, f"{self._objective} {record['mean']:.4g} ± {record['std']:.4g} over {len(record['values'])} seeds"))

    async def _validation_run(self, best: FrozenTrial, seed: int) -> float | None:
        overrides = {**self.fidelity.levels[self.top].overrides, "seed": seed}
        launch = build_launch(self.study_name, best.number, self.spec.trial_template, best.params, overrides=overrides,
                              attempt=f"seed{seed}", rung=self.top)
        try:
            run = await self.backend.launch(launch)
        except LaunchError as failure:
            self._notify(Event("failed", best.number, f"validation seed {seed}: {failure}"))
            return None
        try:
            return (await follow_output(run, self._objective, lambda step, value: False, self.labels, gpus=self.gpus)).value
        except TrialFailed as failure:
            await run.stop()
            self._notify(Event("failed", best.number, f"validation seed {seed}: {failure}"))
            return None


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
