"""The Kubernetes backend: each trial is a Job, owned by its SpeechTuningTrial; metrics come from pod logs.

One backend serves one study. Two watches (the study's Jobs and pods) keep an
in-memory view that every trial consults, so a trial costs one log stream and
no polling; nothing here runs in a thread. Names are deterministic (study +
trial number), so launching a trial twice -- an operator killed mid-launch,
a handler run again -- creates one Trial and one Job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from speechtune.backend import Exit, TrialLaunch
from speechtune.k8s import exits
from speechtune.k8s.api import Api, ApiError, path
from speechtune.k8s.logs import LogCursor
from speechtune.k8s.manifests import (
    API_VERSION, CONTAINER, STUDY_LABEL, TRIAL_KIND, TRIAL_LABEL, JobOptions, Owner, build_job, build_trial, trial_name,
)
from speechtune.local import LaunchError
from speechtune.protocol import parse_line

log = logging.getLogger(__name__)

RECHECK_SECONDS = 5.0  # re-evaluate a waiting trial this often even without news (pending timeouts)
LOG_IDLE_SECONDS = 120.0  # a silent log stream is reopened (resumed) after this long
STOPPED = Exit(False, None, "Stopped", "stopped by the operator")


class KubernetesJobBackend:
    """Runs one study's trials as Jobs in the study's namespace."""

    def __init__(self, api: Api, namespace: str, study: Owner, options: JobOptions, pending_timeout: float = 600):
        self.api = api
        self.namespace = namespace
        self.study = study
        self.options = options
        self.pending_timeout = pending_timeout
        self.selector = f"{STUDY_LABEL}={study.name}"
        self.jobs: dict[int, dict[str, Any] | None] = {}  # None: the Job was deleted
        self.pods: dict[int, dict[str, dict[str, Any]]] = {}
        self.trial_uids: dict[int, str] = {}
        self.trial_status: dict[int, dict[str, Any]] = {}  # status of each existing Trial object, as last seen
        self._changed: dict[int, asyncio.Event] = {}
        self._followed: set[int] = set()
        self._watchers: list[asyncio.Task] = []
        self._readers: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()  # the engine's tasks following trials

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
        tasks = [*self._watchers, *(task for task in self._readers if task is not asyncio.current_task())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the engine's interface -------------------------------------------------
    async def launch(self, launch: TrialLaunch) -> "KubernetesRun":
        number = launch.number
        name = trial_name(self.study.name, number)
        try:
            uid = self.trial_uids.get(number)
            if uid is None:
                trials = path("speechtuningtrials", self.namespace)
                trial = await self.api.create(trials, build_trial(self.study, number, dict(launch.params)))
                trial = trial or await self.api.get(f"{trials}/{name}")
                if trial is None:
                    raise LaunchError(f"trial {number}: its SpeechTuningTrial {name} vanished while being created")
                uid = self.trial_uids[number] = trial["metadata"]["uid"]
                self.trial_status[number] = trial.get("status") or {}
            owner = Owner(API_VERSION, TRIAL_KIND, name, uid)
            jobs = path("jobs", self.namespace)
            job = await self.api.create(jobs, build_job(owner, launch, self.options, self.study.name))
            job = job or await self.api.get(f"{jobs}/{name}")  # AlreadyExists: launched before a restart
        except ApiError as error:
            if error.status in (400, 403, 422):  # the request itself is wrong: retrying will not help
                raise LaunchError(f"trial {number}: cannot create its Job {name}: {error}") from error
            raise
        self._note_job(number, job)
        return KubernetesRun(self, number, name)

    async def attach(self, study: str, number: int) -> "KubernetesRun | None":
        name = trial_name(self.study.name, number)
        job = await self.api.get(path("jobs", self.namespace, name))
        if job is None:
            return None
        self._note_job(number, job)
        return KubernetesRun(self, number, name)

    # -- the view ------------------------------------------------------------------
    async def refresh_pods(self, number: int) -> None:
        listing = await self.api.request("GET", path("pods", self.namespace),
                                         params={"labelSelector": f"{self.selector},{TRIAL_LABEL}={number}"})
        for pod in listing.get("items", []):
            self._on_pod("MODIFIED", pod)

    def pods_of(self, number: int) -> list[dict[str, Any]]:
        return sorted(self.pods.get(number, {}).values(), key=lambda pod: pod["metadata"]["creationTimestamp"])

    def changed(self, number: int) -> asyncio.Event:
        return self._changed.setdefault(number, asyncio.Event())

    def forget(self, number: int) -> None:
        self._followed.discard(number)
        self._changed.pop(number, None)
        if self.jobs.get(number) is None:
            self.jobs.pop(number, None)

    def _note_job(self, number: int, job: dict[str, Any] | None) -> None:
        self._followed.add(number)
        self.jobs[number] = job
        self.changed(number).set()

    async def _watch(self, kind: str, apply, synced: asyncio.Event) -> None:
        async for event, obj in self.api.watch(path(kind, self.namespace), {"labelSelector": self.selector}):
            if event == "SYNCED":
                await apply_listing(self, kind, obj["items"], apply)
                synced.set()
            else:
                apply(event, obj)

    def _on_job(self, event: str, job: dict[str, Any]) -> None:
        number = _number(job)
        if number is None:
            return
        if event == "DELETED":
            if number in self._followed:
                self.jobs[number] = None
            else:
                self.jobs.pop(number, None)
        else:
            self.jobs[number] = job
        self.changed(number).set()

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        number = _number(pod)
        if number is None:
            return
        pods = self.pods.setdefault(number, {})
        if event == "DELETED":
            pods.pop(pod["metadata"]["name"], None)
            if not pods:
                self.pods.pop(number, None)
        else:
            pods[pod["metadata"]["name"]] = pod
        self.changed(number).set()


async def apply_listing(backend: KubernetesJobBackend, kind: str, items: list[dict[str, Any]], apply) -> None:
    """A fresh list replaces the view: what it lacks was deleted while the watch was away."""
    listed = {_number(item) for item in items}
    if kind == "pods":
        names = {item["metadata"]["name"] for item in items}
        for number in list(backend.pods):
            for name, pod in list(backend.pods.get(number, {}).items()):
                if name not in names:
                    apply("DELETED", pod)
    else:
        for number, job in list(backend.jobs.items()):
            if job is not None and number not in listed:
                # The list may predate a Job created meanwhile: ask before believing it gone.
                if await backend.api.get(path("jobs", backend.namespace, job["metadata"]["name"])) is None:
                    apply("DELETED", job)
    for item in items:
        apply("MODIFIED", item)


def _number(obj: dict[str, Any]) -> int | None:
    try:
        return int(obj["metadata"]["labels"][TRIAL_LABEL])
    except (KeyError, ValueError):
        return None


class KubernetesRun:
    """One trial's Job: its pods' log lines, and how it ended."""

    def __init__(self, backend: KubernetesJobBackend, number: int, name: str):
        self.backend = backend
        self.number = number
        self.name = name
        self.last_words = ""
        self._stopped = False

    def exit(self) -> Exit | None:
        if self._stopped:
            return STOPPED
        return exits.classify(self.backend.jobs.get(self.number), self.backend.pods_of(self.number), time.time(),
                              self.backend.pending_timeout, self.last_words)

    async def _news(self) -> None:
        changed = self.backend.changed(self.number)
        try:
            await asyncio.wait_for(changed.wait(), RECHECK_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def lines(self) -> AsyncIterator[bytes]:
        """Every line of every pod of the Job (a retried Job has several), oldest pod first."""
        self.backend._readers.add(asyncio.current_task())
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
            self.backend.changed(self.number).clear()
            if self._stopped:
                return None
            for pod in self.backend.pods_of(self.number):
                if pod["metadata"]["name"] not in read and exits.started(pod):
                    return pod["metadata"]["name"]
            if self.exit() is not None:
                if refreshed:
                    return None
                # The Job's watch may be ahead of the pods' watch: list the pods before giving up on them.
                await self.backend.refresh_pods(self.number)
                refreshed = True
                continue
            await self._news()

    async def _follow(self, pod: str) -> AsyncIterator[bytes]:
        """One pod's log, followed; after a drop, resumed from the last line's timestamp."""
        logs = path("pods", self.backend.namespace, pod, "log")
        cursor = LogCursor()
        while not self._stopped:
            current = self.backend.pods.get(self.number, {}).get(pod)
            finished = current is None or exits.terminated(current) is not None
            params: dict[str, Any] = {"container": CONTAINER, "timestamps": True, "follow": not finished,
                                      "sinceTime": cursor.since_time()}
            try:
                async for raw in self.backend.api.stream(logs, params, idle_timeout=LOG_IDLE_SECONDS):
                    text = cursor.accept(raw)
                    if text is not None:
                        self._remember(text)
                        yield text
            except ApiError as error:
                if error.status in (400, 404) and finished:
                    return  # the pod (and its log) is gone
                log.debug("trial %s: log of %s not readable yet: %s", self.number, pod, error)
                await asyncio.sleep(1)
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                log.debug("trial %s: log stream of %s dropped or idle, resuming: %s", self.number, pod, error)
                await asyncio.sleep(0.5)
                continue
            if finished:
                return

    def _remember(self, text: bytes) -> None:
        if parse_line(text) is None and text.strip():
            self.last_words = text.decode("utf-8", "replace").strip()[:300]

    async def wait(self) -> Exit:
        self.backend._readers.add(asyncio.current_task())
        try:
            while True:
                self.backend.changed(self.number).clear()
                result = self.exit()
                if result is not None:
                    return result
                await self._news()
        finally:
            self.backend.forget(self.number)

    async def stop(self) -> None:
        """Delete the Job; the garbage collector deletes its pods (SIGTERM, then SIGKILL)."""
        if self._stopped:
            return
        self._stopped = True
        self.backend.changed(self.number).set()
        await self.backend.api.delete(path("jobs", self.backend.namespace, self.name), propagation="Background")
        self.backend.forget(self.number)

