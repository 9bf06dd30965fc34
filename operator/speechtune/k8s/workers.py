"""Warm worker pods: one study's runs executed, many per pod, by trainers that load once.

``trialTemplate.workers.mode: warm`` on the cluster. A worker is a Job owned by the study, whose
pod runs ``speechtune.podworker`` around the trainer (docs/operator.md, "Warm worker pods"). The
pod asks the operator's dispatch endpoint for runs with its own token; everything a run reports
comes, as with one Job per run, from the pod's log. To the executor this is a backend like the
Job one, and the Trial objects, status and Events are the same.

What keeps it safe:

- a run is assigned to one worker, and the assignment is written into the worker Job's annotation
  before the pod can be given the run: a restarted operator knows what every worker was given;
- the pod says, in every poll, which run it executes and which it was given last, so a run is
  sent again only to a worker that says it never got it: no run executes twice;
- a log line counts for a run only if it carries the id of the run its worker was given now;
  a line for any other run id is ignored and counted (speechtune_worker_ignored_lines);
- a stop that has not ended the run within ``stopGraceSeconds`` deletes the worker's pod;
- a worker is retired after ``maxRunsPerWorker`` runs, past its memory bounds, when it asks, and
  after ``IDLE_RETIRE_SECONDS`` idle; its idle time is counted (speechtune_worker_idle_seconds).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from speechtune import metrics, spec
from speechtune.backend import Exit, TrialLaunch
from speechtune.k8s import exits
from speechtune.k8s.api import Api, ApiError, path
from speechtune.k8s.backend import KubernetesJobBackend, follow_log, refused
from speechtune.k8s.dispatch import Dispatch
from speechtune.k8s.manifests import (
    RUN_ANNOTATION, SECRET_ANNOTATION, TOKEN_ANNOTATION, WORKER_LABEL, JobOptions, Owner, build_worker_job, build_worker_secret,
    worker_name,
)
from speechtune.local import LaunchError
from speechtune.podworker import NOT_A_WORKER_EXIT, token_hash
from speechtune.protocol import protocol_object
from speechtune.workers import RelayedRun, exit_of, worn_out

log = logging.getLogger(__name__)

IDLE_RETIRE_SECONDS = 60.0  # an idle worker holds a GPU for nothing: retire it after this long
CHECK_SECONDS = 2.0  # pending timeouts, idle accounting
STOPPED = Exit(False, None, "Stopped", "stopped by the operator")


@dataclass
class Assignment:
    """What a worker was given last, as its Job's annotation keeps it."""

    id: str
    number: int
    attempt: str
    seq: int  # the worker's how-manieth run
    argv: list[str]
    env: dict[str, str]

    def request(self) -> dict[str, Any]:
        return {"run": self.id, "argv": self.argv, "env": self.env}

    def annotation(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> Assignment | None:
        try:
            found = json.loads(text or "")
            return cls(str(found["id"]), int(found["number"]), str(found["attempt"]), int(found["seq"]),
                       [str(arg) for arg in found["argv"]], {str(k): str(v) for k, v in found["env"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class WorkerRun(RelayedRun):
    """One run in a worker pod: the lines its worker printed for it, and how it ended; a cold
    fallback's own Job stands in when the trainer turned out to be no worker."""

    def __init__(self, assignment: Assignment, worker: PodWorker, launch: TrialLaunch | None):
        super().__init__()
        self.assignment = assignment
        self.id = assignment.id
        self.key = (assignment.number, assignment.attempt)
        self.worker = worker
        self.launch = launch  # None for a run found at start (its launch was another operator's)
        self.sendable = launch is None  # the assignment is on the worker's Job: the pod may get it
        self.stop_requested = False
        self.created: asyncio.Task | None = None

    async def stop(self) -> None:
        """Ask the worker to stop the run at its next step boundary; past stopGraceSeconds, delete the worker's pod."""
        if not self.over:
            self.stop_requested = True
            self.worker.changed.set()
            if self.created is not None:
                await asyncio.gather(self.created, return_exceptions=True)
            if not self.worker.polled and self.worker.fresh:
                self.worker.drop(self)  # its pod never asked for anything: it cannot have this run
            else:
                try:
                    await asyncio.wait_for(self._over.wait(), self.worker.backend.settings.stop_grace_seconds)
                except asyncio.TimeoutError:
                    why = (f"{self.id} did not stop within stopGraceSeconds={self.worker.backend.settings.stop_grace_seconds:g}, "
                           "so its worker pod was deleted")
                    self.finish(Exit(False, 137, "Killed", why))
                    await self.worker.kill(why)
        if self.cold is not None:
            await self.cold.stop()


class PodWorker:
    """One worker Job and its pod, as this operator sees them."""

    def __init__(self, backend: KubernetesWorkerBackend, index: int, token_sha256: str, fresh: bool):
        self.backend = backend
        self.index = index
        self.name = worker_name(backend.study.name, index)
        self.token_sha256 = token_sha256
        self.fresh = fresh  # started by this operator (not found at start)
        self.created: asyncio.Task | None = None  # its Secret and Job being created
        self.secret_uid: str | None = None
        self.pod: dict[str, Any] | None = None
        self.job: dict[str, Any] | None = None
        self.run: WorkerRun | None = None  # the run it was given, until that run ends
        self.seq = 0  # runs given so far
        self.runs = 0  # runs ended
        self.polled = False
        self.rss_mib: float | None = None
        self.retiring = ""  # why, once it is to take no more runs
        self.killed = ""
        self.gone = False
        self.idle_since: float | None = None  # when its pod last became idle (None: busy, or not running yet)
        self.idle_counted = 0.0  # up to when its idle time is in speechtune_worker_idle_seconds
        self.warned = False  # about an ignored line, for its current run
        self.changed = asyncio.Event()  # for its pod's long poll: something to tell it
        self.pod_news = asyncio.Event()  # for its log follower: the watch saw its pod change
        self.follower: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        return self.run is not None

    async def instruction(self, current: str, last: str, rss_mib: float | None, hold: float) -> dict:
        """The dispatch endpoint's answer to this worker's poll (see speechtune.podworker)."""
        self.polled = True
        self.rss_mib = rss_mib
        self.backend.count_idle(self)
        deadline = time.monotonic() + hold
        while not self.gone:
            self.changed.clear()
            run = self.run
            if run is not None and run.sendable and not run.over:
                if last == run.id:  # the pod has it
                    if run.stop_requested and current == run.id:
                        return {"stop": run.id}
                elif run.stop_requested:
                    self.drop(run)  # it never got the run, and the run is no longer wanted
                    continue
                else:
                    return {"run": run.assignment.request()}
            elif run is None and self.retiring and not current:
                return {"retire": True}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {}
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                return {}
        return {"retire": True}

    def drop(self, run: WorkerRun) -> None:
        """The run ends without having started: stopped before its worker got it."""
        if self.run is run:
            self.run = None
            self.idle()
        run.finish(STOPPED)
        self.changed.set()

    def take(self, line: bytes) -> None:
        """Credit one log line to the run this worker was given, or to nobody."""
        run = self.run
        message = protocol_object(line)
        if message is None or "worker" in message:
            if run is not None and message is None:
                run.take(line)  # the trainer's log lines go with the run, for its last words
            return
        run_id = message.get("run")
        if run is not None and run_id == run.id:
            if "end" in message:
                self.end(run, message["end"])
            else:
                run.take(line)
        elif not self._earlier(run_id):
            self.backend.ignore(self, run, run_id)

    def _earlier(self, run_id: object) -> bool:
        """A run this worker was given before its current one (its log is replayed from the start)."""
        if not isinstance(run_id, str) or "#" not in run_id:
            return False
        head, _, seq = run_id.rpartition("#")
        return head.endswith(f"@{self.name}") and seq.isdigit() and int(seq) < self.seq

    def end(self, run: WorkerRun, end: object) -> None:
        end = end if isinstance(end, dict) else {}
        self.run = None
        self.runs += 1
        self.idle()
        run.finish(exit_of(end))
        why = worn_out(self.backend.settings, self.runs, self.rss_mib, end)
        if why:
            self.retire(why)
        self.changed.set()
        self.backend.wake()

    def idle(self) -> None:
        self.idle_since = self.idle_counted = time.monotonic()

    def retire(self, why: str) -> None:
        if not self.retiring:
            self.retiring = why
            log.info("%s: worker retired: %s", self.name, why)
            self.changed.set()

    async def kill(self, why: str) -> None:
        self.killed = why
        self.retire(why)
        if self.pod is not None:
            await self.backend.api.delete(path("pods", self.backend.namespace, self.pod["metadata"]["name"]), grace_period=0)
        await self.backend.delete_worker(self)


class KubernetesWorkerBackend(KubernetesJobBackend):
    """Runs one study's trials in warm worker pods; the Job backend's Trials, watches and cold runs underneath."""

    recovery_grace_seconds = 0.0  # a run is given only after its assignment is on the worker's Job

    def __init__(self, api: Api, namespace: str, study: Owner, options: JobOptions, pending_timeout: float,
                 template: spec.TrialTemplate, dispatch: Dispatch, labels: dict[str, str]):
        super().__init__(api, namespace, study, options, pending_timeout)
        self.template = template
        self.settings = template.workers
        self.dispatch = dispatch
        self.labels = labels
        self.gpus = metrics.requested_gpus(template.resources)
        self.workers: dict[int, PodWorker] = {}
        self.cold = False  # the trainer proved to be no worker: every run gets its own Job
        self._indexes = itertools.count(1)
        self._runs: dict[tuple[int, str], WorkerRun] = {}
        self._found: dict[tuple[int, str], WorkerRun] = {}  # runs going when this operator started, until attached
        self._tasks: set[asyncio.Task] = set()
        self._worker_jobs: dict[int, dict[str, Any]] = {}  # every worker Job and pod of the study, as watched
        self._worker_pods: dict[int, dict[str, Any]] = {}
        self._wake = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """The Job backend's start, then adopt the worker Jobs an earlier operator left."""
        await super().start()
        for index, job in sorted(self._worker_jobs.items()):
            if (job.get("status") or {}).get("succeeded") or (job.get("status") or {}).get("failed"):
                continue  # ended: cleaned up below, with the others no one keeps
            token = (job["metadata"].get("annotations") or {}).get(TOKEN_ANNOTATION, "")
            worker = self._add(index, token, fresh=False)
            worker.job, worker.pod = job, self._worker_pods.get(index)
            worker.secret_uid = (job["metadata"].get("annotations") or {}).get(SECRET_ANNOTATION)
            assignment = Assignment.parse((job["metadata"].get("annotations") or {}).get(RUN_ANNOTATION))
            if assignment is not None:
                worker.seq = assignment.seq
                worker.run = self._found[(assignment.number, assignment.attempt)] = WorkerRun(assignment, worker, None)
                self._runs[worker.run.key] = worker.run
        self._indexes = itertools.count(max(self._worker_jobs, default=0) + 1)
        for index, job in self._worker_jobs.items():
            if index not in self.workers:
                secret_uid = (job["metadata"].get("annotations") or {}).get(SECRET_ANNOTATION)
                self._spawn(self._delete_job(job["metadata"]["name"], job, secret_uid), f"delete-worker-{index}")
        for worker in list(self.workers.values()):
            self._refresh(worker)
        self._spawn(self._check(), f"workers-{self.study.name}")

    async def close(self) -> None:
        """Stop following; the worker pods carry on, and the next operator re-adopts them."""
        for worker in self.workers.values():
            self.dispatch.unregister(worker.token_sha256)
            worker.gone = True
            worker.changed.set()
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    async def finish(self) -> None:
        """The study is over: retire every worker, give them the grace to exit, then delete what is left."""
        for worker in self.workers.values():
            worker.retire("the study is over")
        deadline = time.monotonic() + self.settings.stop_grace_seconds
        while any(not worker.gone for worker in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.gather(*(self.delete_worker(worker) for worker in list(self.workers.values())), return_exceptions=True)

    # -- the engine's interface -------------------------------------------------
    async def launch(self, launch: TrialLaunch) -> Any:
        if self.cold:
            return await super().launch(launch)
        for key, found in list(self._found.items()):  # the executor re-attached what it wanted before launching
            self._found.pop(key)
            self._spawn(found.stop(), f"stop-unclaimed-{found.id}")
        key = (launch.number, launch.attempt)
        self._runs = {k: run for k, run in self._runs.items() if not run.over}
        if key in self._runs:
            return self._runs[key]
        worker = next((w for w in self.workers.values() if not w.busy and not w.retiring and not w.gone), None) \
            or self._new_worker()
        worker.seq += 1
        assignment = Assignment(f"{launch.run_name}@{worker.name}#{worker.seq}", launch.number, launch.attempt, worker.seq,
                                list(launch.argv[len(launch.template.command):]), dict(launch.env))
        self.count_idle(worker)
        worker.idle_since, worker.warned = None, False
        run = self._runs[key] = worker.run = WorkerRun(assignment, worker, launch)
        run.created = asyncio.create_task(self._assign(worker, run), name=f"assign-{run.id}")
        return run

    async def attach(self, study: str, number: int, attempt: str = "") -> Any:
        found = self._found.pop((number, attempt), None)
        return found if found is not None else await super().attach(study, number, attempt)

    # -- workers ----------------------------------------------------------------
    def _add(self, index: int, token_sha256: str, fresh: bool) -> PodWorker:
        worker = self.workers[index] = PodWorker(self, index, token_sha256, fresh)
        self.dispatch.register(token_sha256, worker)
        return worker

    def _new_worker(self) -> PodWorker:
        token = secrets.token_urlsafe(32)
        worker = self._add(next(self._indexes), token_hash(token), fresh=True)
        worker.created = asyncio.create_task(self._create_worker(worker, token), name=f"create-{worker.name}")
        return worker

    async def _create_worker(self, worker: PodWorker, token: str) -> None:
        """Its token Secret, then its Job. A name already taken is never reused: not a Secret, whose value the
        pod would get as its token, and not a Job, which would be another worker (LaunchError either way)."""
        async with self._launch_gate:
            try:
                secret = await self.api.request("POST", path("secrets", self.namespace),
                                                body=build_worker_secret(self.study, worker.index, token))
                worker.secret_uid = secret["metadata"]["uid"]
                job = build_worker_job(self.study, worker.index, self.template, self.options, self.dispatch.url,
                                       worker.token_sha256, worker.secret_uid)
                worker.job = await self.api.request("POST", path("jobs", self.namespace), body=job)
            except ApiError as error:
                if error.status == 409:
                    raise LaunchError(f"cannot create warm worker {worker.name}: {error}") from error
                raise refused(error, f"cannot create warm worker {worker.name}") from error

    async def _assign(self, worker: PodWorker, run: WorkerRun) -> None:
        """Create the Trial (and the worker), then record the assignment on the worker's Job; only then may the pod get it."""
        try:
            async with self._launch_gate:
                await self.ensure_trial(run.launch)
            if worker.created is not None:
                await worker.created
            if await self.api.patch(path("jobs", self.namespace, worker.name),
                                    {"metadata": {"annotations": {RUN_ANNOTATION: run.assignment.annotation()}}}) is None:
                raise LaunchError(f"trial {run.key[0]}: its warm worker's Job {worker.name} was deleted before it could start the run")
        except ApiError as error:
            failure = refused(error, f"trial {run.key[0]}: cannot give it to warm worker {worker.name}")
            if not isinstance(failure, LaunchError):
                raise
            run.finish(Exit(False, None, "LaunchError", str(failure)))
            worker.run = None
            await self.delete_worker(worker)
            return
        except LaunchError as error:
            run.finish(Exit(False, None, "LaunchError", str(error)))
            worker.run = None
            await self.delete_worker(worker)
            return
        run.sendable = True
        worker.changed.set()

    async def delete_worker(self, worker: PodWorker) -> None:
        """Forget the worker and delete its Job (its pod goes with it) and token."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.dispatch.unregister(worker.token_sha256)
        self.count_idle(worker)
        worker.gone = True
        worker.changed.set()
        if worker.created is not None:
            await asyncio.gather(worker.created, return_exceptions=True)
        await self._delete_job(worker.name, worker.job, worker.secret_uid)

    async def _delete_job(self, name: str, job: dict[str, Any] | None, secret_uid: str | None) -> None:
        """A worker's Job (its pod goes with it) and its token Secret, each by uid: never an object it did not create."""
        if job is not None:
            await self.api.delete(path("jobs", self.namespace, name), propagation="Background", uid=job["metadata"]["uid"])
        if secret_uid:
            await self.api.delete(path("secrets", self.namespace, name), uid=secret_uid)

    def count_idle(self, worker: PodWorker) -> None:
        """Add a worker's idle time since last counted to speechtune_worker_idle_seconds (and x GPUs)."""
        if worker.idle_since is None or worker.busy:
            return
        now = time.monotonic()
        idle, worker.idle_counted = now - worker.idle_counted, now
        metrics.WORKER_IDLE_SECONDS.labels(**self.labels).inc(idle)
        metrics.WORKER_IDLE_GPU_SECONDS.labels(**self.labels).inc(idle * self.gpus)

    def ignore(self, worker: PodWorker, run: WorkerRun | None, run_id: object) -> None:
        metrics.WORKER_IGNORED_LINES.labels(**self.labels).inc()
        if worker.warned:
            return
        worker.warned = True
        log.warning("%s/%s: worker %s printed a line for run %r while given %s; ignored (and any more, counted)",
                    self.namespace, self.study.name, worker.name, run_id, run.id if run else "no run")

    def wake(self) -> None:
        self._wake.set()

    # -- watching -----------------------------------------------------------------
    def _on_job(self, event: str, job: dict[str, Any]) -> None:
        index = _worker_index(job)
        if index is None:
            return super()._on_job(event, job)
        if event == "DELETED":
            self._worker_jobs.pop(index, None)
            return
        self._worker_jobs[index] = job
        if index in self.workers:
            self.workers[index].job = job

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        index = _worker_index(pod)
        if index is None:
            return super()._on_pod(event, pod)
        worker = self.workers.get(index)
        if event == "DELETED":
            self._worker_pods.pop(index, None)
            if worker is not None and worker.pod is not None and worker.pod["metadata"]["name"] == pod["metadata"]["name"]:
                worker.pod = None  # its log follower ends, and its run with it
                worker.pod_news.set()
            return
        self._worker_pods[index] = pod  # a Job with backoffLimit 0 has one pod
        if worker is not None:
            worker.pod = pod
            worker.pod_news.set()
            self._refresh(worker)

    def _refresh(self, worker: PodWorker) -> None:
        if worker.follower is None and worker.pod is not None and exits.started(worker.pod):
            if worker.idle_since is None and not worker.busy:
                worker.idle()
            worker.follower = self._spawn(self._follow(worker), f"log-{worker.name}")

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _follow(self, worker: PodWorker) -> None:
        """The worker pod's log from its start, line by line, then what its end means for its run."""
        assert worker.pod is not None
        async for text in follow_log(self.api, self.namespace, worker.pod["metadata"]["name"], current=lambda: worker.pod,
                                     news=worker.pod_news, stopped=lambda: False, subject=f"warm worker {worker.name}"):
            worker.take(text)
        state = exits.terminated(worker.pod) if worker.pod is not None else None
        await self._ended(worker, state or {})

    async def _ended(self, worker: PodWorker, state: dict[str, Any]) -> None:
        """The worker's pod ended: the run it had ends with it, or runs cold if the trainer was never a worker."""
        run, worker.run = worker.run, None
        code = state.get("exitCode")
        await self.delete_worker(worker)
        if run is None or run.over:
            return
        if code == NOT_A_WORKER_EXIT and not worker.polled and run.launch is not None:
            if not self.cold:
                log.warning("%s/%s: the trainer does not speak the worker protocol: every run of this study gets its own Job",
                            self.namespace, self.study.name)
            self.cold = True
            try:
                run.finish(Exit(False), await super().launch(run.launch))
            except LaunchError as error:
                run.finish(Exit(False, None, "LaunchError", str(error)))
            return
        if worker.killed:
            run.finish(Exit(False, 137, "Killed", worker.killed))
        elif state.get("reason") == "OOMKilled":
            run.finish(Exit(False, code, "OOMKilled", f"its worker pod {worker.name} ran out of memory (OOMKilled) during the run"))
        else:
            run.finish(Exit(False, code, "WorkerDied", f"its worker pod {worker.name} ended during the run "
                                                       f"({state.get('reason') or 'deleted'}, exit code {code})"))

    async def _check(self) -> None:
        """Every few seconds: pending timeouts of workers that never started, idle time, idle retirement."""
        while True:
            self._wake.clear()
            now = time.monotonic()
            for worker in list(self.workers.values()):
                self.count_idle(worker)
                if worker.idle_since is not None and not worker.busy and now - worker.idle_since > IDLE_RETIRE_SECONDS:
                    worker.retire(f"idle for {IDLE_RETIRE_SECONDS:g} s")
                if worker.follower is None and worker.job is not None and worker.run is not None and worker.run.sendable:
                    pods = [worker.pod] if worker.pod is not None else []
                    failure = exits.classify(worker.job, pods, time.time(), self.pending_timeout)
                    if failure is not None and not failure.succeeded:
                        run, worker.run = worker.run, None
                        run.finish(failure)
                        await self.delete_worker(worker)
            try:
                await asyncio.wait_for(self._wake.wait(), CHECK_SECONDS)
            except asyncio.TimeoutError:
                pass


def _worker_index(obj: dict[str, Any]) -> int | None:
    value = (obj["metadata"].get("labels") or {}).get(WORKER_LABEL)
    return int(value) if value is not None and value.isdigit() else None
