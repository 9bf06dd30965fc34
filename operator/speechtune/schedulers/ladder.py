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

Each level ranks configurations by its ``rank`` (default: the study's objective), e.g. ``val_loss``
at a proxy where WER has not moved yet, then by the rank's ``tieBreak`` metric, then by which run
finished first (never by trial number; that is left only for runs recorded without a finish time).
The proxy-correlation check compares each level's ranking with the next level's, and the cost check
each level's measured run time with the top's: a proxy pays off only if it ranks like the top and
costs much less (ProxyUnreliable, ProxyCostly).

With ``brackets: N`` the ladder runs the N most aggressive Hyperband brackets: bracket b starts
its configurations at level b (``Fidelity.bracket_sizes``) and halves them from there; each
configuration carries its bracket (user attr ``bracket``) and promotions stay within it.

Parallelism is independent of rung sizes: promotions queue. The level a configuration is
assigned to is stored with it (user attr ``level``) before it runs, so after a crash the
ladder re-runs only levels that had not finished, never a finished one. The best
configuration's seed validation is the ``validate`` stage (``speechtune.schedulers.stages``).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from speechtune import metrics, record, search
from speechtune.executor import Event
from speechtune.schedulers import Run, Scheduler
from speechtune.schedulers.checkpoints import Checkpoints
from speechtune.spec import Fidelity, Rank

if TYPE_CHECKING:
    from speechtune.executor import Executor, RunResult, TrialFailed

LEVEL = record.LEVEL
BRACKET = record.BRACKET
EPOCHS_KEYS = {"epochs", "max_epochs"}
MIN_PAIRS = 5  # fewer configurations that ran both levels say too little to call a proxy unreliable
MIN_COST_RUNS = 3  # runs of a level before its median cost is judged against the top's


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


class Ladder(Scheduler):
    """Schedules level runs of configurations instead of whole trials."""

    def __init__(self, executor: Executor, *, stage: str | None, fidelity: Fidelity, sampler: BaseSampler,
                 distributions: dict[str, BaseDistribution], checkpoints: Checkpoints):
        super().__init__(executor, stage)
        self.fidelity = fidelity
        self.sampler = sampler
        self.distributions = distributions
        self.checkpoints = checkpoints
        self.brackets = fidelity.bracket_sizes()  # each bracket's configurations per level (0 below its start)
        self.sizes = [sum(column) for column in zip(*self.brackets)]  # per level, all brackets
        self.top = len(self.sizes) - 1
        objective = executor.spec.objective
        self.ranks = [level.rank or Rank(objective.metric, objective.direction) for level in fidelity.levels]
        labels = executor.labels
        # Each level's series at 0 from the start: rate() ignores the value a series first appears with.
        for index, level in enumerate(fidelity.levels):
            metrics.REPORTED_VALUE.labels(**labels, step=level.name)
            if index:
                metrics.PROMOTIONS.labels(**labels, rung=level.name)

    def prepare(self) -> None:
        self.study.sampler = self.sampler
        self.study.pruner = optuna.pruners.NopPruner()

    def total_trials(self) -> int:
        return sum(sizes[bracket] for bracket, sizes in enumerate(self.brackets))

    def rungs(self) -> list[dict[str, Any]]:
        """Each level's progress: configurations it takes, assigned to it, running it now, done with it; and what it ranks by."""
        configs = self._configs()
        return [
            {"name": level.name, "size": size, "assigned": self._launched(index, configs),
             "running": sum(1 for t in configs if t.user_attrs[LEVEL] == index and self.executor.is_running(t.number)),
             "finished": sum(1 for t in configs if index in t.intermediate_values), "rank": describe_rank(self.ranks[index]),
             **cost}
            for index, (level, size, cost) in enumerate(zip(self.fidelity.levels, self.sizes, self.level_costs(configs)))
        ]

    def level_costs(self, configs: list[FrozenTrial]) -> list[dict[str, Any]]:
        """Each level's measured cost: ``medianSeconds`` of its runs, ``startupSeconds``, the median time its runs spent
        before their first epoch, and ``costShare``: the median cost of reaching it (a resumed level adds the runs it
        continues) over the top's. Each is absent until measured."""
        reach = [[cost for t in configs if (cost := self._cost_to_reach(t, index)) is not None] for index in range(len(self.sizes))]
        top = statistics.median(reach[self.top]) if reach[self.top] else 0.0
        costs: list[dict[str, Any]] = []
        for index in range(len(self.sizes)):
            cost: dict[str, Any] = {}
            for field, key in (("medianSeconds", record.level_seconds_key), ("startupSeconds", record.level_startup_key)):
                found = [value for t in configs if (value := self._number(t, key(self.fidelity.levels[index].name))) is not None]
                if found:
                    cost[field] = round(statistics.median(found), 3)
            if top > 0 and reach[index]:
                cost["costShare"] = round(statistics.median(reach[index]) / top, 4)
            costs.append(cost)
        return costs

    def _number(self, trial: FrozenTrial, key: str) -> float | None:
        value = trial.user_attrs.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def _seconds(self, trial: FrozenTrial, level: int) -> float | None:
        return self._number(trial, record.level_seconds_key(self.fidelity.levels[level].name))

    def _cost_to_reach(self, trial: FrozenTrial, level: int) -> float | None:
        """What ``level`` cost this configuration: its run there plus, while a level resumes the one below's
        checkpoint, the runs it continued (a configuration that started above them paid its run only)."""
        total: float | None = None
        for index in range(level, -1, -1):
            seconds = self._seconds(trial, index)
            if seconds is None:
                break
            total = (total or 0.0) + seconds
            if not (self.fidelity.resume_from_checkpoint and chain_start(self.fidelity, index) < index):
                break
        return total

    def bracket_status(self) -> list[dict[str, Any]]:
        """Each bracket: the level it starts at, its configurations per level from there, and how many it has sampled."""
        configs = self._configs()
        return [{"bracket": bracket, "startLevel": self.fidelity.levels[bracket].name, "sizes": sizes[bracket:],
                 "sampled": len(self._in_bracket(bracket, configs))} for bracket, sizes in enumerate(self.brackets)]

    # -- state, derived from storage each time ------------------------------
    def _configs(self) -> list[FrozenTrial]:
        return [t for t in self.trials() if LEVEL in t.user_attrs]

    @staticmethod
    def _in_bracket(bracket: int, configs: list[FrozenTrial]) -> list[FrozenTrial]:
        return [t for t in configs if record.bracket(t) == bracket]

    def _launched(self, level: int, configs: list[FrozenTrial]) -> int:
        return sum(1 for t in configs if t.user_attrs[LEVEL] >= level)

    def _pending(self, configs: list[FrozenTrial]) -> list[FrozenTrial]:
        """Configurations assigned to a level they have not finished and are not running."""
        return [
            t for t in configs
            if t.state == TrialState.RUNNING and t.user_attrs[LEVEL] not in t.intermediate_values and not self.executor.is_running(t.number)
        ]

    def _rung_done(self, level: int, configs: list[FrozenTrial], bracket: int = 0) -> bool:
        """No run at ``level`` is going on or still to come (``configs``: the bracket's)."""
        if level == bracket:
            full = len(configs) >= self.brackets[bracket][level]
        else:
            full = self._launched(level, configs) > 0 if self.fidelity.mode == "synchronous" else (
                self._launched(level, configs) >= self.brackets[bracket][level] or self._rung_done(level - 1, configs, bracket))
        busy = any(t.user_attrs[LEVEL] == level and self.executor.is_running(t.number) for t in configs)
        return full and not busy and not any(t.user_attrs[LEVEL] == level for t in self._pending(configs))

    def _results(self, level: int, configs: list[FrozenTrial]) -> list[FrozenTrial]:
        """Configurations with a value at ``level``, best first: by the level's rank metric, its tie-break metric,
        then the run that finished first (trial number only for runs recorded without a finish time)."""
        done = [t for t in configs if level in t.intermediate_values and t.state != TrialState.FAIL]
        finished = record.level_finished_key(self.fidelity.levels[level].name)
        return sorted(done, key=lambda t: (*self._rank_key(t, level), t.user_attrs.get(finished, math.inf), t.number))

    def _rank_key(self, trial: FrozenTrial, level: int) -> tuple[float, ...]:
        """A configuration's place at ``level``, lower is better: its rank metric, then its tie-break metric, each signed."""
        rank = self.ranks[level]
        key = [self._signed(trial, level, rank.metric, rank.direction)]
        if rank.tie_break is not None:
            key.append(self._signed(trial, level, rank.tie_break, rank.tie_break_direction))
        return tuple(key)

    def _signed(self, trial: FrozenTrial, level: int, metric: str, direction: str) -> float:
        value = self._metric(trial, level, metric)
        if value is None:
            return math.inf  # not reported (a run recorded before the metric was required): last
        return -value if direction == "maximize" else value

    def _metric(self, trial: FrozenTrial, level: int, metric: str) -> float | None:
        if metric == self.executor.objective:
            return trial.intermediate_values[level]
        value = trial.user_attrs.get(record.level_metrics_key(self.fidelity.levels[level].name), {}).get(metric)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    # -- decisions ------------------------------------------------------------
    def _promotions(self, configs: list[FrozenTrial]) -> list[tuple[FrozenTrial, int]]:
        """Configurations to move up now, deepest level first, each within its bracket."""
        chosen: list[tuple[FrozenTrial, int]] = []
        for bracket, sizes in enumerate(self.brackets):
            members = self._in_bracket(bracket, configs)
            for level in range(self.top - 1, bracket - 1, -1):
                room = sizes[level + 1] - self._launched(level + 1, members)
                if room <= 0:
                    continue
                results = self._results(level, members)
                waiting = [t for t in results if t.user_attrs[LEVEL] == level and t.state == TrialState.RUNNING]
                if self.fidelity.mode == "synchronous":
                    if self._launched(level + 1, members) == 0 and self._rung_done(level, members, bracket):
                        chosen += [(t, level + 1) for t in waiting[:room]]
                else:
                    allowed = len(results) // self.fidelity.reduction_factor
                    if self._rung_done(level, members, bracket):  # no more results will come: fill the next level
                        allowed = sum(1 for t in results if t.user_attrs[LEVEL] > level) + room
                    top_numbers = {t.number for t in results[:allowed]}
                    chosen += [(t, level + 1) for t in waiting if t.number in top_numbers][:room]
        return chosen

    def _settle(self, configs: list[FrozenTrial], final: bool = False) -> None:
        """Tell Optuna about configurations whose ladder is over: COMPLETE at the top, else PRUNED."""
        objective = self.executor.objective
        for trial in configs:
            level = trial.user_attrs[LEVEL]
            if trial.state != TrialState.RUNNING or level not in trial.intermediate_values or self.executor.is_running(trial.number):
                continue
            bracket = record.bracket(trial)
            members = self._in_bracket(bracket, configs)
            value = trial.intermediate_values[level]
            started = trial.datetime_start.timestamp()
            if level == self.top:
                attrs = self.checkpoints.attrs(trial.number, self._checkpoint_folder(trial.number, level))
                self.executor.complete(trial.number, value, f"{objective}={value:.4g} at {self.fidelity.levels[level].name}", started, attrs)
            elif final or self._launched(level + 1, members) >= self.brackets[bracket][level + 1] or (
                self.fidelity.mode == "synchronous" and self._launched(level + 1, members) > 0
            ):
                self.executor.prune(trial.number, f"stopped after level {self.fidelity.levels[level].name}", value, started)

    # -- the scheduler's answers ---------------------------------------------------
    def next_run(self) -> Run | None:
        """Settle finished ladders, decide promotions; the run to start now, if any."""
        configs = self._configs()
        self._settle(configs)
        pending = self._pending(configs)
        if not pending:
            promotions = self._promotions(configs)
            if promotions:
                self._promote(promotions)
                pending = self._pending(self._configs())
        if pending:
            frozen = max(pending, key=lambda t: (t.user_attrs[LEVEL], -t.number))
            return self._level_run(optuna.Trial(self.study, frozen._trial_id), frozen.user_attrs[LEVEL])
        # New configurations: bracket 0's first, then bracket 1's (which start one level up), and so on.
        bracket = next((b for b, sizes in enumerate(self.brackets) if len(self._in_bracket(b, configs)) < sizes[b]), None)
        if bracket is not None:
            began = time.perf_counter()
            with self.executor.storage.batch():
                trial = search.ask(self.study, self.distributions, self.executor.spec.search_space)
                trial.set_user_attr(LEVEL, bracket)
                if bracket:
                    trial.set_user_attr(BRACKET, bracket)
                trial.set_user_attr(record.LAUNCHED_AT, time.time())
                if self.stage is not None:
                    trial.set_user_attr(record.STAGE, self.stage)
            metrics.SUGGEST_SECONDS.labels(**self.executor.labels).observe(time.perf_counter() - began)
            return self._level_run(trial, bracket)
        if not self.running():
            self._settle(self._configs(), final=True)
            self.checkpoints.clean(self.executor.trials())
        return None

    def _promote(self, promotions: list[tuple[FrozenTrial, int]]) -> None:
        with self.executor.storage.batch():
            for trial, level in promotions:
                self.executor.storage.set_trial_user_attr(trial._trial_id, LEVEL, level)
        for trial, level in promotions:
            name, metric = self.fidelity.levels[level].name, self.ranks[level - 1].metric
            value = self._metric(trial, level - 1, metric)
            metrics.PROMOTIONS.labels(**self.executor.labels, rung=name).inc()
            self.executor.notify(Event("promoted", trial.number, f"to {name} ({metric} "
                                       f"{value if value is not None else math.nan:.4g} at {self.fidelity.levels[level - 1].name})"))

    def attempt(self, level: int) -> str:
        return f"L{level}-{self.fidelity.levels[level].name}"

    def _level_run(self, trial: optuna.Trial, level: int) -> Run:
        return self.make_run(trial, values=trial.params, overrides=self.level_overrides(trial.number, level),
                             attempt=self.attempt(level), level=level, description=f"level {self.fidelity.levels[level].name}",
                             started=trial.user_attrs.get(record.LAUNCHED_AT, time.time()))

    def level_overrides(self, number: int, level: int) -> dict[str, Any]:
        """A level's overrides, with the checkpoint folder its run resumes from or leaves its model in."""
        overrides = dict(self.fidelity.levels[level].overrides)
        folder = self._checkpoint_folder(number, level)
        if folder is not None:
            overrides["checkpoint_dir"] = folder
        return overrides

    def _checkpoint_folder(self, number: int, level: int) -> str | None:
        root = self.executor.checkpoint_root
        if self.fidelity.resume_from_checkpoint and root is not None:
            return str(root / f"trial-{number}" / f"from-level-{chain_start(self.fidelity, level)}")
        return self.checkpoints.folder(number, f"level-{level}") if level == self.top else None

    def on_result(self, run: Run, result: RunResult) -> None:
        name = self.fidelity.levels[run.level].name
        assert result.value is not None
        missing = self._missing_rank_metric(run.level, result)
        if missing is not None:
            self.on_failure(run, missing)
            return
        with self.executor.storage.batch():
            run.trial.report(result.value, run.level)
            run.trial.set_user_attr(record.level_metrics_key(name), result.metrics)
            run.trial.set_user_attr(record.level_finished_key(name), time.time())
            run.trial.set_user_attr(record.level_seconds_key(name), result.seconds)
            if result.startup_seconds is not None:
                run.trial.set_user_attr(record.level_startup_key(name), result.startup_seconds)
        metrics.REPORTED_VALUE.labels(**self.executor.labels, step=name).observe(result.value)
        rank = self.ranks[run.level]
        ranked = f" (ranked by {rank.metric}={result.metrics[rank.metric]:.4g})" if rank.metric != self.executor.objective else ""
        self.executor.notify(Event("level-done", run.trial.number, f"{name}: {self.executor.objective}={result.value:.4g}{ranked}",
                                   result.value))
        if run.level > 0:
            self._update_correlation(run.level - 1)
        self._update_costs()

    def _missing_rank_metric(self, level: int, result: RunResult) -> TrialFailed | None:
        """A run whose last protocol line lacks a metric its level ranks by (or has it NaN) cannot be ranked: it fails."""
        from speechtune.executor import TrialFailed

        rank = self.ranks[level]
        for metric in filter(None, (rank.metric, rank.tie_break)):
            if metric == self.executor.objective:
                continue
            value = result.metrics.get(metric)
            if value is None:
                return TrialFailed("NoMetrics", f"level {self.fidelity.levels[level].name} ranks by {metric}, but the run "
                                   f"reported no {metric} (it reported {', '.join(sorted(result.metrics)) or 'nothing'})")
            if not math.isfinite(value):
                return TrialFailed("NaN", f"rank metric {metric} is {value} at level {self.fidelity.levels[level].name}")
        return None

    def failure_message(self, run: Run, failure: TrialFailed) -> str:
        return f"at level {self.fidelity.levels[run.level].name}: {failure}"

    def resume(self, frozen: FrozenTrial) -> Run | None:
        level = frozen.user_attrs.get(LEVEL)
        if level is None:  # asked but never assigned: cannot have run
            self.executor.fail(frozen.number, frozen._trial_id, record.INTERRUPTED, "the runner stopped before this trial started")
            return None
        if level in frozen.intermediate_values:
            return None  # its level is done: it waits for promotion or settling
        return self._level_run(optuna.Trial(self.study, frozen._trial_id), level)

    def lost(self, frozen: FrozenTrial) -> None:
        """A configuration whose level run is gone stays assigned: that level runs again."""

    # -- proxy correlation -------------------------------------------------------------
    def _update_correlation(self, lower: int) -> None:
        pairs = [t for t in self._configs() if lower in t.intermediate_values and lower + 1 in t.intermediate_values
                 and t.state != TrialState.FAIL]
        # each level's ranking (its rank metric, then its tie-break), signed so that lower is better at both
        proxy, target = [self._rank_key(t, lower) for t in pairs], [self._rank_key(t, lower + 1) for t in pairs]
        rho = spearman(proxy, target)
        if math.isnan(rho) and len(pairs) >= 2 and len(set(proxy)) == 1 < len(set(target)):
            rho = 0.0  # a proxy that scores every configuration alike ranks nothing
        if math.isnan(rho):
            return
        low, high = self.fidelity.levels[lower].name, self.fidelity.levels[lower + 1].name
        metrics.PROXY_CORRELATION.labels(**self.executor.labels, from_level=low, to_level=high).set(rho)
        correlations = dict(self.study.user_attrs.get(record.CORRELATIONS, {}))
        unreliable = rho < self.fidelity.correlation_warning and len(pairs) >= MIN_PAIRS
        was_unreliable = correlations.get(f"{low}->{high}", {}).get("unreliable", False)
        correlations[f"{low}->{high}"] = {"rho": round(rho, 4), "pairs": len(pairs), "unreliable": unreliable}
        self.study.set_user_attr(record.CORRELATIONS, correlations)
        if unreliable and not was_unreliable:  # once per pair of levels, not after every run
            low_by, high_by = self.ranks[lower].metric, self.ranks[lower + 1].metric
            self.executor.notify(Event("proxy-unreliable", None, f"Spearman rho {rho:.2f} between {low} (by {low_by}) and {high} "
                                       f"(by {high_by}) over {len(pairs)} configurations is below correlationWarning "
                                       f"{self.fidelity.correlation_warning}: the {low} proxy does not rank configurations like {high}"))


    # -- proxy cost -----------------------------------------------------------------------
    def _update_costs(self) -> None:
        """Publish each lower level's cost share once the top has a run. A level is costly, told once (proxy-costly),
        when reaching it costs more than costWarning of reaching the top, or when its runs spend more than that share
        of their time before their first epoch (start-up: imports, data loading, building the model; the median over
        every run that reported twice)."""
        configs = self._configs()
        costs = self.level_costs(configs)
        if "costShare" not in costs[self.top]:
            return
        recorded = dict(self.study.user_attrs.get(record.COSTS, {}))
        warning = self.fidelity.cost_warning
        # start-up is the trainer's and the backend's, not a level's: measured on any run that reported twice
        startups = [value for t in configs for level in self.fidelity.levels
                    if (value := self._number(t, record.level_startup_key(level.name))) is not None]
        startup_seconds = statistics.median(startups) if startups else 0.0
        for index, (level, cost) in enumerate(zip(self.fidelity.levels[:-1], costs)):
            if "costShare" not in cost:
                continue
            runs = sum(1 for t in configs if self._seconds(t, index) is not None)
            metrics.PROXY_COST_SHARE.labels(**self.executor.labels, level=level.name).set(cost["costShare"])
            startup = min(1.0, startup_seconds / cost["medianSeconds"]) if cost["medianSeconds"] > 0 else 0.0
            found = {"share": cost["costShare"], "runs": runs, "startupShare": round(startup, 4),
                     "costly": runs >= MIN_COST_RUNS and (cost["costShare"] > warning or startup > warning)}
            if found["costly"] and not recorded.get(level.name, {}).get("costly", False):  # once per level
                self.executor.notify(Event("proxy-costly", None, describe_cost(level.name, found, warning) + self._start_up_hint()))
            recorded[level.name] = found
        if recorded != self.study.user_attrs.get(record.COSTS, {}):
            self.study.set_user_attr(record.COSTS, recorded)
        spend = self._spend(configs)
        if spend != self.study.user_attrs.get(record.SPEND):  # a storage write only when it moved
            self.study.set_user_attr(record.SPEND, spend)

    def _spend(self, configs: list[FrozenTrial]) -> dict[str, Any]:
        """All the ladder's runs so far in full runs' worth (the median cost of reaching the top): what a search at
        full fidelity would have trained in full with the same compute, against the configurations screened."""
        reach = statistics.median(c for t in configs if (c := self._cost_to_reach(t, self.top)) is not None)
        spent = sum(seconds for t in configs for index in range(len(self.sizes)) if (seconds := self._seconds(t, index)) is not None)
        return {"fullRuns": round(spent / reach, 2) if reach > 0 else None, "configurations": len(configs),
                "atTop": sum(1 for t in configs if self.top in t.intermediate_values)}

    def _start_up_hint(self) -> str:
        if self.executor.spec.trial_template.workers.mode == "warm":
            return ""
        return "; if importing the trainer is what runs wait for, warm workers (trialTemplate.workers.mode: warm) pay it once"


def describe_cost(level: str, found: dict[str, Any], warning: float) -> str:
    """What a level costs and, when it is too costly to screen with, why (an Event's and the ProxyCostly condition's words)."""
    said = (f"reaching level {level} costs {found['share']:.2f} of reaching the top, and its runs spend {found['startupShare']:.0%} "
            f"of their time before their first epoch (over {found['runs']} runs)")
    if found["costly"] and found["startupShare"] > warning:
        return (f"{said}: start-up, not training, is what a run there costs (above costWarning {warning}), so screening "
                "saves little and a cheaper level would not help")
    if found["costly"]:
        return (f"{said}: above costWarning {warning}, screening at {level} saves little over training every configuration "
                "in full; give it fewer epochs or less data")
    return said


def describe_rank(rank: Rank) -> dict[str, Any]:
    """A level's rank as status shows it: {metric, direction[, tieBreak: {metric, direction}]}."""
    described: dict[str, Any] = {"metric": rank.metric, "direction": rank.direction}
    if rank.tie_break is not None:
        described["tieBreak"] = {"metric": rank.tie_break, "direction": rank.tie_break_direction}
    return described
