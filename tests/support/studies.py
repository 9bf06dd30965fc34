"""Helpers for tests that watch a study from outside the process running it."""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial


def wait_for_trials(url: str, study: str, ready: Callable[[list[FrozenTrial]], bool], timeout: float = 90) -> list[FrozenTrial]:
    """Poll the storage until ``ready(trials)``; the study may not exist yet when this starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name=study, storage=url).trials
        except KeyError:
            continue
        if ready(trials):
            return trials
    raise TimeoutError(f"study {study!r} in {url} did not get ready in {timeout} s")
