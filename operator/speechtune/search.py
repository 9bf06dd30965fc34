"""How Optuna searches: distributions, samplers and pruners built from the spec."""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Callable, Container, Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from speechtune import spec

# Above this many finished trials, history-based samplers see a bounded window
# (the best trials plus the most recent ones), so `ask` stays fast at 10,000+.
HISTORY_WINDOW = 400
HISTORY_ELITE = 100


def distributions(space: tuple[spec.Param, ...]) -> dict[str, BaseDistribution]:
    result: dict[str, BaseDistribution] = {}
    for param in space:
        if isinstance(param, spec.IntParam):
            result[param.name] = IntDistribution(param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, spec.FloatParam):
            result[param.name] = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        else:
            result[param.name] = CategoricalDistribution(param.choices)
    return result


def ask(study: optuna.Study, distributions: Mapping[str, BaseDistribution], space: tuple[spec.Param, ...]) -> optuna.Trial:
    """A new trial (or the next queued one) with each of ``distributions``' parameters that applies suggested, in the
    search space's order: Optuna's define-by-run. A conditional parameter (``when``) is suggested only when its parents
    took one of its choices, so it is neither in the trial's params nor on the trainer's command line otherwise,
    and a sampler sees each trial's own set of parameters. A flat space suggests exactly what
    ``study.ask(distributions)`` would, in the same order."""
    trial = study.ask()
    values: dict[str, Any] = {}
    for param in space:
        if param.name in distributions and spec.applies(param, values):
            values[param.name] = trial._suggest(param.name, distributions[param.name])  # what study.ask(fixed) calls
    return trial


def build_sampler(sampler: spec.Sampler, space: tuple[spec.Param, ...]) -> BaseSampler:
    seed = sampler.seed
    if sampler.type == "tpe":
        # constant_liar steers parallel asks away from configurations still running. In a conditional space, TPE
        # models jointly each group of parameters that appear together (group=True, Optuna's choice for dynamic
        # spaces); otherwise a parameter missing from some trials would fall back to independent sampling.
        base: BaseSampler = _tpe(seed, sampler.startup_trials, group=spec.is_conditional(space))
    elif sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    elif sampler.type == "grid":
        return _GridSampler(_grid(space), seed=seed)
    elif sampler.type == "cmaes":
        base = optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=sampler.startup_trials)
    elif sampler.type == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    elif sampler.type == "gp":
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # Optuna's GPSampler needs it
            raise RuntimeError("spec.sampler.type: gp needs torch, which is only in the [trainer] extra; use tpe")
        base = optuna.samplers.GPSampler(seed=seed, n_startup_trials=sampler.startup_trials)
    else:  # the spec validator only lets known types through
        raise ValueError(f"unknown sampler {sampler.type!r}")
    return BoundedHistorySampler(base)


def _tpe(seed: int | None, startup_trials: int, group: bool) -> optuna.samplers.TPESampler:
    if not group:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, constant_liar=True)
    with warnings.catch_warnings():  # group is experimental in Optuna (since 2.8)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, constant_liar=True,
                                          multivariate=True, group=True)


