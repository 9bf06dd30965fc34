"""Optuna storage that reads from memory and writes through to the database.

The engine is the only writer of its study's storage, so it never needs to
re-read the database: every read is served from an ``InMemoryStorage`` mirror,
and every write is committed to the RDB storage first (so a kill at any moment
loses nothing that was acknowledged) and then applied to the mirror. A study
is loaded from the database once, when it is first opened.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import Any

import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)


class StorageUnavailable(RuntimeError):
    """The study database cannot be reached; carries the URL (without password) and the cause."""


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show nothing secret
        return url.split("@")[-1]


def open_rdb(url: str) -> RDBStorage:
    """An RDBStorage tuned for one writer: SQLite in WAL mode, survives SIGKILL."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 30}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        rdb = RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=False)
    except Exception as exc:  # sqlalchemy raises many types; the user needs the cause
        raise StorageUnavailable(f"cannot open study storage {redact(url)}: {exc}") from exc
    if url.startswith("sqlite"):
        sqlalchemy.event.listen(rdb.engine, "connect", _sqlite_pragmas)
        rdb.engine.dispose()  # connections opened during setup lack the pragmas
    return rdb


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    # WAL + NORMAL: a committed transaction survives the process being killed;
    # only a power cut can lose the last commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class WriteThroughStorage(BaseStorage):
    """BaseStorage over an RDBStorage with an in-memory mirror for reads."""

    def __init__(self, rdb: RDBStorage):
        self.rdb = rdb
        self._memory = InMemoryStorage()
        self._study_ids: dict[int, int] = {}  # memory study id -> database study id
        self._trial_ids: dict[int, int] = {}  # memory trial id -> database trial id

    # -- studies ------------------------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        db_id = self.rdb.create_new_study(directions, study_name)
        name = self.rdb.get_study_name_from_id(db_id)
        memory_id = self._memory.create_new_study(directions, name)
        self._study_ids[memory_id] = db_id
        return memory_id

    def get_study_id_from_name(self, study_name: str) -> int:
        try:
            return self._memory.get_study_id_from_name(study_name)
        except KeyError:
            pass
        db_id = self.rdb.get_study_id_from_name(study_name)  # KeyError when absent, as Optuna expects
        return self._load_study(db_id, study_name)

    def _load_study(self, db_id: int, name: str) -> int:
        memory_id = self._memory.create_new_study(self.rdb.get_study_directions(db_id), name)
        self._study_ids[memory_id] = db_id
        for key, value in self.rdb.get_study_user_attrs(db_id).items():
            self._memory.set_study_user_attr(memory_id, key, value)
        for key, value in self.rdb.get_study_system_attrs(db_id).items():
            self._memory.set_study_system_attr(memory_id, key, value)
        for trial in sorted(self.rdb.get_all_trials(db_id, deepcopy=False), key=lambda t: t.number):
            memory_trial = self._memory.create_new_trial(memory_id, template_trial=trial)
            self._trial_ids[memory_trial] = trial._trial_id
        return memory_id

    def delete_study(self, study_id: int) -> None:
        self.rdb.delete_study(self._study_ids.pop(study_id))
        self._memory.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.rdb.set_study_user_attr(self._study_ids[study_id], key, value)
        self._memory.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.rdb.set_study_system_attr(self._study_ids[study_id], key, value)
        self._memory.set_study_system_attr(study_id, key, value)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._memory.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._memory.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._memory.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._memory.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self.rdb.get_all_studies()

    # -- trials -------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        db_trial = self.rdb.create_new_trial(self._study_ids[study_id], template_trial)
        memory_trial = self._memory.create_new_trial(study_id, template_trial)
        self._trial_ids[memory_trial] = db_trial
        return memory_trial

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution) -> None:
        self.rdb.set_trial_param(self._trial_ids[trial_id], param_name, param_value_internal, distribution)
        self._memory.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        changed = self.rdb.set_trial_state_values(self._trial_ids[trial_id], state, values)
        if changed:
            self._memory.set_trial_state_values(trial_id, state, values)
        return changed

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.rdb.set_trial_intermediate_value(self._trial_ids[trial_id], step, intermediate_value)
        self._memory.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.rdb.set_trial_user_attr(self._trial_ids[trial_id], key, value)
        self._memory.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.rdb.set_trial_system_attr(self._trial_ids[trial_id], key, value)
        self._memory.set_trial_system_attr(trial_id, key, value)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._memory.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._memory.get_trial_number_from_id(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._memory.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._memory.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._memory.get_n_trials(study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._memory.get_best_trial(study_id)
