"""A stage's handoff: what it takes from the best trial of earlier stages (seed sections 5 and 11).

Staged TTS tuning trains a vocoder on the best acoustic model of the stage before, frozen; a
weight-sharing architecture search hands its derived architecture to a stage that retrains it.
So a stage with ``handoff`` takes, when it starts, the best complete trial of the stages named in
``from``: its kept checkpoint, passed to every run as ``--<checkpointFlag>=<file>``, and/or the
parameters its final protocol line reported (``params``), passed as flags. What it took is
recorded in the stage's record (study user attr ``stages``) at once, so a restarted engine hands
on the same thing, and posted as a ``handoff`` event. A handoff with nothing to take ends the
study Failed, naming the field: running the stage without it would tune the wrong thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial

from speechtune import record, spec

if TYPE_CHECKING:
    from speechtune.executor import Executor


class HandoffError(Exception):
    """The earlier stages have nothing to hand on; the message names the field and why."""


def take(executor: Executor, stage: spec.Stage, index: int, best: list[FrozenTrial]) -> dict[str, Any]:
    """The record of what ``stage`` takes from ``best`` (the best trial of its handoff's stages, or none)."""
    handoff = stage.handoff
    assert handoff is not None
    path = f"spec.stages[{index}].handoff"
    sources = ", ".join(handoff.stages)
    if not best:
        raise HandoffError(f"{path}.from: stage {sources} has no complete trial to hand on to stage {stage.name}")
    trial = best[0]
    taken: dict[str, Any] = {"from": list(handoff.stages), "trial": trial.number, "value": trial.value}
    if handoff.checkpoint_flag:
        checkpoint = record.kept_checkpoints(executor.study.user_attrs).get(str(trial.number)) or record.checkpoint(trial)
        if not checkpoint:
            raise HandoffError(f"{path}.checkpointFlag: trial {trial.number}, the best of {sources}, kept no checkpoint "
                               "(does its trainer write last.ckpt into --checkpoint_dir?)")
        if executor.checkpoint_files_here and not Path(checkpoint).is_file():
            raise HandoffError(f"{path}.checkpointFlag: checkpoint {checkpoint} of trial {trial.number}, the best of {sources}, "
                               "is not there any more")
        taken.update(flag=handoff.checkpoint_flag, checkpoint=checkpoint)
    if handoff.params:
        reported = trial.user_attrs.get(record.REPORTED_PARAMS)
        if not reported:
            raise HandoffError(f"{path}.params: trial {trial.number}, the best of {sources}, reported no params on its final "
                               'protocol line ({"speechtune": 1, "final": true, ..., "params": {...}})')
        sampled = {param.name for param in stage.space(executor.spec.search_space)}
        clash = sorted(set(reported) & sampled)
        if clash:
            raise HandoffError(f"{path}.params: trial {trial.number} reported {clash}, which stage {stage.name} also samples; "
                               "a handed-on parameter is held, not searched")
        taken["params"] = dict(reported)
    return taken


def overrides(taken: dict[str, Any]) -> dict[str, Any]:
    """The flags a stage's runs get from what it took (empty for a stage without a handoff)."""
    flags = dict(taken.get("params", {}))
    if taken.get("flag"):
        flags[taken["flag"]] = taken["checkpoint"]
    return flags


def describe(stage: str, taken: dict[str, Any]) -> str:
    parts = []
    if taken.get("flag"):
        parts.append(f"its checkpoint as --{taken['flag']}={taken['checkpoint']}")
    if taken.get("params"):
        parts.append("its reported " + " ".join(f"{name}={value}" for name, value in taken["params"].items()))
    return (f"stage {stage} takes trial {taken['trial']} (the best of {', '.join(taken['from'])}, "
            f"{taken['value']:.4g}): {' and '.join(parts)}")
