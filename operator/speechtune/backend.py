"""The one interface between the engine and whatever runs trials.

A backend launches a trial, hands back its output lines from the start, says
how it ended, and stops it. The local backend runs subprocesses; the
Kubernetes backend runs Jobs and reads pod logs. The engine never knows which.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from speechtune import spec

PARAMS_ENV = "SPEECHTUNE_PARAMS"


@dataclass(frozen=True)
class TrialLaunch:
    """Everything needed to start one trial, independent of where it runs."""

    study: str
    number: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    params: Mapping[str, Any]  # the sampled parameters
    template: spec.TrialTemplate = field(repr=False)
    attempt: str = ""  # names one of several runs of a trial: a fidelity level, a validation seed
    rung: int = 0  # the fidelity level index the run is at (0 without a ladder); the operator labels Jobs with it
    overrides: Mapping[str, Any] = field(default_factory=dict)  # a fidelity level's, which win over params

    @property
    def values(self) -> dict[str, Any]:
        """What the trainer gets: the parameters, then the overrides."""
        return {**self.params, **self.overrides}

    @property
    def run_name(self) -> str:
        return f"trial-{self.number}" + (f"-{self.attempt}" if self.attempt else "")


@dataclass(frozen=True)
class Exit:
    """How a trial's process ended. ``reason`` is empty on success."""

    succeeded: bool
    exit_code: int | None = None
    reason: str = ""
    message: str = ""


class TrialRun(Protocol):
    def lines(self) -> AsyncIterator[bytes]:
        """Every output line from the start; ends when the trial's output ends."""

    async def wait(self) -> Exit:
        """Wait for the trial to end and say how."""

    async def stop(self) -> None:
        """Stop the trial (pruned, or the study is over); idempotent."""


class Backend(Protocol):
    # How long after a runner dies a launch it began can still take effect (a create request
    # in flight to an API server); a restarted engine waits that long before calling it lost.
    recovery_grace_seconds: float
    # Optional: the errors that mean the backend's own infrastructure is away (an API server), which
    # stop the engine (it is restarted and re-attaches) instead of failing the trial whose run met them.
    unavailable: tuple[type[BaseException], ...]

    async def launch(self, launch: TrialLaunch) -> TrialRun:
        """Start a trial. Launching the same study and number twice starts it once."""

    async def attach(self, study: str, number: int, attempt: str = "") -> TrialRun | None:
        """Reconnect to a trial started by an earlier engine, or None if it is gone."""


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def build_launch(study: str, number: int, template: spec.TrialTemplate, params: Mapping[str, Any],
                 overrides: Mapping[str, Any] | None = None, attempt: str = "", rung: int = 0) -> TrialLaunch:
    """The trial's argv and env: template args, then one ``--name=value`` flag per parameter.

    Parameters come last so that they override the template's own flags, and
    ``overrides`` (e.g. a fidelity level) come after the sampled parameters.
    """
    values = {**params, **(overrides or {})}
    flags = tuple(f"--{name}={format_value(value)}" for name, value in values.items())
    env = {
        **template.env,
        PARAMS_ENV: json.dumps(values, sort_keys=True),
        "SPEECHTUNE_STUDY": study,
        "SPEECHTUNE_TRIAL": str(number),
        "SPEECHTUNE_ATTEMPT": attempt,
    }
    return TrialLaunch(study=study, number=number, argv=template.command + template.args + flags, env=env,
                       params=dict(params), template=template, attempt=attempt, rung=rung, overrides=dict(overrides or {}))
