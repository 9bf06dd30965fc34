"""spec.warmStart: what a study takes from a finished one (seed section 12, transfer).

The source is read once, before any trial starts: its best configurations (``topK``, enqueued
first), the region around its top-k (``narrow``), its best values of some parameters
(``fixed``, e.g. the architecture) and its best checkpoint (``initFrom: best``, passed to every
run as ``--init_from``). Anything that would make the transfer meaningless fails here, naming
the field: an unknown or empty source, another objective, a missing checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from speechtune import record, spec
from speechtune.schedulers import region as regions
from speechtune.storage import WriteThroughStorage, open_rdb, redact


@dataclass(frozen=True)
class Source:
    """What the source study gives, already checked; kept in the study (``user_attrs.warm_start``),
    so a restarted study still knows it if the source has since been deleted."""

    study: str
    top: list[tuple[int, dict[str, Any]]]  # (trial number, params), best first
    fixed: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    best_number: int = 0

    def region(self, distributions: dict[str, BaseDistribution], warm: spec.WarmStart) -> regions.Region:
        if not warm.narrow_top_k:
            return {}
        return regions.narrow(distributions, [params for _, params in self.top[: warm.narrow_top_k]], warm.margin)

    def as_record(self) -> dict[str, Any]:
        return {"study": self.study, "top": [[number, params] for number, params in self.top], "fixed": self.fixed,
                "initFrom": self.init_from, "best": self.best_number}

    @classmethod
    def from_record(cls, found: dict[str, Any]) -> Source:
        return cls(found["study"], [(number, params) for number, params in found["top"]], found["fixed"], found["initFrom"], found["best"])


def load(warm: spec.WarmStart, objective: spec.Objective, own_storage: optuna.storages.BaseStorage, url: str | None,
         check_files: bool, stored: dict[str, Any] | None) -> Source:
    """Read and check the source study; raise spec.SpecError naming the field. A study that already
    read its source (``stored``) uses that record when the source is gone."""
    storage = own_storage if url is None else WriteThroughStorage(open_rdb(url))
    where = "this study's storage" if url is None else redact(url)
    try:
        source = optuna.load_study(study_name=warm.study, storage=storage)
    except KeyError:
        if stored is not None and stored.get("study") == warm.study:
            return Source.from_record(stored)
        # The names of the other studies are not listed: on a shared storage they belong to other tenants.
        raise spec.SpecError([("spec.warmStart.study", f"no study {warm.study!r} in {where}")]) from None
    source_objective = source.user_attrs.get(record.OBJECTIVE)
    direction = "maximize" if source.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    if (source_objective not in (None, objective.metric)) or direction != objective.direction:
        raise spec.SpecError([("spec.warmStart.study", f"study {warm.study!r} {direction}s {source_objective or 'its value'}, "
                               f"this one {objective.direction}s {objective.metric}: its results do not transfer")])
    sign = -1 if direction == "maximize" else 1
    complete = sorted(source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (sign * t.value, t.number))
    if not complete:
        raise spec.SpecError([("spec.warmStart.study", f"study {warm.study!r} has no complete trial to start from")])
    best = complete[0]
    missing = [name for name in warm.fixed if name not in best.params]
    if missing:
        raise spec.SpecError([("spec.warmStart.fixed", f"the best trial ({best.number}) of {warm.study!r} has no parameter "
                               f"{', '.join(map(repr, missing))}; it has {', '.join(sorted(best.params))}")])
    fixed = {name: best.params[name] for name in warm.fixed}
    init_from = None
    if warm.init_from == "best":
        init_from = record.kept_checkpoints(source.user_attrs).get(str(best.number))
        if not init_from:
            raise spec.SpecError([("spec.warmStart.initFrom", f"the best trial ({best.number}) of {warm.study!r} kept no checkpoint; "
                                   "run the source with spec.checkpoints.keepBest >= 1")])
        if check_files and not Path(init_from).is_file():
            raise spec.SpecError([("spec.warmStart.initFrom", f"checkpoint {init_from} of trial {best.number} of {warm.study!r} "
                                   "does not exist (moved or deleted?)")])
    top = [(t.number, dict(t.params)) for t in complete[: max(warm.top_k, warm.narrow_top_k, 1)]]
    return Source(warm.study, top, fixed, init_from, best.number)


def pin(warm: spec.WarmStart, own_storage: optuna.storages.BaseStorage, url: str | None, consumer: str, number: int) -> None:
    """Mark the source's checkpoint as used by ``consumer``, so the source's cleanup keeps it."""
    storage = own_storage if url is None else WriteThroughStorage(open_rdb(url))
    source = optuna.load_study(study_name=warm.study, storage=storage)
    pins = dict(source.user_attrs.get(record.CHECKPOINT_PINS, {}))
    if pins.get(consumer) != number:
        source.set_user_attr(record.CHECKPOINT_PINS, {**pins, consumer: number})


def enqueue_top(study: optuna.Study, source: Source, top_k: int, distributions: dict[str, BaseDistribution],
                attrs: dict[str, Any]) -> int:
    """Queue the source's best ``top_k`` configurations (the parameters this study searches, where they fit its
    ranges), with ``fixed`` parameters at the source's best values."""
    for number, found in source.top[:top_k]:
        params = {name: value for name, value in found.items()
                  if name in distributions and regions.contains({name: distributions[name]}, {name: value})}
        params.update({name: value for name, value in source.fixed.items() if name in distributions})  # fixed wins
        study.enqueue_trial(params, user_attrs={**attrs, record.WARM_START_FROM: f"{source.study}#{number}"}, skip_if_exists=False)
    return min(top_k, len(source.top))


def report(study: optuna.Study, source: Source, maximize: bool) -> str | None:
    """How the source's configurations did here against the study's own, for the user to judge the transfer."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    queued = [t.value for t in complete if record.WARM_START_FROM in t.user_attrs]
    own = [t.value for t in complete if record.WARM_START_FROM not in t.user_attrs]
    pick = max if maximize else min
    parts = [f"warm start from {source.study}"]
    if queued:
        parts.append(f"its {len(queued)} configurations scored best {pick(queued):.4g} here")
    if own:
        parts.append(f"this study's own {len(own)} trials best {pick(own):.4g}")
    if queued and own:
        ahead = pick(queued) == pick(queued + own)
        parts.append("the source's configurations stayed ahead" if ahead else "the search here found better than the source's")
    if source.init_from:
        parts.append(f"every run started from its checkpoint {source.init_from}")
    return "; ".join(parts) if len(parts) > 1 else None