def _grid(space: tuple[spec.Param, ...]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for param in space:
        if isinstance(param, spec.CategoricalParam):
            grid[param.name] = list(param.choices)
        elif isinstance(param, spec.IntParam):
            grid[param.name] = list(range(param.low, param.high + 1, param.step))
        else:
            assert param.step is not None, "validated: grid floats have a step"
            count = int(round((param.high - param.low) / param.step)) + 1
            grid[param.name] = [param.low + index * param.step for index in range(count)]
    return grid


def grid_size(space: tuple[spec.Param, ...]) -> int:
    size = 1
    for values in _grid(space).values():
        size *= len(values)
    return size


def build_pruner(pruner: spec.Pruner) -> optuna.pruners.BasePruner:
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_steps)
    if pruner.type == "successiveHalving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=pruner.min_resource, reduction_factor=pruner.reduction_factor)
    if pruner.type == "hyperband":
        return _HyperbandPruner(
            min_resource=pruner.min_resource, max_resource=pruner.max_resource, reduction_factor=pruner.reduction_factor,
        )
    return optuna.pruners.NopPruner()


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` after the last point, which raises outside
    ``study.optimize``; the engine caps a grid study's budget at the grid's size instead."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


class _HyperbandPruner(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband, remembering each trial's bracket.

    Optuna recomputes the bracket (a crc32 of study name and number) of every trial in the
    study on every prune check; a bracket never changes, so it is computed once.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._brackets: dict[tuple[str, int], int] = {}

    def _get_bracket_id(self, study: optuna.Study, trial: FrozenTrial) -> int:
        key = (study.study_name, trial.number)
        if key in self._brackets:
            return self._brackets[key]
        bracket = super()._get_bracket_id(study, trial)
        if self._pruners:  # before initialisation every trial reads as bracket 0: not final
            self._brackets[key] = bracket
        return bracket


class ViewSampler(BaseSampler):
    """A sampler that shows the sampler it wraps only a view of the study (``view``) and, per
    parameter, possibly a narrower distribution (``distribution``); otherwise it delegates."""

    def __init__(self, base: BaseSampler):
        self.base = base

    def view(self, study: optuna.Study) -> StudyView:
        raise NotImplementedError

    def distribution(self, name: str, distribution: BaseDistribution) -> BaseDistribution:
        return distribution

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        # The study's own distributions: Optuna checks them against the asked ones (a categorical may not change).
        return self.base.infer_relative_search_space(self.view(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        narrowed = {name: self.distribution(name, dist) for name, dist in search_space.items()}
        sampled = self.base.sample_relative(self.view(study), trial, narrowed)
        # TPE with group=True samples each group from the distributions of its own decomposition, not the narrowed
        # ones it is given: a value outside them is dropped here, and the parameter is sampled independently inside.
        return {name: value for name, value in sampled.items() if name not in narrowed or inside(narrowed[name], value)}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(self.view(study), trial, param_name, self.distribution(param_name, param_distribution))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def inside(distribution: BaseDistribution, value: Any) -> bool:
    """Whether a parameter value lies in a distribution (a narrowed range, or fewer choices)."""
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except ValueError:  # a categorical value outside the narrowed choices
        return False


class StudyView:
    """A study proxy whose trial lists pass through ``select``: what a wrapped sampler may see."""

    def __init__(self, study: optuna.Study, select: Callable[[list[FrozenTrial]], list[FrozenTrial]]):
        self._wrapped = study
        self._select = select

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False) -> list[FrozenTrial]:
        return self._select(self._wrapped._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class BoundedHistorySampler(ViewSampler):
    """Gives a history-based sampler a bounded view of the study.

    Below ``window`` trials this is exactly the wrapped sampler. Above it, the
    sampler sees the most recent trials (finished ones and those still running)
    and the ``elite`` best complete trials, so its cost stops growing with the
    study while it still knows the best region found so far.
    """

    def __init__(self, base: BaseSampler, window: int = HISTORY_WINDOW, elite: int = HISTORY_ELITE):
        super().__init__(base)
        self.window = window
        self.elite = elite
        self._elite: dict[int, FrozenTrial] = {}  # the best complete trials seen so far, by number

    def view(self, study: optuna.Study) -> StudyView:
        return StudyView(study, lambda trials: self.select(trials, study.directions[0]))

    def select(self, trials: list[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
        """The window: recent trials from the end of the list, plus the best complete ones seen.

        Only the tail is scanned, so the cost does not grow with the study. The elite is kept
        across calls from the complete trials that passed through the tail; a trial that
        finishes long after newer ones has left the tail may be missed, which only makes the
        window a little more recent.
        """
        if len(trials) <= self.window:
            return trials
        keep = max(0, self.window - self.elite)
        recent: list[FrozenTrial] = []
        unfinished: list[FrozenTrial] = []
        for trial in reversed(trials):
            if not trial.state.is_finished():
                unfinished.append(trial)
            elif len(recent) < keep:
                recent.append(trial)
            else:
                break
        for trial in recent:
            if trial.state == TrialState.COMPLETE:
                self._elite[trial.number] = trial
        if len(self._elite) > self.elite:
            pick = heapq.nlargest if direction == StudyDirection.MAXIMIZE else heapq.nsmallest
            self._elite = {t.number: t for t in pick(self.elite, self._elite.values(), key=lambda t: t.values[0])}
        chosen = {t.number for t in recent}
        best = [t for t in self._elite.values() if t.number not in chosen]
        return sorted(best + recent, key=lambda t: t.number) + unfinished[::-1]
