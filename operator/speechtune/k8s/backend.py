"""The Kubernetes backend: each run of a trial is a Job, owned by its SpeechTuningTrial; metrics come from pod logs.

A trial of several pods (trialTemplate.replicas) is an Indexed Job plus its headless
Service; its metrics come from index 0's log only, and it ends as exits.classify says.

One backend serves one study. Two watches (the study's Jobs and pods) keep an
in-memory view that every run consults, so a run costs one log stream and
no polling; nothing here runs in a thread. Names are deterministic (study +
trial number + attempt, e.g. a fidelity level), so launching a run twice -- an
operator killed mid-launch, a handler run again -- creates one Trial and one Job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from speechtune.backend import Exit, TrialLaunch
from speechtune.k8s import exits
from speechtune.k8s.api import Api, ApiError, path
from speechtune.k8s.logs import Backoff, LogCursor
from speechtune.k8s.manifests import (
    API_VERSION, ATTEMPT_LABEL, CONTAINER, STUDY_LABEL, TRIAL_KIND, TRIAL_LABEL, JobOptions, Owner, build_job,
    build_rendezvous_service, build_trial, completion_index, job_name, rung_patch, trial_name,
)
from speechtune.local import LaunchError
from speechtune.protocol import parse_line

log = logging.getLogger(__name__)

RECHECK_SECONDS = 5.0  # re-evaluate a waiting trial this often even without news (pending timeouts)
LOG_IDLE_SECONDS = 120.0  # a silent log stream is reopened (resumed) after this long
LAUNCH_CONCURRENCY = 8  # Trial + Job creations in flight at once, per study
STOPPED = Exit(False, None, "Stopped", "stopped by the operator")
RunKey = tuple[int, str]  # (trial number, attempt): one Job; a ladder runs several per trial


class KubernetesJobBackend:
    """Runs one study's trials as Jobs in the study's namespace."""

    # A Job create sent by an operator just before it was killed can land after its successor
    # looked for the Job (seen: about a second, on a loaded API server). Ten seconds is a
    # practical bound, not a guarantee: the client's own request timeout is 30 s.
    recovery_grace_seconds = 10.0
    unavailable = (ApiError, aiohttp.ClientError, asyncio.TimeoutError)  # the API server away: stops the engine, not a trial

    def __init__(self, api: Api, namespace: str, study: Owner, options: JobOptions, pending_timeout: float = 600):
        self.api = api
        self.namespace = namespace
        self.study = study
        self.options = options
        self.pending_timeout = pending_timeout
        self.selector = f"{STUDY_LABEL}={study.name}"
        self.jobs: dict[RunKey, dict[str, Any] | None] = {}  # None: the Job was deleted
        self.pods: dict[RunKey, dict[str, dict[str, Any]]] = {}
        self.trial_uids: dict[int, str] = {}
        self.trial_status: dict[int, dict[str, Any]] = {}  # status of each existing Trial object, as last seen
        self._changed: dict[RunKey, asyncio.Event] = {}
        self._followed: set[RunKey] = set()
        self._watchers: list[asyncio.Task] = []
        self._readers: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()  # the engine's tasks following trials
        self._creating: set[asyncio.Task] = set()  # launches in flight
        self._launch_gate = asyncio.Semaphore(LAUNCH_CONCURRENCY)

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Load the existing Trials and start the two watches; return once both have listed."""
        listing = await self.api.request("GET", path("speechtuningtrials", self.namespace),
                                         params={"labelSelector": self.selector})
        for trial in listing.get("items", []):
            number = trial["spec"]["number"]
            self.trial_uids[number] = trial["metadata"]["uid"]
            self.trial_status[number] = trial.get("status") or {}
        synced = [asyncio.Event(), asyncio.Event()]
        self._watchers = [
            asyncio.create_task(self._watch("jobs", self._on_job, synced[0]), name=f"watch-jobs-{self.study.name}"),
            asyncio.create_task(self._watch("pods", self._on_pod, synced[1]), name=f"watch-pods-{self.study.name}"),
        ]
        await asyncio.gather(*(event.wait() for event in synced))

    async def close(self) -> None:
        """Stop watching, and stop every task still following a trial here (the engine's supervisors).

        The operator is stopping or restarting the engine: the Jobs carry on,
        and the next engine re-attaches to them.
        """
        tasks = [*self._watchers, *self._creating,
                 *(task for task in self._readers if task is not asyncio.current_task())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the engine's interface -------------------------------------------------
    async def launch(self, launch: TrialLaunch) -> "KubernetesRun":
        """Start creating the run's Trial and Job, and return at once: the run waits for them.

        The engine launches one trial after another; awaiting two API round trips
        (the Trial, then the Job it owns) for each would cap how fast freed slots
        refill, so launches overlap. A request that cannot succeed ends the run
        with reason LaunchError.
        """
        run = KubernetesRun(self, (launch.number, launch.attempt), self.job_name(launch.number, launch.attempt))
        run.created = asyncio.create_task(self._create(launch), name=f"create-{run.name}")
        self._creating.add(run.created)
        run.created.add_done_callback(self._creating.discard)
        return run

    async def _create(self, launch: TrialLaunch) -> None:
        key, name = (launch.number, launch.attempt), self.job_name(launch.number, launch.attempt)
        what = f"trial {launch.number}: cannot create its Job {name}"
        async with self._launch_gate:
            try:
                owner = await self.ensure_trial(launch)
                jobs = path("jobs", self.namespace)
                body = build_job(owner, launch, self.options, self.study.name)
                if self.options.replicas > 1:  # the pods' DNS names first (AlreadyExists: launched before a restart)
                    service = build_rendezvous_service(owner, body)
                    what = f"trial {launch.number}: cannot create its rendezvous Service {service['metadata']['name']}"
                    await self.api.create(path("services", self.namespace), service)
                    what = f"trial {launch.number}: cannot create its Job {name}"
                job = await self.api.create(jobs, body)
                job = job or await self.api.get(f"{jobs}/{name}")  # AlreadyExists: launched before a restart
            except ApiError as error:
                if error.status == 403:  # RBAC: the operator's own account lacks a rule; its log says which
                    log.warning("%s: %s", what, error)
                raise refused(error, what) from error
        self._note_job(key, job)

    async def ensure_trial(self, launch: TrialLaunch) -> Owner:
        """The run's SpeechTuningTrial, created on its configuration's first run; a promotion moves its rung label."""
        number = launch.number
        trial_object = trial_name(self.study.name, number)
        uid = self.trial_uids.get(number)
        trials = path("speechtuningtrials", self.namespace)
        if uid is None:
            trial = await self.api.create(trials, build_trial(self.study, number, dict(launch.params), launch.rung))
            trial = trial or await self.api.get(f"{trials}/{trial_object}")
            if trial is None:
                raise LaunchError(f"trial {number}: its SpeechTuningTrial {trial_object} vanished while being created")
            uid = self.trial_uids[number] = trial["metadata"]["uid"]
            self.trial_status[number] = trial.get("status") or {}
        elif launch.rung:  # promoted: the Trial's rung label follows its configuration up the ladder
            await self.api.patch(f"{trials}/{trial_object}", rung_patch(launch.rung))
        return Owner(API_VERSION, TRIAL_KIND, trial_object, uid)

    def job_name(self, number: int, attempt: str = "") -> str:
        return job_name(self.study.name, number, attempt, self.options.replicas)

    async def attach(self, study: str, number: int, attempt: str = "") -> "KubernetesRun | None":
        name = self.job_name(number, attempt)
        job = await self.api.get(path("jobs", self.namespace, name))
        if job is None:
            return None
        self._note_job((number, attempt), job)
        return KubernetesRun(self, (number, attempt), name)

    # -- the view ------------------------------------------------------------------
    async def refresh_pods(self, key: RunKey) -> None:
        listing = await self.api.request("GET", path("pods", self.namespace),
                                         params={"labelSelector": f"{self.selector},{TRIAL_LABEL}={key[0]}"})
        for pod in listing.get("items", []):
            self._on_pod("MODIFIED", pod)

    def pods_of(self, key: RunKey) -> list[dict[str, Any]]:
        return sorted(self.pods.get(key, {}).values(), key=lambda pod: pod["metadata"]["creationTimestamp"])

    def changed(self, key: RunKey) -> asyncio.Event:
        return self._changed.setdefault(key, asyncio.Event())

    def forget(self, key: RunKey) -> None:
        self._followed.discard(key)
        self._changed.pop(key, None)
        if self.jobs.get(key) is None:
            self.jobs.pop(key, None)

    def _note_job(self, key: RunKey, job: dict[str, Any] | None) -> None:
        self._followed.add(key)
        self.jobs[key] = job
        self.changed(key).set()

    async def _watch(self, kind: str, apply, synced: asyncio.Event) -> None:
        async for event, obj in self.api.watch(path(kind, self.namespace), {"labelSelector": self.selector}):
            if event == "SYNCED":
                await apply_listing(self, kind, obj["items"], apply)
                synced.set()
            else:
                apply(event, obj)

    def _on_job(self, event: str, job: dict[str, Any]) -> None:
        key = _run_key(job)
        if key is None:
            return
        if event == "DELETED":
            if key in self._followed:
                self.jobs[key] = None
            else:
                self.jobs.pop(key, None)
        else:
            self.jobs[key] = job
        self.changed(key).set()

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        key = _run_key(pod)
        if key is None:
            return
        pods = self.pods.setdefault(key, {})
        if event == "DELETED":
            pods.pop(pod["metadata"]["name"], None)
            if not pods:
                self.pods.pop(key, None)
        else:
            pods[pod["metadata"]["name"]] = pod
        self.changed(key).set()


async def apply_listing(backend: KubernetesJobBackend, kind: str, items: list[dict[str, Any]], apply) -> None:
    """A fresh list replaces the view: what it lacks was deleted while the watch was away."""
    listed = {_run_key(item) for item in items}
    if kind == "pods":
        names = {item["metadata"]["name"] for item in items}
        for key in list(backend.pods):
            for name, pod in list(backend.pods.get(key, {}).items()):
                if name not in names:
                    apply("DELETED", pod)
    else:
        for key, job in list(backend.jobs.items()):
            if job is not None and key not in listed:
                # The list may predate a Job created meanwhile: ask before believing it gone.
                if await backend.api.get(path("jobs", backend.namespace, job["metadata"]["name"])) is None:
                    apply("DELETED", job)
    for item in items:
        apply("MODIFIED", item)


async def follow_log(api: Api, namespace: str, pod: str, *, current: Callable[[], dict[str, Any] | None],
                     news: asyncio.Event, stopped: Callable[[], bool], subject: str) -> AsyncIterator[bytes]:
    """A pod's log from its start, followed until the pod has ended (``current()``: the pod as the
    watches last saw it, None once deleted); after a drop, resumed from the last line's timestamp.

    A stream that ends or fails while the pod has not ended (its status may lag behind its end, the
    API server may be away) is reopened after a backoff (logs.Backoff: 0.5 s doubling to 10 s, reset
    by each new line), or as soon as ``news`` (set by the watches) says the pod changed.
    """
    logs = path("pods", namespace, pod, "log")
    cursor = LogCursor()
    backoff = Backoff()
    refused = False

    def version(obj: dict[str, Any] | None) -> str | None:
        return None if obj is None else obj["metadata"].get("resourceVersion")

    while not stopped():
        seen = current()
        finished = seen is None or exits.terminated(seen) is not None
        params: dict[str, Any] = {"container": CONTAINER, "timestamps": True, "follow": not finished,
                                  "sinceTime": cursor.since_time()}
        try:
            async for raw in api.stream(logs, params, idle_timeout=LOG_IDLE_SECONDS):
                text = cursor.accept(raw)
                if text is not None:
                    backoff.reset()
                    yield text
        except ApiError as error:
            if error.status in (400, 404) and finished:
                return  # the pod (and its log) is gone
            if error.status == 403 and not refused:  # RBAC: say so once, keep trying (a fix needs no restart)
                log.warning("%s: cannot read the log of pod %s: %s", subject, pod, error)
                refused = True
            else:
                log.debug("%s: log of %s not readable yet: %s", subject, pod, error)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.debug("%s: log stream of %s dropped or idle, resuming: %s", subject, pod, error)
        else:
            if finished:
                return
        # Again at once if the pod changed while its log was read; else after the backoff, or on news of the
        # pod from the watches (its end, a relist once the API server is back). Nobody else waits on this
        # news while the log is read: clearing it is safe.
        news.clear()
        if version(current()) == version(seen):
            try:
                await asyncio.wait_for(news.wait(), backoff.next())
            except asyncio.TimeoutError:
                pass


def refused(error: ApiError, what: str) -> ApiError | LaunchError:
    """A request that cannot succeed (retrying will not help) as a LaunchError naming ``what``; others as they are."""
    return LaunchError(f"{what}: {error}") if error.status in (400, 403, 422) else error


def _run_key(obj: dict[str, Any]) -> RunKey | None:
    labels = obj["metadata"].get("labels") or {}
    try:
        return int(labels[TRIAL_LABEL]), labels.get(ATTEMPT_LABEL, "")
    except (KeyError, ValueError):
        return None


class KubernetesRun:
    """One trial's Job: its pods' log lines, and how it ended."""

    def __init__(self, backend: KubernetesJobBackend, key: RunKey, name: str):
        self.backend = backend
        self.key = key
        self.number = key[0]
        self.name = name
        self.last_words = ""
        self.created: asyncio.Task | None = None  # the launch in flight (None: attached to an existing Job)
        self._stopped = False

    def exit(self) -> Exit | None:
        if self._stopped:
            return STOPPED
        return exits.classify(self.backend.jobs.get(self.key), self.backend.pods_of(self.key), time.time(),
                              self.backend.pending_timeout, self.last_words)

    async def _news(self) -> None:
        changed = self.backend.changed(self.key)
        try:
            await asyncio.wait_for(changed.wait(), RECHECK_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _launch_failure(self) -> Exit | None:
        """Wait until the run's Trial and Job exist; the LaunchError that prevented them, if any."""
        if self.created is None:
            return None
        try:
            await self.created
        except LaunchError as error:
            return Exit(False, None, "LaunchError", str(error))
        return None

    async def lines(self) -> AsyncIterator[bytes]:
        """Every line of every pod of the Job (a retried Job has several), oldest pod first; of a Job of several
        pods (an Indexed Job), index 0's only: the other ranks' output is theirs, not the trial's."""
        self.backend._readers.add(asyncio.current_task())
        if await self._launch_failure() is not None:
            return
        read: set[str] = set()
        while True:
            pod = await self._next_pod(read)
            if pod is None:
                return
            async for line in self._follow(pod):
                yield line
            read.add(pod)

    async def _next_pod(self, read: set[str]) -> str | None:
        refreshed = False
        while True:
            self.backend.changed(self.key).clear()
            if self._stopped:
                return None
            pods = [pod for pod in self.backend.pods_of(self.key) if completion_index(pod) in (None, 0)]
            for pod in pods:
                if pod["metadata"]["name"] not in read and exits.started(pod):
                    return pod["metadata"]["name"]
            if self.exit() is not None:
                # A succeeded pod (read: it started) ends the Job; otherwise the Job's watch may be ahead
                # of the pods' watch: list the pods before giving up on them.
                if refreshed or any(map(exits.succeeded, pods)):
                    return None
                await self.backend.refresh_pods(self.key)
                refreshed = True
                continue
            await self._news()

    async def _follow(self, pod: str) -> AsyncIterator[bytes]:
        """One pod's log of this run's Job (follow_log)."""
        async for text in follow_log(self.backend.api, self.backend.namespace, pod,
                                     current=lambda: self.backend.pods.get(self.key, {}).get(pod),
                                     news=self.backend.changed(self.key), stopped=lambda: self._stopped,
                                     subject=f"trial {self.number}"):
            self._remember(text)
            yield text

    def _remember(self, text: bytes) -> None:
        if parse_line(text) is None and text.strip():
            self.last_words = text.decode("utf-8", "replace").strip()[:300]

    async def wait(self) -> Exit:
        self.backend._readers.add(asyncio.current_task())
        try:
            failure = await self._launch_failure()
            if failure is not None:
                return failure
            while True:
                self.backend.changed(self.key).clear()
                result = self.exit()
                if result is not None:
                    return result
                await self._news()
        finally:
            self.backend.forget(self.key)

    async def stop(self) -> None:
        """Delete the Job; the garbage collector deletes its pods, all of them (SIGTERM, then SIGKILL)."""
        if self._stopped:
            return
        self._stopped = True
        self.backend.changed(self.key).set()
        if self.created is not None:  # a launch in flight finishes first, or its Job would outlive the stop
            await asyncio.gather(self.created, return_exceptions=True)
        await self.backend.api.delete(path("jobs", self.backend.namespace, self.name), propagation="Background")
        self.backend.forget(self.key)

