"""Optuna storage that reads from memory and writes through to the database.

The engine is the only writer of its study's storage, so it never needs to
re-read the database: every read is served from an ``InMemoryStorage`` mirror,
loaded from the database once when the study is opened. Every write goes to
the mirror and is committed to the database before the call returns -- or,
inside ``batch()``, with the other writes of the batch in one transaction when
the batch ends. Trial writes are plain SQL inserts and updates on Optuna's own
schema, so any Optuna tool still reads the study; that is what makes a trial
cost a few milliseconds instead of Optuna's ORM round trips per value.

Commits, and their retries while the database is unreachable, never run on an
asyncio event loop: every transaction goes to the storage's one writer thread,
in the order the writes were made. A caller outside an event loop waits for its
transaction (the call returns once it is committed, as before); a caller on an
event loop (the engine) goes on at once, reading its writes from the mirror, and
``await storage.flushed()`` waits until everything written so far is committed.
So one study's database outage holds up only that study, never the other
studies of the process, nor the loop they share.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)


RETRY_ENV = "SPEECHTUNE_STORAGE_RETRY_SECONDS"  # the retry window, for `speechtune run` and the operator alike
DEFAULT_RETRY_SECONDS = 60.0
RETRY_MAX_DELAY = 2.0  # retries 0.5 s after the first failure, doubling to 2 s: back within 2 s of the database
WRITER_IDLE_SECONDS = 30.0  # a writer thread with nothing to do for this long ends; the next write starts another

Operation = Callable[[sqlalchemy.Connection], None]


class StorageUnavailable(RuntimeError):
    """The study database cannot be reached; carries the URL (without password) and the cause."""


def retry_seconds_from_env() -> float:
    """The retry window: ``SPEECHTUNE_STORAGE_RETRY_SECONDS`` when set to a number >= 0, else 60 s."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        log.warning("%s=%r is not a number of seconds >= 0; using %.0f s", RETRY_ENV, raw, DEFAULT_RETRY_SECONDS)
        return DEFAULT_RETRY_SECONDS
    return value


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _unreachable(error: sqlalchemy.exc.DBAPIError) -> bool:
    """The database is away (refused, reset, restarting), as opposed to refusing what was written."""
    return isinstance(error, sqlalchemy.exc.OperationalError) or error.connection_invalidated


