"""Search in a region: ranges narrowed around the best configurations found so far.

Used by the ``refine`` stage (around the top-k of the earlier stages) and by warm start's
``narrow`` (around the top-k of another study), as Syne Tune's ``BoundingBox`` does.

Why the sampler, and not the stored distributions, carries the region: changing a
parameter's range in the middle of an Optuna study degrades TPE (optuna #822, #1553), and a
categorical with fewer choices cannot be stored at all (Optuna refuses a changed choice set).
So every trial keeps the study's full distributions in storage, while ``RegionSampler`` shows
its sampler the narrowed distributions and only the trials inside the region: TPE never
models a point outside its ranges, and the earlier stages' in-region trials are its prior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler

from speechtune.search import StudyView, ViewSampler, inside

Region = dict[str, BaseDistribution]


def narrow(distributions: Mapping[str, BaseDistribution], configs: list[dict[str, Any]], margin: float) -> Region:
    """Each numeric range cut to the configurations' range plus ``margin`` x the full width on each
    side (in log space for log parameters, kept on the step grid); each categorical reduced to the
    choices the configurations use. A parameter no configuration has keeps its full range."""
    region: Region = {}
    for name, dist in distributions.items():
        values = [config[name] for config in configs if name in config]
        if not values:
            region[name] = dist
        elif isinstance(dist, CategoricalDistribution):
            seen = {repr(value) for value in values}
            region[name] = CategoricalDistribution([choice for choice in dist.choices if repr(choice) in seen] or dist.choices)
        else:
            region[name] = _narrow_numeric(dist, [float(v) for v in values], margin)
    return region


def _narrow_numeric(dist: IntDistribution | FloatDistribution, values: list[float], margin: float) -> BaseDistribution:
    to, back = (math.log, math.exp) if dist.log else ((lambda x: x), (lambda x: x))
    width = to(dist.high) - to(dist.low)
    low = max(dist.low, back(to(min(values)) - margin * width))
    high = min(dist.high, back(to(max(values)) + margin * width))
    step = dist.step
    if isinstance(dist, IntDistribution):
        step = step or 1
        low = dist.low + math.floor((low - dist.low) / step) * step
        high = dist.low + math.ceil((high - dist.low) / step) * step
        return IntDistribution(int(low), int(min(high, dist.high)), log=dist.log, step=dist.step if not dist.log else 1)
    if step is not None:
        low = dist.low + math.floor((low - dist.low) / step + 1e-9) * step
        high = min(dist.high, dist.low + math.ceil((high - dist.low) / step - 1e-9) * step)
    return FloatDistribution(low, max(low, high), log=dist.log, step=step)


def contains(region: Region, params: Mapping[str, Any]) -> bool:
    """Whether a configuration lies inside the region (parameters it lacks do not count against it)."""
    return all(inside(dist, params[name]) for name, dist in region.items() if name in params)


def describe(region: Region) -> dict[str, Any]:
    """A region as plain data, for the stage record and status."""
    described: dict[str, Any] = {}
    for name, dist in region.items():
        if isinstance(dist, CategoricalDistribution):
            described[name] = list(dist.choices)
        else:
            described[name] = [dist.low, dist.high]
    return described


class RegionSampler(ViewSampler):
    """Samples inside a region: the wrapped sampler sees the narrowed distributions and only the trials within them."""

    def __init__(self, base: BaseSampler, region: Region):
        super().__init__(base)
        self.region = region

    def view(self, study: optuna.Study) -> StudyView:
        return StudyView(study, lambda trials: [t for t in trials if contains(self.region, t.params)])

    def distribution(self, name: str, distribution: BaseDistribution) -> BaseDistribution:
        return self.region.get(name, distribution)
