"""One study's life in the operator: spec -> storage -> engine, and engine state -> status.

Level-based: every pass reads the object as it is now. A budget change is
handed to the running engine; any other spec change restarts the engine,
which re-attaches to the Jobs still running. The engine and its trials carry
on without the operator's attention; this loop only mirrors their state into
the study's and the Trials' status, and turns the engine's events into
Kubernetes Events. With spec.fidelity the engine is the ladder's (the same
loop, scheduling level runs), and its rungs, proxy correlations and seed
validation go into status too; with spec.stages, each stage's state and result
(status.stages, status.currentStage). spec.warmStart.study is resolved here: a
SpeechTuningStudy of the namespace is waited for until it ends and stands for
its Optuna study.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import optuna
import sqlalchemy

from speechtune import record, spec
from speechtune.executor import Event, Executor
from speechtune.k8s import metrics, retention, status, studyspec
from speechtune.k8s.api import Api, ApiError, path
from speechtune.k8s.backend import KubernetesJobBackend
from speechtune.k8s.dispatch import URL_ENV as DISPATCH_URL_ENV
from speechtune.k8s.dispatch import Dispatch
from speechtune.k8s.manifests import API_VERSION, STUDY_KIND, JobOptions, Owner, checkpoint_root, trial_name
from speechtune.k8s.workers import KubernetesWorkerBackend
from speechtune.schedulers import handoff
from speechtune.schedulers.ladder import Ladder
from speechtune.schedulers.stages import Stages, announcement
from speechtune.storage import StorageUnavailable, WriteThroughStorage, open_rdb, redact

log = logging.getLogger(__name__)

STORAGE_ENV = "SPEECHTUNE_STORAGE_URL"
TRIAL_SERVICE_ACCOUNT_ENV = "SPEECHTUNE_TRIAL_SERVICE_ACCOUNT"  # set by the chart when it creates that account
SYNC_SECONDS = 1.0  # how often running trials' progress reaches their status
RETRY_SECONDS = 10.0  # after a storage or API problem
API_ERRORS = (ApiError, aiohttp.ClientError, asyncio.TimeoutError)  # the API server refused, is away or restarts
API_PROBE_SECONDS = (0.5, 2.0)  # after the API server failed the engine: ask for the study again, doubling to 2 s
STATUS_RETRY_SECONDS = (0.5, 10.0)  # a status write that failed is sent again after 0.5 s, doubling to 10 s
PATCH_CONCURRENCY = 16

STAGE_EVENTS = ("stage-started", "handoff", "stage-finished")  # posted from the stage records, once each: see _post_stage_events
EVENTS = {  # engine event -> (Kubernetes event type, reason)
    "started": ("Normal", "TrialStarted"),
    "pruned": ("Normal", "TrialPruned"),
    "completed": ("Normal", "TrialCompleted"),
    "promoted": ("Normal", "TrialPromoted"),
    "level-done": ("Normal", "TrialLevelCompleted"),
    "proxy-unreliable": ("Warning", "ProxyUnreliable"),
    "proxy-costly": ("Warning", "ProxyCostly"),
    "validated": ("Normal", "StudyValidated"),
    "failed": ("Warning", "TrialFailed"),
    "study-failed": ("Warning", "StudyFailed"),
    "study-succeeded": ("Normal", "StudySucceeded"),
    "stage-started": ("Normal", "StageStarted"),
    "stage-finished": ("Normal", "StageFinished"),
    "handoff": ("Normal", "Handoff"),
    "warm-started": ("Normal", "WarmStarted"),
    "warm-start-report": ("Normal", "WarmStartReport"),
}


class StorageProblem(RuntimeError):
    """The study's storage cannot be found, may not be used, or cannot be opened; ``reason`` goes into the
    Ready condition, ``field`` names the spec field. The message is public (it goes into status): it never
    holds a Secret's value, nor a connection error's text (that goes to the operator's log)."""

    def __init__(self, reason: str, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.reason = reason
        self.field = field
        self.message = message


# -- who may point the operator where (docs/operator.md, "Threat model: who may do what") ---------------
STORAGE_LABEL = "speechtune.io/storage"  # a Secret opts in to being read as a study's storage with the value "true"
STUDY_URL_SCHEMES_ENV = "SPEECHTUNE_STUDY_URL_SCHEMES"  # the chart's storage.allowStudyUrls.schemes, comma-separated
STUDY_URL_HOSTS_ENV = "SPEECHTUNE_STUDY_URL_HOSTS"  # its storage.allowStudyUrls.hosts: host or host:port, comma-separated
# Query parameters a study-supplied URL may carry: none that names another host, port, socket or file.
STUDY_URL_QUERY = frozenset({"sslmode", "connect_timeout", "application_name", "target_session_attrs"})
UNREACHABLE = "cannot connect to the study's storage: see the operator's log"  # all status says of a connection error


class StorageURL(str):
    """A storage URL that knows where it came from (``source``: a spec field, or the operator's default);
    its repr hides the password, so a traceback or a debug log shows none."""

    source: str

    def __new__(cls, value: str, source: str) -> StorageURL:
        url = super().__new__(cls, value)
        url.source = source
        return url

    def __repr__(self) -> str:
        return f"StorageURL({redact(str(self))!r}, source={self.source!r})"


def study_url_allow_list() -> tuple[frozenset[str], frozenset[str]]:
    """The schemes and hosts a study may name in spec.storage.url / spec.warmStart.storage.url (the chart sets
    them); either empty: study-supplied URLs are off."""
    def items(name: str) -> frozenset[str]:
        return frozenset(item.strip().lower() for item in os.environ.get(name, "").split(",") if item.strip())

    return items(STUDY_URL_SCHEMES_ENV), items(STUDY_URL_HOSTS_ENV)


def _host_allowed(host: str, port: int | None, allowed: frozenset[str]) -> bool:
    """``host`` (and ``port``) match an entry: ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``."""
    for entry in allowed:
        if entry.startswith("["):
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        else:
            name, entry_port = entry, ""
        if name == host.lower() and (not entry_port or entry_port == str(port or "")):
            return True
    return False


def checked_url(value: str, field: str, *, from_study: bool) -> StorageURL:
    """``value`` as a storage URL the operator may use, or StorageProblem naming ``field``.

    Every source: a database URL (a value that is none is never shown), and never SQLite, whose file
    would be in the operator's own filesystem, shared by every tenant. ``from_study`` (the URL is in
    the study's spec): only a scheme and host of the operator's allow-list, and no query parameter
    that points elsewhere.
    """
    try:
        url = sqlalchemy.engine.make_url(value)
    except Exception:  # sqlalchemy's own text may quote the value
        raise StorageProblem("InvalidStorageURL", field, "is not a database URL (the value is not shown)") from None
    scheme = url.drivername.lower()
    if scheme.split("+")[0] == "sqlite":
        raise StorageProblem("SQLiteRefused", field, "is SQLite, which the operator refuses: its file would be in the "
                             "operator's filesystem, shared by every tenant's studies; use PostgreSQL")
    if not from_study:
        return StorageURL(value, field)
    schemes, hosts = study_url_allow_list()
    if not (schemes and hosts):
        raise StorageProblem("StudyURLNotAllowed", field, "study-supplied storage URLs are off in this operator "
                             f"(its chart's storage.allowStudyUrls); use a secretRef to a Secret labelled {STORAGE_LABEL}=true")
    if scheme not in schemes:
        raise StorageProblem("StudyURLNotAllowed", field, f"scheme {scheme!r} is not in the operator's allow-list "
                             f"(storage.allowStudyUrls.schemes: {', '.join(sorted(schemes))})")
    if not url.host or not _host_allowed(url.host, url.port, hosts):
        raise StorageProblem("StudyURLNotAllowed", field, f"host {url.host or '(none)'}{f':{url.port}' if url.port else ''} "
                             f"is not in the operator's allow-list (storage.allowStudyUrls.hosts: {', '.join(sorted(hosts))})")
    extra = sorted(set(url.query) - STUDY_URL_QUERY)
    if extra:
        raise StorageProblem("StudyURLNotAllowed", field, f"query parameter {', '.join(extra)} is not allowed in a "
                             f"study's URL (only {', '.join(sorted(STUDY_URL_QUERY))})")
    return StorageURL(value, field)


def _secret_value(secret: dict[str, Any], storage: spec.Storage, field: str) -> str:
    """The URL in an opted-in Secret; StorageProblem (never with the value) otherwise."""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if labels.get(STORAGE_LABEL) != "true":
        raise StorageProblem("SecretNotOptedIn", f"{field}.secretRef.name",
                             f"Secret {storage.secret_name!r} lacks the label {STORAGE_LABEL}=\"true\": the operator "
                             f"reads only Secrets that opt in (kubectl label secret {storage.secret_name} {STORAGE_LABEL}=true)")
    data = (secret.get("data") or {}).get(storage.secret_key)
    if not data:
        raise StorageProblem("SecretKeyNotFound", f"{field}.secretRef.key", f"Secret {storage.secret_name!r} has no key {storage.secret_key!r}")
    try:
        return base64.b64decode(data).decode().strip()
    except (ValueError, UnicodeDecodeError):  # their text quotes the bytes
        raise StorageProblem("InvalidStorageURL", f"{field}.secretRef.key", f"key {storage.secret_key!r} of Secret "
                             f"{storage.secret_name!r} is not a database URL (the value is not shown)") from None


def optuna_study_name(namespace: str, name: str, uid: str) -> str:
    """Unique per object: a study deleted and created again starts afresh (the old one stays in storage)."""
    return f"{namespace}.{name}.{uid[:8]}"


async def storage_url(api: Api, namespace: str, storage: spec.Storage, field: str = "spec.storage") -> StorageURL:
    """``field``.url (within the operator's allow-list), else the Secret ``field``.secretRef names (one labelled
    speechtune.io/storage=true), else (for spec.storage) the operator's default; never SQLite."""
    if storage.url:
        return checked_url(storage.url, f"{field}.url", from_study=True)
    if storage.secret_name:
        secret = await api.get(path("secrets", namespace, storage.secret_name))
        if secret is None:
            raise StorageProblem("SecretNotFound", f"{field}.secretRef.name", f"Secret {storage.secret_name!r} not found in {namespace}")
        value = _secret_value(secret, storage, field)
        try:
            return checked_url(value, f"{field}.secretRef", from_study=False)
        except StorageProblem as problem:  # the key names where the value is
            raise StorageProblem(problem.reason, f"{field}.secretRef.key", f"key {storage.secret_key!r} of Secret "
                                 f"{storage.secret_name!r} {problem.message}") from None
    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise StorageProblem("NoStorage", field, f"give secretRef (or url), or set the operator's {STORAGE_ENV}")
    try:
        return checked_url(url, STORAGE_ENV, from_study=False)
    except StorageProblem as problem:
        raise StorageProblem(problem.reason, field, f"the operator's default storage ({STORAGE_ENV}) {problem.message}") from None


async def warm_start_url(api: Api, namespace: str, study: spec.Study) -> StorageURL | None:
    """The warm-start source's storage: spec.warmStart.storage, else the study's own (None)."""
    if study.warm_start is None or not (study.warm_start.storage.url or study.warm_start.storage.secret_name):
        return None
    try:
        return await storage_url(api, namespace, study.warm_start.storage, "spec.warmStart.storage")
    except StorageProblem as problem:
        raise spec.SpecError([(problem.field, problem.message)]) from None


def _masked(text: str, url: str) -> str:
    """``text`` with ``url``'s password, wherever it appears, as ***."""
    try:
        password = sqlalchemy.engine.make_url(url).password
    except Exception:
        return text
    return text.replace(password, "***") if password else text


def open_storage(url: str) -> WriteThroughStorage:
    """The study's storage at ``url`` (from storage_url), for run(). Failing, the detail (URL without password,
    the driver's error) goes to the operator's log, and status gets StorageProblem's generic text: the
    difference between a closed port and one that speaks another protocol is no business of the study's author."""
    source = getattr(url, "source", "spec.storage")
    try:
        return WriteThroughStorage(open_rdb(url))
    except Exception as error:  # open_rdb wraps sqlalchemy's many types in StorageUnavailable
        log.warning("cannot open the study storage of %s (%s): %s: %s", source, redact(url), type(error).__name__,
                    _masked(str(error), url))
        if source == STORAGE_ENV:
            raise StorageProblem("StorageUnavailable", "spec.storage", f"cannot connect to the operator's default storage "
                                 f"({STORAGE_ENV}): see the operator's log") from None
        raise StorageProblem("StorageUnavailable", source, UNREACHABLE) from None


def status_text(error: BaseException) -> str:
    """The public text of a study's error, for its status and Events: a storage that fails (or fails to
    open, a warm-start source's too) is told only as unreachable; its detail is in the operator's log."""
    if isinstance(error, StorageUnavailable):
        return UNREACHABLE
    return str(error)[:1000]


class SourceNotReady(RuntimeError):
    """spec.warmStart.study names a SpeechTuningStudy that has not ended yet: the study waits (Pending) for it."""


class StudyRunner:
    """Runs one SpeechTuningStudy until it is deleted or the operator stops."""

    def __init__(self, api: Api, body: Any, post_event: Callable[[str, str, str], None], dispatch: Dispatch | None = None):
        self.api = api
        self.dispatch = dispatch  # where warm worker pods ask for runs; None: the operator serves no such endpoint
        self.body = body  # kopf's live view: always the latest object
        self.post_event = post_event
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        self.optuna_name = optuna_study_name(self.namespace, self.name, body["metadata"]["uid"])
        self.labels = {"namespace": self.namespace, "study": self.optuna_name}
        self._wake = asyncio.Event()
        self._last_status: dict[str, Any] = {}
        self._settled: set[int] = set()  # finished trials whose final status is written
        self._warm_source: str | None = None  # the Optuna study spec.warmStart.study resolved to (status.warmStartSource)
        self._posted: set[str] = set()  # names of the stage Events known to exist

    # -- the loop -----------------------------------------------------------------
    async def run(self, stopped: Any) -> None:
        self._stopped = stopped
        while not stopped:
            generation = self._generation()
            snapshot = _snapshot(self.body)
            try:
                study, options = studyspec.parse(snapshot)
            except spec.SpecError as error:
                await self._set_state("Failed", "InvalidSpec", str(error).replace("\n", "; "), generation)
                await self._until_changed(generation, stopped)
                continue
            if not (self.body.get("status") or {}).get("state"):
                await self._set_state("Pending", "Starting", "opening the study's storage", generation)
            try:
                url = await storage_url(self.api, self.namespace, study.storage)
                storage = await asyncio.to_thread(open_storage, url)
            except (StorageProblem, StorageUnavailable) as error:
                await self._set_state("Pending", getattr(error, "reason", "StorageUnavailable"), str(error), generation)
                await stopped.wait(RETRY_SECONDS)
                continue
            except API_ERRORS as error:  # reading spec.storage's Secret
                log.warning("study %s/%s: %s: %s; resuming once the API server answers", self.namespace, self.name,
                            type(error).__name__, error)
                await self._set_state("Pending", type(error).__name__, status_text(error), generation)
                await self._until_api(stopped)
                continue
            try:
                await self._run_engine(study, options, storage, stopped)
            except spec.SpecError as error:  # found only with the storage: a bad warm-start source
                await self._set_state("Failed", "InvalidSpec", str(error).replace("\n", "; "), generation)
                await self._until_changed(generation, stopped)
            except SourceNotReady as waiting:
                await self._set_state("Pending", "WaitingForSource", str(waiting), generation)
                await stopped.wait(RETRY_SECONDS)
            except API_ERRORS as error:  # the API server failed the engine: it restarts with the API server, re-attaching
                log.warning("study %s/%s: %s: %s; resuming once the API server answers", self.namespace, self.name,
                            type(error).__name__, error)
                await self._set_state("Pending", type(error).__name__, status_text(error), generation)
                await self._until_api(stopped)
            except (StorageUnavailable, optuna.exceptions.OptunaError) as error:
                log.warning("study %s/%s: %s; retrying in %.0f s", self.namespace, self.name, error, RETRY_SECONDS)
                await self._set_state("Pending", type(error).__name__, status_text(error), generation)
                await stopped.wait(RETRY_SECONDS)
            finally:
                storage.rdb.engine.dispose()

    async def _run_engine(self, study: spec.Study, options: studyspec.ClusterOptions, storage: WriteThroughStorage,
                          stopped: Any) -> None:
        owner = Owner(API_VERSION, STUDY_KIND, self.name, self.body["metadata"]["uid"])
        job = dataclasses.replace(options.job, service_account=os.environ.get(TRIAL_SERVICE_ACCOUNT_ENV) or None)
        warm_url = await warm_start_url(self.api, self.namespace, study)
        study = await self._resolve_source(study)
        backend = self._backend(study, owner, job, options.pending_timeout_seconds)
        await backend.start()
        self._settled.clear()
        try:
            engine = await asyncio.to_thread(self._engine, study, options, storage, backend, warm_url)
            engine.update_budget(**studyspec.budget(_snapshot(self.body)))
            generation = self._generation()
            shape = studyspec.without_budget(_snapshot(self.body))
            running = asyncio.create_task(engine.run(), name=f"study-{self.namespace}/{self.name}")
            try:
                while not running.done():
                    await _first(running, self._wake.wait(), stopped.wait(), timeout=SYNC_SECONDS)
                    self._wake.clear()
                    if stopped:
                        return
                    if self._generation() != generation:
                        if studyspec.without_budget(_snapshot(self.body)) != shape:
                            return  # restart with the new spec; the Jobs keep running and are re-attached
                        generation = self._generation()
                        engine.update_budget(**studyspec.budget(_snapshot(self.body)))
                    if not running.done():
                        await self._sync(engine, backend, "Running", "Running", "trials are running", generation)
                outcome = running.result()
            finally:
                if not running.done():
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
            reason = "Completed" if outcome.state == "Succeeded" else "TooManyFailures"
            await self._sync(engine, backend, outcome.state, reason, outcome.message, generation)
            if isinstance(backend, KubernetesWorkerBackend):
                await backend.finish()  # the study's result first: retiring its workers takes seconds
        finally:
            await backend.close()
        await self._until_changed(generation, stopped)  # done: a bigger budget starts it again

    def _backend(self, study: spec.Study, owner: Owner, job: JobOptions, pending_timeout: float) -> KubernetesJobBackend:
        """One Job per run, or warm worker pods (spec.trialTemplate.workers.mode: warm)."""
        if study.trial_template.workers.mode != "warm":
            return KubernetesJobBackend(self.api, self.namespace, owner, job, pending_timeout)
        if self.dispatch is None:
            raise spec.SpecError([("spec.trialTemplate.workers.mode", "warm worker pods need the operator's dispatch endpoint, "
                                   f"which this operator does not serve (chart value workers.dispatch.enabled; {DISPATCH_URL_ENV})")])
        return KubernetesWorkerBackend(self.api, self.namespace, owner, job, pending_timeout, study.trial_template,
                                       self.dispatch, self.labels)

    def _engine(self, study: spec.Study, options: studyspec.ClusterOptions, storage: WriteThroughStorage,
                backend: KubernetesJobBackend, warm_start_url: str | None) -> Executor:
        """The study loop; checkpoints (ladder resume, spec.checkpoints) on the claim every trial Job mounts."""
        return Executor(study, storage, backend, study_name=self.optuna_name, namespace=self.namespace, notify=self._notify,
                        checkpoint_root=checkpoint_root(options.job, self.optuna_name), checkpoint_files_here=False,
                        warm_start_url=warm_start_url)

    async def _resolve_source(self, study: spec.Study) -> spec.Study:
        """spec.warmStart.study names a SpeechTuningStudy of this namespace (its Optuna study is the source), else an Optuna study.

        A SpeechTuningStudy is waited for until it has ended (SourceNotReady: the study stays Pending),
        so a source and its successor can be applied together. The name is resolved once: the Optuna
        study found when this study started is kept in status.warmStartSource, and a restarted
        operator reads that one, even once the source object is deleted. In the operator's own
        storage (neither spec.storage nor spec.warmStart.storage given), which every namespace's
        studies share, only this namespace's Optuna studies (``<namespace>.<name>.<uid>``) can be a
        source: another namespace's results are not this one's to read.
        """
        warm = study.warm_start
        if warm is None:
            return study
        name = (self.body.get("status") or {}).get("warmStartSource")
        if not name:
            source = await self.api.get(path("speechtuningstudies", self.namespace, warm.study))
            if source is not None:
                state = (source.get("status") or {}).get("state") or "Pending"
                name = (source.get("status") or {}).get("optunaStudy")
                if state not in ("Succeeded", "Failed") or not name:
                    raise SourceNotReady(f"spec.warmStart.study: waiting for SpeechTuningStudy {warm.study!r} to end (it is {state})")
            else:
                shared = not (study.storage.url or study.storage.secret_name or warm.storage.url or warm.storage.secret_name)
                if shared and not warm.study.startswith(f"{self.namespace}."):
                    raise spec.SpecError([("spec.warmStart.study", f"no SpeechTuningStudy {warm.study!r} in namespace {self.namespace}; "
                                           f"of the operator's storage only this namespace's Optuna studies ({self.namespace}.<name>.<uid>) "
                                           "can be a source, another study needs spec.warmStart.storage")])
                name = warm.study
        self._warm_source = name
        return dataclasses.replace(study, warm_start=dataclasses.replace(warm, study=name))

    # -- status -----------------------------------------------------------------------
    async def _sync(self, engine: Executor, backend: KubernetesJobBackend, state: str, reason: str, message: str, generation: int) -> None:
        began = time.perf_counter()
        direction = engine.spec.objective.direction
        level_names = _level_names(engine.spec)
        trials = engine.trials()
        patches = []
        for trial in trials:
            if trial.number in self._settled or trial.number not in backend.trial_uids:
                continue
            desired = status.trial_status(trial, direction, level_names.get(trial.user_attrs.get(record.STAGE), ()))
            if desired != backend.trial_status.get(trial.number):
                patches.append((trial.number, desired))
            elif trial.state.is_finished():
                self._settled.add(trial.number)
        gate = asyncio.Semaphore(PATCH_CONCURRENCY)

        async def patch_trial(number: int, desired: dict[str, Any]) -> None:
            async with gate:
                name = backend_trial_name(backend, number)
                await self.api.patch(path("speechtuningtrials", self.namespace, name, "status"), {"status": _replace(backend.trial_status.get(number), desired)})
                backend.trial_status[number] = desired

        await asyncio.gather(*(patch_trial(number, desired) for number, desired in patches))
        keep = studyspec.keep_trials(_snapshot(self.body))  # live: retention may change while the study runs
        for number in retention.to_delete([t for t in trials if t.number in backend.trial_uids], keep, direction):
            await self.api.delete(path("speechtuningtrials", self.namespace, backend_trial_name(backend, number)))
            backend.trial_uids.pop(number, None)
            backend.trial_status.pop(number, None)
        extra: dict[str, Any] = {}
        extra_conditions = []
        attrs = engine.study.user_attrs
        scheduler = _ladder(engine.scheduler)
        if scheduler is not None:
            names = tuple(level.name for level in scheduler.fidelity.levels)
            extra["fidelity"] = status.fidelity_status(scheduler.rungs(), attrs.get(record.CORRELATIONS, {}), names,
                                                       scheduler.bracket_status())
            if record.SPEND in attrs:
                extra["fidelity"]["spend"] = attrs[record.SPEND]
            extra_conditions.append(status.proxy_condition(extra["fidelity"]["correlations"],
                                                           scheduler.fidelity.correlation_warning, generation))
            extra_conditions.append(status.cost_condition(attrs.get(record.COSTS, {}), scheduler.fidelity.cost_warning,
                                                          generation))
        validation = status.validation_status(attrs.get(record.VALIDATION))
        if validation is not None:
            extra["validation"] = validation
        if self._warm_source:
            extra["warmStartSource"] = self._warm_source
        if engine.spec.stages:
            records = record.stages(attrs)
            extra["stages"] = status.stages_status(engine.spec.stages, records)
            extra["currentStage"] = status.current_stage(extra["stages"])  # None: the merge patch removes it
            await self._post_stage_events(engine.spec.stages, records, engine.objective)
        await self._set_state(state, reason, message, generation, counts=status.trial_counts(engine.counts()),
                              best=status.best_trial(engine.best_trial()), extra=extra, extra_conditions=extra_conditions)
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - began)

    # Status writes the API server did not take: see _set_state.
    _unwritten: tuple[dict[str, Any], dict[str, Any]] | None = None  # (the patch, what _last_status becomes once sent)
    _status_retry: asyncio.Task | None = None
    _status_lock: asyncio.Lock | None = None
    _stopped: Any = None  # run()'s ``stopped``
    _api_failures: tuple[int, float] = (0, -RETRY_SECONDS * 3)  # API failures of the engine in a row, and the last one's time

    async def _set_state(self, state: str, reason: str, message: str, generation: int, *,
                         counts: dict[str, int] | None = None, best: dict[str, Any] | None = None,
                         extra: dict[str, Any] | None = None, extra_conditions: list[dict[str, Any]] | None = None) -> None:
        """Write the study's status, when it differs from the last one written.

        Never raises for the API server: a write it does not take (it restarts, it is away) is logged and
        sent again in the background (0.5 s doubling to 10 s) until it is taken, or a newer one replaces it.
        """
        desired: dict[str, Any] = {"observedGeneration": generation, "state": state, "message": message[:1000],
                                   "optunaStudy": self.optuna_name, **(extra or {})}
        if counts is not None:
            desired["trials"] = counts
        if best is not None:
            desired["bestTrial"] = best
        conditions = status.phase_conditions(state, reason, message[:1000], generation) + (extra_conditions or [])
        written = {"desired": dict(desired), "conditions": conditions}
        if self._unwritten is None and written == self._last_status:
            return
        if self._unwritten is not None and written == self._unwritten[1]:
            return  # already being sent again
        previous = (self.body.get("status") or {}).get("conditions") or []
        desired["conditions"] = status.merge_conditions(previous, conditions, datetime.datetime.now(datetime.timezone.utc))
        self._unwritten = ({"status": desired}, written)
        await self._write_status()

    async def _write_status(self) -> bool:
        """Send the newest status not yet written; False when the API server did not take it (it is sent again)."""
        if self._status_lock is None:
            self._status_lock = asyncio.Lock()
        async with self._status_lock:  # one write at a time: an older status never lands after a newer one
            pending = self._unwritten
            if pending is None:
                return True
            try:
                await self.api.patch(path("speechtuningstudies", self.namespace, self.name, "status"), pending[0])
            except API_ERRORS as error:
                if self._status_retry is None or self._status_retry.done():
                    log.warning("study %s/%s: cannot write status (%s: %s); sending it again until the API server takes it",
                                self.namespace, self.name, type(error).__name__, error)
                    self._status_retry = asyncio.create_task(self._retry_status(), name=f"status-{self.namespace}/{self.name}")
                return False
            if self._unwritten is pending:
                self._unwritten = None
            self._last_status = pending[1]
            return True

    async def _retry_status(self) -> None:
        delay, limit = STATUS_RETRY_SECONDS
        while self._unwritten is not None and not self._stopped:
            await asyncio.sleep(delay)
            if await self._write_status():
                log.info("study %s/%s: status written again", self.namespace, self.name)
                return
            delay = min(delay * 2, limit)

    async def _until_api(self, stopped: Any) -> None:
        """After the API server failed the engine: return once it serves this study again, so a restarted API
        server costs seconds (a probe 0.5 s after, doubling to 2 s), not RETRY_SECONDS. Failures in a row
        (each within 30 s of the last) wait longer first: 0.5 s, 1 s, ... up to RETRY_SECONDS."""
        count, last = self._api_failures
        now = time.monotonic()
        count = count + 1 if now - last < 3 * RETRY_SECONDS else 1
        self._api_failures = (count, now)
        await stopped.wait(min(RETRY_SECONDS, API_PROBE_SECONDS[0] * 2 ** (count - 1)))
        delay, limit = API_PROBE_SECONDS
        while not stopped:
            try:
                if await self.api.get(path("speechtuningstudies", self.namespace, self.name)) is not None:
                    return
            except API_ERRORS as error:
                log.debug("study %s/%s: the API server is still away: %s", self.namespace, self.name, error)
            await stopped.wait(delay)
            delay = min(delay * 2, limit)

    async def _post_stage_events(self, stages: tuple[spec.Stage, ...], records: dict[str, dict[str, Any]], objective: str) -> None:
        """StageStarted, Handoff and StageFinished, exactly once per stage, from what storage records.

        The engine records a stage's start and end before it announces them, and kopf posts Events in
        the background: an operator killed at a stage transition could lose the announcement. So the
        runner posts these two from the records, each under a name made of the study's uid and the
        stage; after a restart, posting one again is AlreadyExists.
        """
        uid = self.body["metadata"]["uid"][:8]
        for stage in stages:
            found = records.get(stage.name, {})
            wanted = []
            if found.get("state") in ("Running", "Succeeded"):
                wanted.append(("stage-started", found.get("startedAt")))
            if found.get("handoff"):
                wanted.append(("handoff", found.get("startedAt")))
            if found.get("state") == "Succeeded":
                wanted.append(("stage-finished", found.get("finishedAt")))
            for kind, at in wanted:
                message = (handoff.describe(stage.name, found["handoff"]) if kind == "handoff"
                           else announcement(kind, stage, found, objective))
                name = f"{self.name}.{uid}.{kind}.{stage.name}"
                if name in self._posted:
                    continue
                type_, reason = EVENTS[kind]
                stamp = datetime.datetime.fromtimestamp(at or time.time(), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                body = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": self.namespace},
                        "involvedObject": {"apiVersion": API_VERSION, "kind": STUDY_KIND, "name": self.name,
                                           "namespace": self.namespace, "uid": self.body["metadata"]["uid"]},
                        "type": type_, "reason": reason, "message": message[:1000], "count": 1,
                        "firstTimestamp": stamp, "lastTimestamp": stamp, "source": {"component": "speechtune"},
                        "reportingComponent": "speechtune", "reportingInstance": "speechtune"}
                try:
                    await self.api.create(path("events", self.namespace), body)  # None: AlreadyExists, posted before
                except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as error:  # Events are auxiliary: never fail the study
                    log.warning("study %s/%s: cannot post Event %s: %s", self.namespace, self.name, reason, error)
                    if not isinstance(error, ApiError) or error.status not in (400, 403, 404, 422):
                        continue  # may pass: the next sync tries again
                self._posted.add(name)

    def _notify(self, event: Event) -> None:
        if event.kind in STAGE_EVENTS:
            self._wake.set()  # the next sync posts it, from the stage records
            return
        kind, reason = EVENTS.get(event.kind, ("Normal", event.kind))
        subject = f"trial {event.number}: " if event.number is not None else ""
        self.post_event(kind, reason, f"{subject}{event.message}"[:1000])
        self._wake.set()

    # -- waiting ------------------------------------------------------------------------
    def _generation(self) -> int:
        return self.body["metadata"].get("generation", 0)

    async def _until_changed(self, generation: int, stopped: Any) -> None:
        while not stopped and self._generation() == generation:
            await stopped.wait(1.0)


def _ladder(scheduler: Any) -> Ladder | None:
    """The ladder status.fidelity describes: the running one, else the last one that ran.

    With stages (spec.validation.seeds makes the ladder a stage, followed by validation) the
    ladder has ended when its stage has: its final rungs still belong in status.
    """
    if not isinstance(scheduler, Stages):
        return scheduler if isinstance(scheduler, Ladder) else None
    ran = [step.scheduler for step in scheduler.steps[: scheduler.index + 1]]
    return next((found for found in reversed(ran) if isinstance(found, Ladder)), None)


def _level_names(study: spec.Study) -> dict[str | None, tuple[str, ...]]:
    """Each stage's ladder level names (key None: a study without stages)."""
    names = {stage.name: tuple(level.name for level in stage.fidelity.levels) for stage in study.stages if stage.fidelity}
    if study.fidelity:
        names[None] = tuple(level.name for level in study.fidelity.levels)
    return names


def backend_trial_name(backend: KubernetesJobBackend, number: int) -> str:
    return trial_name(backend.study.name, number)


def _replace(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that also removes the keys the new status no longer has."""
    return {**{key: None for key in (old or {}) if key not in new}, **new}


def _snapshot(body: Any) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body["metadata"]), "spec": _plain(body.get("spec") or {})}


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


async def _first(*awaitables: Any, timeout: float) -> None:
    """Wait until any of them is done, or the timeout; cancel the rest (never the tasks passed in)."""
    futures = [item if isinstance(item, asyncio.Future) else asyncio.ensure_future(item) for item in awaitables]
    owned = [future for future, item in zip(futures, awaitables) if future is not item]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in owned:
            future.cancel()