class _Unit:
    """One transaction for the writer thread; ``deferred``: its caller did not wait for it (an event loop)."""

    __slots__ = ("operations", "future", "deferred")

    def __init__(self, operations: list[Operation], deferred: bool):
        self.operations = operations
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.deferred = deferred


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

    def __init__(self, rdb: RDBStorage, retry_seconds: float | None = None):
        """``retry_seconds``: how long commits are retried while the database is unreachable, from the first
        failure (default: ``SPEECHTUNE_STORAGE_RETRY_SECONDS``, else 60 s)."""
        self.rdb = rdb
        self.retry_seconds = retry_seconds_from_env() if retry_seconds is None else retry_seconds
        self._memory = InMemoryStorage()
        self._study_ids: dict[int, int] = {}  # memory study id -> database study id
        self._trial_ids: dict[int, int] = {}  # memory trial id -> database trial id (written by the writer thread)
        self._trial_study: dict[int, int] = {}  # memory trial id -> memory study id
        self._pending: list[Operation] | None = None
        self._states: dict[int, dict[TrialState, int]] = {}  # study -> trials per state, kept as writes happen
        self._outage_since: float | None = None  # when the current run of failed commits began (writer thread only)
        self._retrying = False  # the writer's transaction is a retry: its last try may have committed unbeknown to us
        # The writer: one thread commits the queued transactions in order (started on demand, ends when idle).
        self._lock = threading.Condition()
        self._queue: collections.deque[_Unit] = collections.deque()
        self._writer: threading.Thread | None = None
        self._last: concurrent.futures.Future[None] | None = None  # the newest transaction queued
        self._broken: StorageUnavailable | None = None  # a transaction no caller waited for failed: no more writes

    def __getstate__(self) -> dict[str, Any]:  # Optuna's storages pickle; the writer's thread and lock do not
        self._drain()
        state = self.__dict__.copy()
        for name in ("_lock", "_queue", "_writer", "_last", "_broken"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Condition()
        self._queue = collections.deque()
        self._writer = None
        self._last = None
        self._broken = None

    def state_counts(self, study_id: int) -> dict[TrialState, int]:
        """Trials per state in O(1): the engine asks on every loop turn."""
        return dict(self._states.setdefault(study_id, {state: 0 for state in TrialState}))

    def _count(self, study_id: int, old: TrialState | None, new: TrialState, trial_id: int | None = None) -> None:
        if trial_id is not None:
            self._trial_study[trial_id] = study_id
        counts = self._states.setdefault(study_id, {state: 0 for state in TrialState})
        if old is not None:
            counts[old] -= 1
        counts[new] += 1

    # -- durability ---------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Commit the writes made inside the block in one transaction, at its end."""
        if self._pending is not None:
            yield
            return
        self._pending = []
        try:
            yield
        finally:
            operations, self._pending = self._pending, None
            self._submit(operations)

    def _write(self, operation: Operation) -> None:
        if self._pending is not None:
            self._pending.append(operation)
        else:
            self._submit([operation])

    def _flush(self) -> None:
        if self._pending:
            operations, self._pending = self._pending, []
            self._submit(operations)

    def _submit(self, operations: list[Operation]) -> None:
        """Hand one transaction to the writer thread. Outside an event loop, wait until it is committed (its
        error, StorageUnavailable after the retry window, is the caller's); on an event loop, return at once."""
        if not operations:
            return
        unit = _Unit(operations, deferred=_on_event_loop())
        with self._lock:
            if self._broken is not None:
                raise self._fresh_broken()
            self._queue.append(unit)
            self._last = unit.future
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name=f"storage-writer-{id(self):x}", daemon=True)
                self._writer.start()
            self._lock.notify()
        if not unit.deferred:
            unit.future.result()

    async def flushed(self) -> None:
        """Until every write made so far is committed, without blocking the event loop; StorageUnavailable when
        a write could not be committed (the database stayed unreachable for the retry window): what was
        committed before is in the database, what was written after is not, and the storage takes no more."""
        with self._lock:
            last = self._last
        if last is not None and not last.done():
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: object) -> None:
                try:
                    loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

            last.add_done_callback(wake)
            await waiter
        if self._broken is not None:
            raise self._fresh_broken()

    def _drain(self) -> None:
        """Until every write made so far is committed, blocking: for the rare calls that go to Optuna's storage."""
        self._flush()
        with self._lock:
            last = self._last
        if last is not None:
            concurrent.futures.wait([last])
        if self._broken is not None:
            raise self._fresh_broken()

    def _fresh_broken(self) -> StorageUnavailable:
        assert self._broken is not None
        error = StorageUnavailable(*self._broken.args)  # one instance per raise: tracebacks do not pile up
        error.__cause__ = self._broken.__cause__
        return error

    def _write_queued(self) -> None:
        """The writer thread: commit the queued transactions in order."""
        while True:
            with self._lock:
                if not self._queue:
                    self._lock.wait(WRITER_IDLE_SECONDS)
                    if not self._queue:
                        self._writer = None
                        return
                unit = self._queue[0]
            try:
                self._commit(unit.operations)
            except Exception as error:
                failed = [unit]
                with self._lock:
                    self._queue.popleft()
                    if unit.deferred:  # its caller went on: the mirror holds what the database lacks, so stop here
                        if isinstance(error, StorageUnavailable):
                            self._broken = error
                        else:
                            self._broken = StorageUnavailable(
                                f"study storage {redact(str(self.rdb.engine.url))} refused a write "
                                f"({type(error).__name__}: {error}); nothing committed before it was lost")
                            self._broken.__cause__ = error
                        failed += self._queue
                        self._queue.clear()
                        log.error("%s; %d transaction(s) not committed, and this storage takes no more writes",
                                  self._broken, len(failed))
                for each in failed:
                    each.future.set_exception(self._broken if each.deferred and self._broken is not None else error)
            else:
                with self._lock:
                    self._queue.popleft()
                unit.future.set_result(None)

    def _commit(self, operations: list[Operation]) -> None:
        """Run the writes in one transaction; retry while the database is unreachable. Writer thread only."""
        delay = 0.5
        self._retrying = False
        while True:
            try:
                with self.rdb.engine.begin() as connection:
                    for operation in operations:
                        operation(connection)
                self._outage_since = None
                return
            except sqlalchemy.exc.DBAPIError as exc:
                if not _unreachable(exc):
                    raise
                # A connection lost during COMMIT leaves it unknown whether the transaction landed: the retry
                # must not insert a row twice, so it updates rows that are there (_put, _insert_trial).
                self._retrying = True
                # One window per storage (one study), from the first failed commit: commits that fail later in
                # the same outage do not extend it. The last try is at the window's end, then it fails.
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                deadline = self._outage_since + self.retry_seconds
                if now >= deadline - 0.001:
                    raise StorageUnavailable(
                        f"study storage {redact(str(self.rdb.engine.url))} unreachable for {self.retry_seconds:.0f} s; "
                        f"everything committed before is kept: {exc.orig or exc}"
                    ) from exc
                wait = min(delay, deadline - now)
                log.warning("study storage unreachable, retrying in %.1f s: %s", wait, exc.orig or exc)
                time.sleep(wait)
                delay = min(delay * 2, RETRY_MAX_DELAY)

    def _put(self, connection: sqlalchemy.Connection, table: sqlalchemy.Table, key: dict[str, Any], values: dict[str, Any]) -> None:
        """Insert a row; on a retry, update it instead if the last try did land. (This storage is its study's only
        writer, so nothing else adds the row in between.)"""
        if self._retrying:
            where = sqlalchemy.and_(*(table.c[name] == value for name, value in key.items()))
            if connection.execute(table.update().where(where).values(**values)).rowcount:
                return
        connection.execute(table.insert().values(**key, **values))

    def _insert_trial(self, connection: sqlalchemy.Connection, db_study: int, number: int, row: dict[str, Any]) -> int:
        """The trial's row (a retry finds the one its last try may have committed: no study has a number twice)."""
        table = models.TrialModel.__table__
        if self._retrying:
            found = connection.execute(sqlalchemy.select(table.c.trial_id).where(
                (table.c.study_id == db_study) & (table.c.number == number))).scalar()
            if found is not None:
                connection.execute(table.update().where(table.c.trial_id == found).values(**row))
                return found
        return connection.execute(table.insert().values(study_id=db_study, number=number, **row)).inserted_primary_key[0]

    # -- studies (opening and deleting are rare: straight to Optuna's RDBStorage) ----
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
            self._count(memory_id, None, trial.state, memory_trial)
        return memory_id

    def delete_study(self, study_id: int) -> None:
        self._drain()
        self.rdb.delete_study(self._study_ids[study_id])
        self._study_ids.pop(study_id)
        self._memory.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        value_json = json.dumps(value)
        existed = key in self._memory.get_study_user_attrs(study_id)  # KeyError for an unknown study
        self._memory.set_study_user_attr(study_id, key, value)
        self._write_study_attr(models.StudyUserAttributeModel.__table__, study_id, key, value_json, existed)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        value_json = json.dumps(value)
        existed = key in self._memory.get_study_system_attrs(study_id)
        self._memory.set_study_system_attr(study_id, key, value)
        self._write_study_attr(models.StudySystemAttributeModel.__table__, study_id, key, value_json, existed)

    def _write_study_attr(self, table: sqlalchemy.Table, study_id: int, key: str, value_json: str, existed: bool) -> None:
        db_study = self._study_ids[study_id]

        def write(connection: sqlalchemy.Connection) -> None:
            if existed:
                connection.execute(table.update().where((table.c.study_id == db_study) & (table.c.key == key)).values(value_json=value_json))
            else:
                self._put(connection, table, {"study_id": db_study, "key": key}, {"value_json": value_json})

        self._write(write)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._memory.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._memory.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._memory.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._memory.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        """Every study in the database, under the ids this storage's other methods take (studies not
        yet read are loaded): Optuna's readers (copy_study, study summaries) pass these ids back."""
        self._drain()
        memory_ids = {db_id: memory_id for memory_id, db_id in self._study_ids.items()}
        studies = []
        for frozen in self.rdb.get_all_studies():
            memory_id = memory_ids.get(frozen._study_id)
            if memory_id is None:
                memory_id = self._load_study(frozen._study_id, frozen.study_name)
            studies.append(FrozenStudy(study_name=frozen.study_name, direction=None, directions=frozen.directions,
                                       user_attrs=frozen.user_attrs, system_attrs=frozen.system_attrs, study_id=memory_id))
        return studies

    # -- trial writes: memory first (it validates), then SQL ------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        memory_trial = self._memory.create_new_trial(study_id, template_trial)
        frozen = self._memory.get_trial(memory_trial)  # copy-on-write: what it holds now stays
        self._count(study_id, None, frozen.state, memory_trial)
        db_study = self._study_ids[study_id]
        rows = _template_rows(frozen) if template_trial is not None else []  # enqueued trials: all they carry

        def insert(connection: sqlalchemy.Connection) -> None:
            db_trial = self._insert_trial(connection, db_study, frozen.number, {
                "state": frozen.state, "datetime_start": _utc(frozen.datetime_start), "datetime_complete": _utc(frozen.datetime_complete),
            })
            self._trial_ids[memory_trial] = db_trial
            for table, key, values in rows:
                self._put(connection, table, {"trial_id": db_trial, **key}, values)

        self._write(insert)
        return memory_trial

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution) -> None:
        self._memory.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        row = {"param_value": param_value_internal, "distribution_json": distribution_to_json(distribution)}
        self._write(lambda c: self._put(c, models.TrialParamModel.__table__, {"trial_id": self._trial_ids[trial_id], "param_name": param_name}, row))

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        before = self._memory.get_trial(trial_id).state
        if not self._memory.set_trial_state_values(trial_id, state, values):
            return False
        frozen = self._memory.get_trial(trial_id)
        self._count(self._trial_study[trial_id], before, state)
        table = models.TrialModel.__table__
        change: dict[str, Any] = {"state": state}
        if state == TrialState.RUNNING:
            change["datetime_start"] = _utc(frozen.datetime_start)
        if state.is_finished():
            change["datetime_complete"] = _utc(frozen.datetime_complete)
        rows = [models.TrialValueModel.value_to_stored_repr(value) for value in values or ()]

        def update(connection: sqlalchemy.Connection) -> None:
            db_trial = self._trial_ids[trial_id]
            connection.execute(table.update().where(table.c.trial_id == db_trial).values(**change))
            for objective, (stored, kind) in enumerate(rows):
                self._put(connection, models.TrialValueModel.__table__, {"trial_id": db_trial, "objective": objective},
                          {"value": stored, "value_type": kind})

        self._write(update)
        return True

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        existed = step in self._memory.get_trial(trial_id).intermediate_values
        self._memory.set_trial_intermediate_value(trial_id, step, intermediate_value)
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        table = models.TrialIntermediateValueModel.__table__
        row = {"intermediate_value": stored, "intermediate_value_type": kind}

        def write(connection: sqlalchemy.Connection) -> None:
            db_trial = self._trial_ids[trial_id]
            if existed:
                connection.execute(table.update().where((table.c.trial_id == db_trial) & (table.c.step == step)).values(**row))
            else:
                self._put(connection, table, {"trial_id": db_trial, "step": step}, row)

        self._write(write)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        existed = key in self._memory.get_trial(trial_id).user_attrs
        self._memory.set_trial_user_attr(trial_id, key, value)
        self._write_attr(models.TrialUserAttributeModel.__table__, trial_id, key, value, existed)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        existed = key in self._memory.get_trial(trial_id).system_attrs
        self._memory.set_trial_system_attr(trial_id, key, value)
        self._write_attr(models.TrialSystemAttributeModel.__table__, trial_id, key, value, existed)

    def _write_attr(self, table: sqlalchemy.Table, trial_id: int, key: str, value: Any, existed: bool) -> None:
        value_json = json.dumps(value)

        def write(connection: sqlalchemy.Connection) -> None:
            db_trial = self._trial_ids[trial_id]
            if existed:
                connection.execute(table.update().where((table.c.trial_id == db_trial) & (table.c.key == key)).values(value_json=value_json))
            else:
                self._put(connection, table, {"trial_id": db_trial, "key": key}, {"value_json": value_json})

        self._write(write)

    # -- reads: memory only ---------------------------------------------------
    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._memory.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._memory.get_trial_number_from_id(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._memory.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._memory.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._memory.get_best_trial(study_id)


def _template_rows(frozen: FrozenTrial) -> list[tuple[sqlalchemy.Table, dict[str, Any], dict[str, Any]]]:
    """The rows besides the trial's own that Optuna's schema keeps for a trial made from a template:
    (table, key besides trial_id, values)."""
    rows: list[tuple[sqlalchemy.Table, dict[str, Any], dict[str, Any]]] = []
    for objective, value in enumerate(frozen.values or ()):
        stored, kind = models.TrialValueModel.value_to_stored_repr(value)
        rows.append((models.TrialValueModel.__table__, {"objective": objective}, {"value": stored, "value_type": kind}))
    for name, value in frozen.params.items():
        distribution = frozen.distributions[name]
        rows.append((models.TrialParamModel.__table__, {"param_name": name},
                     {"param_value": distribution.to_internal_repr(value), "distribution_json": distribution_to_json(distribution)}))
    for table, attrs in ((models.TrialUserAttributeModel.__table__, frozen.user_attrs),
                         (models.TrialSystemAttributeModel.__table__, frozen.system_attrs)):
        rows.extend((table, {"key": key}, {"value_json": json.dumps(value)}) for key, value in attrs.items())
    for step, value in frozen.intermediate_values.items():
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
        rows.append((models.TrialIntermediateValueModel.__table__, {"step": step},
                     {"intermediate_value": stored, "intermediate_value_type": kind}))
    return rows


def _utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """Optuna's RDB schema keeps naive UTC; FrozenTrials carry naive local time."""
    return None if moment is None else moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
